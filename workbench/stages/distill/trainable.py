"""What distillation trains (`DistillSettings.train`): weight scales (LSQ), extras (Compensation branches and
WeightDelta parametrizations) and raw weights, as AdamW parameter groups."""

from __future__ import annotations

from typing import Any, Iterable

import torch
from torch import nn

from workbench.quant import QuantLinear, Quantizer
from workbench.quant.compensation import compensations, weight_deltas
from workbench.stages.distill.settings import DistillSettings


def make_scales_learnable(layer: QuantLinear) -> nn.Parameter | None:
    """Turn `layer`'s static weight quantizer into one with a learnable scale (same calibrated range)."""
    wq = layer.weight_quantizer
    if wq is None or wq.spec.dynamic or wq.spec.timestep_wise or wq.spec.fixed_range is not None:
        return None
    if not wq.spec.learnable_scale:
        new = Quantizer(wq.spec.with_(learnable_scale=True), is_weight=True).to(wq.zero.device)
        new._set(wq.scale.detach().clone(), wq.zero.detach().clone())
        new.mode = wq.mode
        layer.weight_quantizer = new
        layer._weight_cache = None
        wq = new
    return wq.scale if isinstance(wq.scale, nn.Parameter) and wq.scale.numel() else None


def param_groups(unit: nn.Module, s: DistillSettings) -> list[dict[str, Any]]:
    """AdamW parameter groups of the things `s.train` names inside `unit` (unique, ordered)."""
    seen: set[int] = set()

    def take(ps: Iterable[nn.Parameter]) -> list[nn.Parameter]:
        out = []
        for p in ps:
            if p is not None and p.numel() and id(p) not in seen:
                seen.add(id(p))
                out.append(p)
        return out

    groups = []
    qls = [m for m in unit.modules() if isinstance(m, QuantLinear)]
    if "extras" in s.train:
        ps = take(p for c in compensations(unit).values() for n, p in c.named_parameters()
                  if not n.startswith("input_quantizer."))
        ps += take(p for d in weight_deltas(unit).values() for p in d.parameters())
        if ps:
            groups.append({"name": "extras", "params": ps, "lr": s.lr, "weight_decay": s.weight_decay})
    if "scales" in s.train:
        ps = take(make_scales_learnable(q) for q in qls)
        if ps:
            groups.append({"name": "scales", "params": ps, "lr": s.scale_lr or s.lr / 10, "weight_decay": 0.0})
    if "weights" in s.train:
        ps = take(raw_weight(q) for q in qls if q.weight_quantizer is not None)
        if ps:
            groups.append({"name": "weights", "params": ps, "lr": s.weight_lr or s.lr / 100, "weight_decay": 0.0})
    return groups


def raw_weight(q: QuantLinear) -> nn.Parameter:
    par = getattr(q, "parametrizations", None)
    if par is not None and "weight" in par:
        return par["weight"].original
    return q.weight


@torch.no_grad()
def post_step(groups: list[dict[str, Any]]) -> None:
    for g in groups:
        if g["name"] == "scales":
            for p in g["params"]:
                p.clamp_(min=1e-8)
