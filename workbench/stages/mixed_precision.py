"""`assign_mixed_precision`: per-layer bit-widths under a budget, from the error-source analysis.

ViDiT-Q's metric-decoupled mixed precision: layer groups are ranked twice by how much quantizing them
alone damages generated videos, once for content and once for temporal quality
(`analyze_error_sources(..., sensitivity=True)`); a group sensitive in EITHER sense keeps higher
precision. Here the unit is an analysis group (default: one block's self attention, cross attention or
FFN); `ranking` picks the order:

* "priority": the better of a group's content and temporal rank (the metric-decoupled default);
* "content" / "temporal": one of the two rankings only;
* "output_error": single layers by the final-output error they cause alone (no videos needed).

Units are upgraded from `low_bits` (default: the config's weight bits) to `high_bits` while the budget
allows: an average number of weight bits over the quantized linears (parameter weighted), or total
weight megabytes (`workbench.stages.ptq.weight_budget`). "greedy" walks the ranking and takes every unit
that still fits; "knapsack" maximises the summed value 1/rank under the budget exactly (0/1 knapsack).
The assignment becomes per-layer `Rule`s in `session.quant_config` and is applied with
`quantize_model(..., names=...)`; static activation ranges of re-specced layers are recalibrated.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, replace
from typing import Any

from workbench.quant import QuantLinear, QuantSpec, Rule, quantize_model
from workbench.quant.formats import QuantFormat
from workbench.session import Session
from workbench.stages.ptq import calibrate_static, layer_formats, uncalibrated_static, weight_budget
from workbench.stages.registry import stage
from workbench.stages.report import StageReport
from workbench.viz.stage_figures import mixed_precision_figures

RANKINGS = ("priority", "content", "temporal", "output_error")
METHODS = ("greedy", "knapsack")


@dataclass
class MixedPrecisionSettings:
    """avg_weight_bits / weight_mb: the budget (one of them; avg_weight_bits wins when both are set).
    high_bits: weight bits of the upgraded units; high_act_bits: their activation bits (None: unchanged).
    low_bits: weight bits of every other quantized layer (None: the quant config's).
    ranking / method: see module docstring. recalibrate: re-fix static ranges of re-specced layers."""

    avg_weight_bits: float | None = 5.0
    weight_mb: float | None = None
    high_bits: int = 8
    high_act_bits: int | None = None
    low_bits: int | None = None
    ranking: str = "priority"
    method: str = "greedy"
    recalibrate: bool = True

    def __post_init__(self) -> None:
        if self.ranking not in RANKINGS:
            raise ValueError(f"unknown ranking {self.ranking!r}; choose one of {list(RANKINGS)}")
        if self.method not in METHODS:
            raise ValueError(f"unknown method {self.method!r}; choose one of {list(METHODS)}")
        for name in ("high_bits", "high_act_bits", "low_bits"):
            v = getattr(self, name)
            if v is not None and not 2 <= v <= 8:
                raise ValueError(f"{name} must be a bit-width in 2..8, got {v}")
        if self.avg_weight_bits is None and self.weight_mb is None:
            raise ValueError("give a budget: avg_weight_bits or weight_mb")


def _with_bits(spec: QuantSpec, bits: int) -> QuantSpec:
    f = spec.format
    if f.is_fp8:
        return spec
    return spec.with_(format=QuantFormat(f.kind, bits, f.symmetric))


def _units(session: Session, s: MixedPrecisionSettings, quantized: dict[str, QuantLinear]) -> list[dict[str, Any]]:
    """Ranked units: {"unit", "layers", "rank"} from the latest analysis report."""
    table = "layer_errors" if s.ranking == "output_error" else "sensitivity"
    report = session.last_report("analyze_error_sources", table=table)
    if s.ranking == "output_error":
        if report is None or "layer_errors" not in report.tables:
            raise ValueError("ranking='output_error' needs analyze_error_sources(session, AnalysisSettings(layer_errors=True)) first")
        rows = [r for r in report.tables["layer_errors"] if r["layer"] in quantized]
        return [{"unit": r["layer"], "layers": [r["layer"]], "rank": r["rank"]} for r in rows]
    if report is None or "sensitivity" not in report.tables:
        raise ValueError(
            f"ranking={s.ranking!r} needs the metric-decoupled sensitivity ranking: run "
            "analyze_error_sources(session) (sensitivity=True) first, or use ranking='output_error'"
        )
    key = {"priority": "priority_rank", "content": "content_rank", "temporal": "temporal_rank"}[s.ranking]
    groups = report.arrays["groups"]
    out = []
    for r in report.tables["sensitivity"]:
        layers = [n for n in groups[r["group"]] if n in quantized]
        if layers:
            out.append({"unit": r["group"], "layers": layers, "rank": r[key],
                        "content_rank": r["content_rank"], "temporal_rank": r["temporal_rank"]})
    return out


def _knapsack(costs: list[int], values: list[float], capacity: int) -> set[int]:
    """0/1 knapsack by dynamic programming over (scaled) integer costs; returns chosen indices."""
    scale = max(1, max(costs, default=1) * len(costs) // 20000 + 1)
    c = [max(1, -(-x // scale)) for x in costs]
    cap = capacity // scale
    if cap <= 0:
        return set()
    best = [0.0] * (cap + 1)
    keep = [[False] * (cap + 1) for _ in costs]
    for i, (ci, vi) in enumerate(zip(c, values)):
        for w in range(cap, ci - 1, -1):
            if best[w - ci] + vi > best[w]:
                best[w] = best[w - ci] + vi
                keep[i][w] = True
    chosen, w = set(), cap
    for i in range(len(costs) - 1, -1, -1):
        if keep[i][w]:
            chosen.add(i)
            w -= c[i]
    return chosen


@stage(MixedPrecisionSettings, figures=mixed_precision_figures)
def assign_mixed_precision(session: Session, settings: MixedPrecisionSettings | None = None) -> StageReport:
    """Choose and apply per-layer bit-widths under the budget (module docstring)."""
    s = settings or MixedPrecisionSettings()
    t0 = time.perf_counter()
    config = session.quant_config
    if config is None or config.weight is None:
        raise ValueError("assign_mixed_precision re-specs quantized weights: run apply_quantization(session) first")
    qt = session.qtransformer
    quantized = {n: m for n, m in qt.named_modules() if isinstance(m, QuantLinear) and m.weight_quantizer is not None}
    base_w = config.weight if s.low_bits is None else _with_bits(config.weight, s.low_bits)
    low = base_w.bits
    if s.high_bits <= low:
        raise ValueError(f"high_bits ({s.high_bits}) must exceed the low weight bits ({low})")
    units = sorted(_units(session, s, quantized), key=lambda u: u["rank"])
    params = {n: m.weight.numel() for n, m in quantized.items()}
    total = sum(params.values())
    if s.avg_weight_bits is not None:
        available = int(s.avg_weight_bits * total - low * total)
        budget = {"avg_weight_bits": s.avg_weight_bits}
    else:
        low_mb = weight_budget(qt)["weight_mb"] - sum(params[n] * (q.weight_quantizer.spec.bits - low) for n, q in quantized.items()) / 8 / 2**20
        available = int((s.weight_mb - low_mb) * 2**20 * 8)
        budget = {"weight_mb": s.weight_mb}
    costs = [sum(params[n] for n in u["layers"]) * (s.high_bits - low) for u in units]
    if s.method == "knapsack":
        chosen = _knapsack(costs, [1.0 / u["rank"] for u in units], max(available, 0))
    else:
        chosen, left = set(), available
        for i, c in enumerate(costs):
            if c <= left:
                chosen.add(i)
                left -= c
    upgraded = {n for i in chosen for n in units[i]["layers"]}

    # per-layer rules: earlier exact-name rules of this stage are replaced
    rules = [r for r in config.rules if r.pattern not in params]
    for n in sorted(upgraded):
        act = None
        if s.high_act_bits is not None:
            a_spec = (config.specs_for(n) or (None, None))[1]
            act = None if a_spec is None else _with_bits(a_spec, s.high_act_bits)
        rules.append(Rule(pattern=n, weight=_with_bits(base_w, s.high_bits), act=act))
    new_config = replace(config, weight=base_w, rules=rules)
    names = None if base_w != config.weight else [n for n in params
                                                    if new_config.specs_for(n) != config.specs_for(n)]
    if names is None or names:
        quantize_model(qt, new_config, names=names)
    session.quant_config = new_config
    if s.recalibrate and uncalibrated_static(qt):
        calibrate_static(session)

    formats = {r["layer"]: r for r in layer_formats(qt) if r["kind"] == "linear"}
    unit_of = {n: u["unit"] for u in units for n in u["layers"]}
    assignment = [{
        "layer": n, "unit": unit_of.get(n, ""), "params": params[n],
        "w_bits": formats[n]["w_bits"], "a_bits": formats[n]["a_bits"], "upgraded": n in upgraded,
    } for n in params]
    unit_rows = [{**{k: v for k, v in u.items() if k != "layers"}, "layers": len(u["layers"]), "cost_bits": costs[i],
                  "chosen": i in chosen} for i, u in enumerate(units)]
    achieved = weight_budget(qt)
    session.state["mixed_precision"] = {r["layer"]: {"w_bits": r["w_bits"], "a_bits": r["a_bits"]} for r in assignment}
    report = StageReport(
        name="assign_mixed_precision",
        settings=asdict(s),
        summary={
            **{f"budget_{k}": v for k, v in budget.items()},
            "avg_weight_bits": achieved["avg_weight_bits"],
            "weight_mb": achieved["weight_mb"],
            "fp_weight_mb": achieved["fp_weight_mb"],
            "upgraded_units": float(len(chosen)),
            "upgraded_layers": float(len(upgraded)),
            "units": float(len(units)),
        },
        tables={"assignment": assignment, "units": unit_rows},
        arrays={"assignment": session.state["mixed_precision"]},
        seconds=time.perf_counter() - t0,
    )
    return session.add(report)
