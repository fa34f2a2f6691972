"""Plotly figures drawn from stage reports' plain data (tables are lists of dicts, arrays nested lists).

Building blocks (`bar`, `grouped_bars`, `lines`, `heatmap`, `scatter`) and one function per stage
report turning its tables into figures a person can scan (AIMET QuantAnalyzer style): per-layer bars
in module order, per-timestep lines, per-token heatmaps, the content-vs-temporal damage scatter.
"""

from __future__ import annotations

from typing import Any, Iterable

import plotly.graph_objects as go

LAYOUT = dict(template="plotly_white", margin=dict(l=60, r=20, t=50, b=120), height=420)


def _short(name: str) -> str:
    return name.replace("blocks.", "b").replace(".to_out.0", ".out").replace(".net.0.proj", ".up").replace(".net.2", ".down")


def _num(v: Any) -> float | None:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None


def bar(rows: list[dict], x: str, y: str, title: str, color: str | None = None, log: bool = False,
        ytitle: str | None = None) -> go.Figure:
    """One bar per row (x labels shortened), optionally coloured by a categorical column."""
    fig = go.Figure()
    if color is None:
        fig.add_bar(x=[_short(str(r[x])) for r in rows], y=[_num(r.get(y)) for r in rows], name=y)
    else:
        for c in dict.fromkeys(r.get(color) for r in rows):
            sub = [r for r in rows if r.get(color) == c]
            fig.add_bar(x=[_short(str(r[x])) for r in sub], y=[_num(r.get(y)) for r in sub], name=str(c))
        fig.update_xaxes(categoryorder="array", categoryarray=[_short(str(r[x])) for r in rows])
    fig.update_layout(title=title, yaxis_title=ytitle or y, yaxis_type="log" if log else "linear", **LAYOUT)
    return fig


def grouped_bars(rows: list[dict], x: str, ys: Iterable[str], title: str, log: bool = False,
                 ytitle: str | None = None) -> go.Figure:
    """Several columns side by side per row."""
    fig = go.Figure()
    for y in ys:
        fig.add_bar(x=[_short(str(r[x])) for r in rows], y=[_num(r.get(y)) for r in rows], name=y)
    fig.update_layout(title=title, barmode="group", yaxis_title=ytitle or "", yaxis_type="log" if log else "linear", **LAYOUT)
    return fig


def lines(series: dict[str, list[float]], x: list[float] | None, title: str, xtitle: str = "", ytitle: str = "",
          log: bool = False) -> go.Figure:
    """One line per named series."""
    fig = go.Figure()
    for name, ys in series.items():
        fig.add_scatter(x=x if x is not None else list(range(len(ys))), y=ys, mode="lines+markers", name=_short(name))
    fig.update_layout(title=title, xaxis_title=xtitle, yaxis_title=ytitle, yaxis_type="log" if log else "linear", **LAYOUT)
    return fig


def heatmap(z: list[list[float]], x: list | None, y: list, title: str, xtitle: str = "", ytitle: str = "",
            colorscale: str = "Viridis") -> go.Figure:
    fig = go.Figure(go.Heatmap(z=z, x=x, y=[_short(str(v)) for v in y], colorscale=colorscale))
    fig.update_layout(title=title, xaxis_title=xtitle, yaxis_title=ytitle, **LAYOUT)
    return fig


def scatter(rows: list[dict], x: str, y: str, label: str, title: str, color: str | None = None) -> go.Figure:
    fig = go.Figure()
    fig.add_scatter(
        x=[_num(r.get(x)) for r in rows], y=[_num(r.get(y)) for r in rows], mode="markers+text",
        text=[_short(str(r[label])) for r in rows], textposition="top center",
        marker=dict(size=10, color=[_num(r.get(color)) for r in rows] if color else None,
                    colorscale="Reds", showscale=bool(color)),
    )
    fig.update_layout(title=title, xaxis_title=x, yaxis_title=y, **LAYOUT)
    return fig


def table_figure(rows: list[dict], title: str, max_rows: int = 60) -> go.Figure:
    """A plain table (for reports without a better picture)."""
    cols = list(dict.fromkeys(k for r in rows for k in r)) or ["(empty)"]

    def fmt(v: Any) -> str:
        return f"{v:.4g}" if isinstance(v, float) else str(v)

    fig = go.Figure(go.Table(header=dict(values=cols),
                             cells=dict(values=[[fmt(r.get(c, "")) for r in rows[:max_rows]] for c in cols])))
    fig.update_layout(title=title, **LAYOUT)
    return fig


# ----------------------------------------------------------------------------------------------------
# one drawing per stage


def calibration_figures(report) -> list[go.Figure]:
    rows = report.tables.get("timesteps", [])
    if not rows:
        return []
    x = [r["timestep"] for r in rows]
    return [lines({"latent std": [r["latent_std"] for r in rows], "latent max |x|": [r["latent_absmax"] for r in rows]},
                  x, "Calibration trajectories: transformer input per timestep", "timestep", "value")]


