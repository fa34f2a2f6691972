"""`distill`: the plain distillation stage (block reconstruction of the trainable parts) and the report
helpers the method stages share (one row per unit, loss curves, summary numbers).

    from workbench.stages.distill import DistillSettings, distill
    distill(session, DistillSettings(iters=100, lr=1e-3))          # block reconstruction of weight scales
"""

from __future__ import annotations

import time
from dataclasses import asdict
from typing import Any

from workbench.session import Session
from workbench.stages.distill.loop import DistillResult, run_distillation
from workbench.stages.distill.settings import DistillSettings
from workbench.stages.registry import stage
from workbench.stages.report import StageReport
from workbench.viz.stage_figures import distill_figures


def unit_rows(result: DistillResult) -> list[dict[str, Any]]:
    """One table row per unit: trained, parameters, first / last loss, block error before / after."""
    rows = []
    for r in result.units:
        tot = r.curves.get("total", [])
        rows.append({
            "block": r.unit, "trained": r.trained, "params": r.params, "iterations": len(tot),
            "loss_first": tot[0] if tot else None, "loss_last": tot[-1] if tot else None,
            "err_before": r.err_before, "err_after": r.err_after, "seconds": r.seconds,
        })
    return rows


def curves_of(result: DistillResult, every: int = 1) -> dict[str, Any]:
    """{"total": {unit: [...]}, <term>: {unit: [...]}} (every `every`-th step) for the report arrays."""
    out: dict[str, dict[str, list[float]]] = {}
    for r in result.units:
        for key, ys in r.curves.items():
            out.setdefault(key, {})[r.unit] = ys[::every]
    return out


def distill_summary(result: DistillResult) -> dict[str, float]:
    done = [r for r in result.units if r.err_before is not None and r.err_after is not None and r.trained]
    return {
        "units_trained": sum(r.trained for r in result.units),
        "iterations": sum(len(r.curves.get("total", [])) for r in result.units),
        "trained_params": max([r.params for r in result.units] or [0]),
        "mean_err_before": sum(r.err_before for r in done) / len(done) if done else float("nan"),
        "mean_err_after": sum(r.err_after for r in done) / len(done) if done else float("nan"),
        "resumed": float(result.resumed_from is not None),
        "rows": result.rows,
    }


def result_notes(result: DistillResult) -> list[str]:
    """Report notes every distillation stage gives: where it resumed from, and each trained unit whose error on
    its evaluation rows ended higher than it started (training made it worse: the learning rate is the first
    suspect)."""
    notes = [f"resumed from {result.resumed_from}"] if result.resumed_from else []
    for r in result.units:
        if r.trained and r.err_before is not None and r.err_after is not None and r.err_after > r.err_before:
            notes.append(f"{r.unit}: error on the evaluation rows rose from {r.err_before:.4g} to {r.err_after:.4g} "
                         "during training; lower the learning rate (lr, scale_lr) or check the calibration rows")
    return notes


@stage(DistillSettings, figures=distill_figures)
def distill(session: Session, settings: DistillSettings | None = None) -> StageReport:
    """Block-wise (or end-to-end) reconstruction of the quantized transformer's trainable parts."""
    s = settings or DistillSettings()
    t0 = time.perf_counter()
    result = run_distillation(session, s, name="distill")
    notes = result_notes(result)
    report = StageReport(
        name="distill", settings=asdict(s), summary=distill_summary(result),
        tables={"blocks": unit_rows(result)}, arrays={"curves": curves_of(result)}, notes=notes,
        seconds=time.perf_counter() - t0,
    )
    return session.add(report)


__all__ = ["curves_of", "distill", "distill_summary", "result_notes", "unit_rows"]
