"""`apply_quantization`: turn a recipe's quant section into a QuantConfig and quantize the session's copy.

The quant section is `QuantConfig.from_dict` data (weight / act specs, rules, attention, keep_fp);
`keep_fp_roles` adds the adapter's patterns of whole roles (embeddings, modulation, the final
projection by default, as ViDiT-Q and Q-Diffusion keep them) to `keep_fp`. Static activation ranges
are fixed with plain min-max over the calibration cache when one is there (`calibrate_ranges` refines them).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Any

from torch import nn

from workbench.quant import (QuantConfig, QuantLinear, calibrate_model, quant_modules, quantize_model,
                             quantized_linears, quantizers)
from workbench.quant.attention import QuantAttention
from workbench.session import Session
from workbench.stages.registry import stage
from workbench.stages.report import StageReport
from workbench.viz.stage_figures import ptq_figures

DEFAULT_KEEP_FP_ROLES = ["embed", "mod", "proj_in", "proj_out"]


@dataclass
class PTQSettings:
    """quant: QuantConfig.from_dict data (None: the session recipe's quant section, else W8A8 dynamic).
    keep_fp_roles: adapter roles or role groups left in full precision.
    calibrate: fix still-uncalibrated static activation ranges with min-max over the calibration cache."""

    quant: dict[str, Any] | None = None
    keep_fp_roles: list[str] = field(default_factory=lambda: list(DEFAULT_KEEP_FP_ROLES))
    calibrate: bool = True

    def __post_init__(self) -> None:
        from workbench.models.adapters import OTHER_ROLE, ROLE_GROUPS, ROLES

        if self.quant is not None:
            QuantConfig.from_dict(dict(self.quant))  # raises naming the bad field
        known = {*ROLES, *ROLE_GROUPS, OTHER_ROLE}
        unknown = [r for r in self.keep_fp_roles if r not in known]
        if unknown:
            raise ValueError(f"unknown role {unknown[0]!r} in keep_fp_roles; roles: {', '.join(sorted(known))}")


def build_config(quant: dict[str, Any] | None, transformer: nn.Module, keep_fp_roles: list[str] = ()) -> QuantConfig:
    """QuantConfig from plain data plus keep_fp patterns of the given adapter roles."""
    from workbench.models.adapters import OTHER_ROLE, ROLE_GROUPS, ROLES, adapter_for

    config = QuantConfig.from_dict(dict(quant or {}))
    if keep_fp_roles:
        adapter = adapter_for(transformer)
        known = {*ROLES, *ROLE_GROUPS, OTHER_ROLE}
        unknown = [r for r in keep_fp_roles if r not in known]
        if unknown:
            raise ValueError(f"unknown role {unknown[0]!r} in keep_fp_roles; roles: {', '.join(sorted(known))}")
        patterns = [p for r in keep_fp_roles for p in adapter.patterns(r)]
        config.keep_fp = list(dict.fromkeys([*config.keep_fp, *patterns]))
    return config


def uncalibrated_static(model: nn.Module) -> list[str]:
    """Names of static activation quantizers without a range yet."""
    return [n for n, q in quantizers(model).items() if not q.is_weight and not q.calibrated]


def calibrate_static(session: Session, entries=None) -> list[str]:
    """Min-max calibrate the qtransformer's uncalibrated static activation quantizers on the calibration cache."""
    if not uncalibrated_static(session.qtransformer):
        return []
    if session.calibration is None:
        raise ValueError(
            "the quant config has static activation ranges but the session has no calibration data: "
            "run collect_calibration(session) first (or use dynamic activations)"
        )
    return calibrate_model(session.qtransformer, session.calibration.runner(session.qtransformer, entries))


def weight_bits(q: QuantLinear) -> float:
    wq = q.weight_quantizer
    return 32.0 if wq is None else float(wq.spec.bits)


def layer_formats(model: nn.Module) -> list[dict[str, Any]]:
    """One row per quantized module: formats, granularity, dynamic / timestep-wise, smoothing, rotation."""
    from workbench.models.adapters import adapter_for, layer_role

    try:
        adapter = adapter_for(model)
    except TypeError:
        adapter = None
    rows = []
    for name, m in quant_modules(model).items():
        if isinstance(m, QuantLinear):
            w, a = m.weight_quantizer, m.input_quantizer
            rows.append({
                "layer": name,
                "kind": "linear",
                "role": layer_role(name, adapter) if adapter else "",
                "params": m.weight.numel(),
                "weight": None if w is None else str(w.spec.format),
                "weight_granularity": None if w is None else w.spec.granularity,
                "act": None if a is None else str(a.spec.format),
                "act_granularity": None if a is None else a.spec.granularity,
                "act_dynamic": None if a is None else a.spec.dynamic,
                "act_timestep_wise": None if a is None else a.spec.timestep_wise,
                "act_observer": None if a is None or a.spec.dynamic else a.spec.observer,
                "smooth": m.smooth is not None,
                "rotation": m.rotation is not None,
                "w_bits": weight_bits(m),
                "a_bits": 32 if a is None else a.spec.bits,
            })
        elif isinstance(m, QuantAttention):
            parts = {p: (None if q is None else str(q.spec.format)) for p, q in
                     (("q", m.q_quantizer), ("k", m.k_quantizer), ("v", m.v_quantizer), ("p", m.p_quantizer))}
            rows.append({"layer": name, "kind": "attention", **parts})
    return rows


def weight_budget(model: nn.Module) -> dict[str, float]:
    """Average weight bits (parameter weighted) over quantized linears and weight megabytes of the model
    (quantized linears at their bits plus an fp16 scale per output channel, everything else fp32)."""
    quantized = quantized_linears(model, weight_quantized=True)
    shared = {id(m.weight) for m in quantized.values()}
    q_params = sum(m.weight.numel() for m in quantized.values())
    q_bits = sum(m.weight.numel() * weight_bits(m) for m in quantized.values())
    scale_bytes = sum(m.out_features * 2 for m in quantized.values())
    other = sum(p.numel() * p.element_size() for p in model.parameters() if id(p) not in shared)
    total_fp = sum(p.numel() * p.element_size() for p in model.parameters())
    return {
        "avg_weight_bits": q_bits / q_params if q_params else 32.0,
        "quantized_params": float(q_params),
        "weight_mb": (q_bits / 8 + scale_bytes + other) / 2**20,
        "fp_weight_mb": total_fp / 2**20,
    }


@stage(PTQSettings, figures=ptq_figures)
def apply_quantization(session: Session, settings: PTQSettings | None = None) -> StageReport:
    """Quantize `session.qtransformer` in place per the quant config (see module docstring)."""
    s = settings or PTQSettings()
    t0 = time.perf_counter()
    quant = s.quant if s.quant is not None else (session.recipe or {}).get("recipe", {}).get("quant")
    config = build_config(quant, session.qtransformer, s.keep_fp_roles)
    done = quantize_model(session.qtransformer, config)
    session.quant_config = config
    calibrated = []
    if s.calibrate and uncalibrated_static(session.qtransformer):
        calibrated = calibrate_static(session)
    rows = layer_formats(session.qtransformer)
    all_linears = [n for n, m in session.qtransformer.named_modules() if isinstance(m, (nn.Linear, QuantLinear))]
    budget = weight_budget(session.qtransformer)
    report = StageReport(
        name="apply_quantization",
        settings={**asdict(s), "quant": config.to_dict()},
        summary={
            "quantized_linears": len(done),
            "fp_linears": len(all_linears) - len(done),
            "quantized_attention": sum(r["kind"] == "attention" for r in rows),
            "calibrated_quantizers": len(calibrated),
            **budget,
        },
        tables={"layers": rows, "kept_fp": [{"layer": n} for n in all_linears if n not in done]},
        seconds=time.perf_counter() - t0,
    )
    return session.add(report)