def analysis_figures(report) -> list[go.Figure]:
    figs: list[go.Figure] = []
    t, a = report.tables, report.arrays
    if "activations" in t:
        rows = t["activations"]
        figs.append(grouped_bars(rows, "layer", ["channel_outlier_ratio", "token_range_ratio", "timestep_ratio"],
                                 "Activation outliers per layer: channel (max/median channel max|x|), token "
                                 "(max/median token range), timestep (max/min max|x|)", log=True, ytitle="ratio"))
        figs.append(grouped_bars(rows, "layer", ["act_err_tensor_static", "act_err_timestep_static", "act_err_token_dynamic"],
                                 f"Layer output error of int{a.get('act_bits', '')} activations: static per tensor vs "
                                 "static per timestep vs dynamic per token", log=True, ytitle="relative MSE"))
        if a.get("act_absmax_per_timestep"):
            figs.append(lines(a["act_absmax_per_timestep"], a.get("timesteps"),
                              "Activation max |x| per timestep (each line a layer)", "timestep", "max |x|", log=True))
        if a.get("act_channel_absmax"):
            top = sorted(rows, key=lambda r: -r["channel_outlier_ratio"])[:4]
            figs.append(lines({r["layer"]: a["act_channel_absmax"][r["layer"]] for r in top}, None,
                              "Per-channel max |x| of the layers with the strongest channel outliers", "input channel", "max |x|"))
        for name, z in (a.get("token_range_map") or {}).items():
            figs.append(heatmap(z, None, [f"t={v:.0f}" for v in a.get("timesteps", range(len(z)))],
                                f"Per-token activation range of {name} (rows: timesteps)", "token", "timestep"))
    if "weights" in t:
        rows = t["weights"]
        figs.append(grouped_bars(rows, "layer", ["out_channel_outlier_ratio", "in_channel_outlier_ratio"],
                                 "Weight outliers per layer (max/median channel max|w|)", ytitle="ratio"))
        figs.append(grouped_bars(rows, "layer", ["weight_err_tensor", "weight_err_channel"],
                                 "Weight quantization error: per tensor vs per channel", log=True, ytitle="relative MSE"))
        figs.append(bar(rows, "layer", "kurtosis", "Weight excess kurtosis per layer", color="role"))
    if "layer_errors" in t:
        rows = t["layer_errors"]
        figs.append(bar(rows, "layer", "output_rel_mse", "Final-output error with each layer quantized alone",
                        color="role", log=True, ytitle="relative MSE vs FP"))
        per_t = a.get("output_error_per_timestep") or {}
        if per_t:
            names = [r["layer"] for r in rows]
            figs.append(heatmap([per_t[n] for n in names if n in per_t], [f"t={v:.0f}" for v in a.get("error_timesteps", [])],
                                [n for n in names if n in per_t], "Final-output error per timestep, each layer alone",
                                "timestep", "layer", "Reds"))
    if "sensitivity" in t:
        rows = t["sensitivity"]
        figs.append(scatter(rows, "content_drop", "temporal_damage", "group",
                            "Metric-decoupled sensitivity: content vs temporal damage per group", color="psnr_vs_fp"))
        figs.append(grouped_bars(rows, "group", ["content_rank", "temporal_rank"],
                                 "Content and temporal sensitivity ranks per group (1 = most sensitive)", ytitle="rank"))
        figs.append(bar(rows, "group", "psnr_vs_fp", "PSNR vs FP with each group quantized alone", ytitle="dB"))
    return figs


def ptq_figures(report) -> list[go.Figure]:
    rows = [r for r in report.tables.get("layers", []) if r.get("kind") == "linear"]
    if not rows:
        return []
    return [grouped_bars(rows, "layer", ["w_bits", "a_bits"], "Bit-widths per quantized layer", ytitle="bits")]


def ranges_figures(report) -> list[go.Figure]:
    figs = []
    t = report.tables
    if t.get("layer_errors"):
        figs.append(grouped_bars(t["layer_errors"], "layer", ["err_before", "err_after"],
                                 "Layer output error before / after channel balancing and range calibration",
                                 log=True, ytitle="relative MSE"))
    if t.get("ranges"):
        figs.append(grouped_bars(t["ranges"], "layer", ["observed_lo", "range_lo", "range_hi", "observed_hi"],
                                 "Static activation ranges: observed vs chosen", ytitle="value"))
        figs.append(bar(t["ranges"], "layer", "clip_ratio", "Clipping ratio (chosen / observed range)"))
    if t.get("observers"):
        figs.append(grouped_bars(t["observers"], "layer", ["err_minmax", "err_percentile", "err_mse"],
                                 "Observers compared: layer output error", log=True, ytitle="relative MSE"))
    buckets = report.arrays.get("bucket_ranges") or {}
    if buckets:
        figs.append(lines({n: [hi - lo for lo, hi in v] for n, v in buckets.items()}, None,
                          "Timestep-wise static ranges (width per bucket)", "timestep bucket", "range width"))
    return figs


def mixed_precision_figures(report) -> list[go.Figure]:
    rows = report.tables.get("assignment", [])
    figs = []
    if rows:
        figs.append(bar(rows, "layer", "w_bits", "Mixed precision: weight bits per layer", color="upgraded", ytitle="bits"))
    if report.tables.get("units"):
        figs.append(bar(report.tables["units"], "unit", "rank", "Units by sensitivity rank (chosen ones upgraded)", color="chosen"))
    return figs


def generic_figures(report) -> list[go.Figure]:
    return [table_figure(rows, f"{report.name}: {name}") for name, rows in report.tables.items() if rows]
