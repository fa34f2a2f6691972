"""Plotly figures for stage reports: `figures_for(report)` draws any StageReport from its plain data."""

from __future__ import annotations

from workbench.viz.figures import (
    analysis_figures,
    bar,
    calibration_figures,
    generic_figures,
    grouped_bars,
    heatmap,
    lines,
    mixed_precision_figures,
    ptq_figures,
    ranges_figures,
    scatter,
    table_figure,
)

DRAWINGS = {
    "collect_calibration": calibration_figures,
    "analyze_error_sources": analysis_figures,
    "apply_quantization": ptq_figures,
    "calibrate_ranges": ranges_figures,
    "assign_mixed_precision": mixed_precision_figures,
}


def figures_for(report) -> list:
    """Plotly figures of a StageReport: its stage's drawing, or tables for stages without one."""
    return DRAWINGS.get(report.name, generic_figures)(report)


__all__ = [
    "DRAWINGS", "analysis_figures", "bar", "calibration_figures", "figures_for", "generic_figures", "grouped_bars",
    "heatmap", "lines", "mixed_precision_figures", "ptq_figures", "ranges_figures", "scatter", "table_figure",
]
