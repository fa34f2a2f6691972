"""A tiny quantized session shared by the distillation tests: the 2-block bundled model sampling small clips
(4 frames of 16 x 16 pixels: 32 tokens instead of 256, so training steps cost little), 2 prompts x 2
sampling steps of calibration, W3A6 (int3 weights per channel, dynamic per-token uint6 activations).
`fresh()` hands each test its own deep copy, so tests never see each other's training."""
from __future__ import annotations

import copy
import dataclasses
from functools import lru_cache

import torch

from stage_helpers import tiny_world_model
from workbench.session import Session
from workbench.stages import CalibrationSettings, PTQSettings, apply_quantization, collect_calibration

W3A6 = {"weight": {"format": "int3", "granularity": "channel"},
        "act": {"format": "uint6", "granularity": "token", "dynamic": True}}


@lru_cache(maxsize=1)
def _base() -> Session:
    torch.manual_seed(0)
    model = tiny_world_model()
    model.world = dataclasses.replace(model.world, frames=4, height=16, width=16)
    s = Session.start(model, seed=0)
    collect_calibration(s, CalibrationSettings(prompts=2, steps=2))
    apply_quantization(s, PTQSettings(quant=W3A6))
    return s


def fresh() -> Session:
    """A quantized session nobody trained yet (own copy of the quantized transformer and calibration)."""
    b = _base()
    return Session(fp_model=b.fp_model, qtransformer=copy.deepcopy(b.qtransformer), seed=b.seed,
                   calibration=copy.deepcopy(b.calibration), quant_config=b.quant_config)


def state_of(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}
