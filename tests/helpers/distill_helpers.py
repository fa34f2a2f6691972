"""A tiny quantized session shared by the distillation tests: the 2-block bundled model sampling small clips
(4 frames of 16 x 16 pixels: 32 tokens instead of 256, so training steps cost little), 2 prompts x 2
sampling steps of calibration, W3A6 (int3 weights per channel, dynamic per-token uint6 activations).
`fresh()` hands each test its own deep copy, so tests never see each other's training.

`heldout_errors` measures a quantized transformer on rows no distillation trains on: the FP trajectories of
2 *other* training-scene prompts from other noise seeds (`heldout_calibration`), so a test of "training
lowers the error" checks that it generalises instead of re-reading the loss on the rows it was fit to."""
from __future__ import annotations

import copy
import dataclasses
from functools import lru_cache

import torch

from stage_helpers import tiny_world_model
from workbench.session import Session
from workbench.stages import CalibrationSettings, PTQSettings, apply_quantization, collect_calibration
from workbench.stages.calibration import CalibrationCache

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


@lru_cache(maxsize=1)
def heldout_calibration() -> CalibrationCache:
    """FP trajectories (2 steps) of calibration prompts the shared session's calibration does not have, from noise
    seeds 20000+ (it used 10000+): 4 prompts are sampled in one guided call, the rows of the 2 the training
    calibration already holds are dropped (a call's rows are [conditional..., unconditional...])."""
    b = _base()
    tmp = Session(fp_model=b.fp_model, qtransformer=b.qtransformer, seed=b.seed)
    collect_calibration(tmp, CalibrationSettings(prompts=4, steps=2, seed_offset=20_000))
    cal = tmp.calibration
    n = len(cal.prompts)
    new = [i for i, p in enumerate(cal.prompts) if p not in set(b.calibration.prompts)]
    assert len(new) >= 2 and all(e.batch == 2 * n for e in cal.entries)
    idx = torch.tensor(new + [i + n for i in new])
    cal.entries = [e.take(idx) for e in cal.entries]
    cal.prompts, cal.seeds = [cal.prompts[i] for i in new], [cal.seeds[i] for i in new]
    return cal


def _first(out):
    return out[0] if isinstance(out, (tuple, list)) else getattr(out, "sample", out)


@torch.no_grad()
def heldout_errors(qtransformer: torch.nn.Module,
                   blocks: tuple[str, ...] = ("blocks.0", "blocks.1")) -> dict[str, float]:
    """Relative squared error ||q - fp||^2 / ||fp||^2 against the FP transformer on the held-out rows, of each named
    block's output (both models run end to end, so a block sees its own model's inputs) and of the final output."""
    fp = _base().fp_transformer
    cal = heldout_calibration()
    num = {k: 0.0 for k in (*blocks, "output")}
    den = dict(num)
    outs: dict[tuple[str, str], torch.Tensor] = {}

    def hook(tag, name):
        return lambda mod, args, out: outs.__setitem__((tag, name), _first(out).detach().float())

    handles = [m.get_submodule(b).register_forward_hook(hook(tag, b))
               for tag, m in (("fp", fp), ("q", qtransformer)) for b in blocks]
    try:
        for e in cal.entries:
            ref = _first(fp(*e.args, **e.kwargs)).float()
            got = _first(qtransformer(*e.args, **e.kwargs)).float()
            pairs = [(outs[("q", b)], outs[("fp", b)], b) for b in blocks] + [(got, ref, "output")]
            for a, r, key in pairs:
                num[key] += float((a - r).pow(2).sum())
                den[key] += float(r.pow(2).sum())
    finally:
        for h in handles:
            h.remove()
    return {k: num[k] / den[k] for k in num}

