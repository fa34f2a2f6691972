"""A small text-to-video model for stage tests: the bundled model's text encoder and sampler with a
2-block transformer holding the bundled weights of its first two blocks (a real, trained Wan DiT, 3x
cheaper to run), plus small stage settings."""
from __future__ import annotations

import copy
from functools import lru_cache

import torch
from diffusers import WanTransformer3DModel

from workbench.models import load_bundled
from workbench.models.bundled import TinyWorldModel

PROMPTS = ["a red circle moving right", "a fast blue square moving down"]
# The stages the shared `pipeline` fixture runs, in order (STAGES also holds stages other tests cover).
PIPELINE = ["collect_calibration", "analyze_error_sources", "apply_quantization", "assign_mixed_precision",
            "calibrate_ranges"]
W4A8_STATIC = {"weight": {"format": "int4"}, "act": {"format": "uint8", "granularity": "tensor", "dynamic": False}}
W4A8_DYNAMIC = {"weight": {"format": "int4"}, "act": {"format": "uint8", "granularity": "token", "dynamic": True}}


@lru_cache(maxsize=1)
def _base() -> TinyWorldModel:
    m = load_bundled()
    cfg = {k: v for k, v in dict(m.transformer.config).items() if not k.startswith("_")}
    cfg["num_layers"] = 2
    small = WanTransformer3DModel(**cfg)
    own = small.state_dict()
    small.load_state_dict({k: v for k, v in m.transformer.state_dict().items() if k in own})
    return TinyWorldModel(small.eval(), m.text_encoder, m.scheduler_config, m.world, "tiny-world-2blocks")


def tiny_world_model() -> TinyWorldModel:
    """A fresh copy (tests may modify it)."""
    return copy.deepcopy(_base())


def finite_numbers(obj) -> bool:
    """Every number in nested plain data is finite (None allowed)."""
    if isinstance(obj, dict):
        return all(finite_numbers(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return all(finite_numbers(v) for v in obj)
    if isinstance(obj, float):
        return torch.isfinite(torch.tensor(obj)).item()
    return True
