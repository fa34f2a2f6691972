from __future__ import annotations

import plotly.graph_objects as go

from workbench.stages import StageReport
from workbench.viz import figures_for, grouped_bars, heatmap, lines, scatter


def test_building_blocks():
    rows = [{"layer": "blocks.0.attn1.to_q", "a": 1.0, "b": 2.0, "role": "attn.q"},
            {"layer": "blocks.0.ffn.net.2", "a": 3.0, "b": None, "role": "ff.down"}]
    figs = [grouped_bars(rows, "layer", ["a", "b"], "t", log=True), lines({"x": [1, 2]}, [0, 1], "t"),
            heatmap([[1, 2], [3, 4]], None, ["r0", "r1"], "t"), scatter(rows, "a", "b", "layer", "t", color="a")]
    assert all(isinstance(f, go.Figure) for f in figs)
    assert figs[0].data[0].x[0] == "b0.attn1.to_q"  # names shortened for the axis


def test_unknown_stage_draws_its_tables():
    r = StageReport("my_stage", tables={"t": [{"a": 1, "b": 0.5}], "empty": []})
    figs = figures_for(r)
    assert len(figs) == 1 and isinstance(figs[0], go.Figure)


def test_empty_reports_draw_nothing():
    for name in ("collect_calibration", "analyze_error_sources", "apply_quantization", "calibrate_ranges",
                 "assign_mixed_precision"):
        assert figures_for(StageReport(name)) == []
