"""Plotly figures and the HTML pages: building blocks (`charts`), one drawing per stage (`stage_figures`,
named by each stage's `@stage(...)`), the layer explorer of the notebooks (`explore`) and the self-contained
HTML report (`html`). `figures_for(report)` draws any StageReport from its plain data."""

from __future__ import annotations

from workbench.viz.charts import bar, grouped_bars, heatmap, lines, scatter, short_name, table_figure


def figures_for(report) -> list:
    """Plotly figures of a StageReport: its stage's drawing (from the stage registry), else its tables."""
    from workbench.stages import STAGES
    from workbench.viz.stage_figures import generic_figures

    info = STAGES.get(report.name)
    draw = info.figures if info is not None and info.figures is not None else generic_figures
    return draw(report)


__all__ = ["bar", "figures_for", "grouped_bars", "heatmap", "lines", "scatter", "short_name", "table_figure"]
