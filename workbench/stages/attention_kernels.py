"""`choose_attention_kernels`: per attention module, the cheapest quantized-attention format within a tolerance.

Replays calibration calls through the quantized transformer once. Every attention module (those kept in full
precision excepted) computes its full-precision attention, which it passes on so that each module's error is
its own, and from the same Q, K, V the quantized attention kernel with fp8 P.V and with fp16 P.V
(`workbench.kernels`: the GPU kernel, or its exact CPU reference); the relative error of each against full
precision is averaged over the calls. A module gets fp8 if that error is within `tolerance`, else fp16 if within
it, else stays in full precision; modules none of whose calls the kernel takes (masked, causal, shorter than
`min_tokens`) stay in full precision too. The choice is applied to the model and written into the session's
quant config (`attention_layers`, `keep_fp`), so saving, export and loading keep it.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, replace
from typing import Any

from workbench.quant.attention import (KERNEL_PV, AttentionSpec, QuantAttention, is_attention_module, unwrap_attention,
                                       wrap_attention)
from workbench.session import Session
from workbench.stages.qvdit import ensure_quantized
from workbench.stages.registry import stage
from workbench.stages.report import StageReport
from workbench.viz.stage_figures import attention_kernel_figures

FULL_PRECISION = "bf16"  # the label of a module left in the model's own precision


@dataclass
class AttentionKernelSettings:
    """tolerance: largest mean relative error against full-precision attention (per module) a format may add.
    calls: calibration calls replayed, spread over the timesteps (None: all).
    min_tokens: calls with fewer queries or keys stay in full precision (short cross-attention)."""

    tolerance: float = 0.05
    calls: int | None = 8
    min_tokens: int = 1024

    def __post_init__(self) -> None:
        if not self.tolerance > 0:
            raise ValueError(f"tolerance must be > 0 (a relative error), got {self.tolerance}")
        if self.calls is not None and self.calls < 1:
            raise ValueError(f"calls must be >= 1 or None (all), got {self.calls}")
        if self.min_tokens < 0:
            raise ValueError(f"min_tokens must be >= 0, got {self.min_tokens}")


def choose(errors: dict[str, float], tolerance: float) -> str:
    """The first of fp8, fp16 whose mean error is within tolerance, else full precision."""
    return next((pv for pv in KERNEL_PV if pv in errors and errors[pv] <= tolerance), FULL_PRECISION)


@stage(AttentionKernelSettings, figures=attention_kernel_figures)
def choose_attention_kernels(session: Session, settings: AttentionKernelSettings | None = None) -> StageReport:
    """Per attention module: quantized attention with fp8 or fp16 P.V, or full precision (module docstring)."""
    s = settings or AttentionKernelSettings()
    ensure_quantized(session, "choose_attention_kernels")
    t0 = time.perf_counter()
    model, config = session.qtransformer, session.quant_config
    modules = {n: m for n, m in model.named_modules() if is_attention_module(m) and not config.is_fp(n)}
    if not modules:
        raise ValueError("choose_attention_kernels: every attention module is kept in full precision (keep_fp)")
    for name, module in modules.items():
        qa = getattr(module, "quant_attention", None)
        if isinstance(qa, QuantAttention) and qa.quantizers():
            raise ValueError(f"choose_attention_kernels: {name} fake-quantizes attention ({qa.spec.to_dict()}); "
                             "drop 'attention' from the recipe's quant section or this stage")
        if isinstance(qa, QuantAttention):
            unwrap_attention(module)
        wrap_attention(module, AttentionSpec.kernel_only(KERNEL_PV[0], s.min_tokens)).measure = {}
    try:
        session.calibration.replay(model, session.calibration.select(s.calls), progress=session.progress,
                                   desc="measuring attention kernels")
        measured = {n: dict(m.quant_attention.measure) for n, m in modules.items()}
    finally:
        for module in modules.values():
            unwrap_attention(module)
    rows: list[dict[str, Any]] = []
    layers, keep = dict(config.attention_layers), list(config.keep_fp)
    for name, module in modules.items():
        errors = {pv: sum(v) / len(v) for pv, v in measured[name].items() if v}
        choice = choose(errors, s.tolerance)
        layers.pop(name, None)
        if choice == FULL_PRECISION:
            keep.append(name)
        else:
            spec = AttentionSpec.kernel_only(choice, s.min_tokens)
            wrap_attention(module, spec)
            layers[name] = spec
        rows.append({"module": name, "calls": len(measured[name].get(KERNEL_PV[0], [])),
                     **{f"err_{pv}": errors.get(pv) for pv in KERNEL_PV}, "choice": choice})
    session.quant_config = replace(config, attention_layers=layers, keep_fp=keep)
    counts = {c: sum(r["choice"] == c for r in rows) for c in (*KERNEL_PV, FULL_PRECISION)}
    report = StageReport(
        name="choose_attention_kernels",
        settings=asdict(s),
        summary={"modules": len(rows), **{f"{c}_modules": n for c, n in counts.items()}, "tolerance": s.tolerance},
        tables={"modules": rows},
        seconds=time.perf_counter() - t0,
    )
    return session.add(report)


__all__ = ["AttentionKernelSettings", "choose", "choose_attention_kernels"]
