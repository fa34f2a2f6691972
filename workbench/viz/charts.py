"""Plotly building blocks drawn from plain data (tables are lists of dicts, arrays nested lists): `bar`,
`grouped_bars`, `lines`, `heatmap`, `scatter`, `table_figure`, with layer names shortened for axes
(AIMET QuantAnalyzer style: per-layer bars in module order, per-timestep lines, per-token heatmaps)."""

from __future__ import annotations

from typing import Any, Iterable

import plotly.graph_objects as go

LAYOUT = dict(template="plotly_white", margin=dict(l=60, r=20, t=50, b=120), height=420)


def short_name(name: str) -> str:
    """A layer name short enough for an axis label (blocks.3.attn1.to_out.0 -> b3.attn1.out)."""
    return (name.replace("blocks.", "b").replace("condition_embedder.", "cond.").replace(".to_out.0", ".out")
            .replace(".net.0.proj", ".up").replace(".net.2", ".down"))


def _num(v: Any) -> float | None:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None


def bar(rows: list[dict], x: str, y: str, title: str, color: str | None = None, log: bool = False,
        ytitle: str | None = None) -> go.Figure:
    """One bar per row (x labels shortened), optionally coloured by a categorical column."""
    fig = go.Figure()
    if color is None:
        fig.add_bar(x=[short_name(str(r[x])) for r in rows], y=[_num(r.get(y)) for r in rows], name=y)
    else:
        for c in dict.fromkeys(r.get(color) for r in rows):
            sub = [r for r in rows if r.get(color) == c]
            fig.add_bar(x=[short_name(str(r[x])) for r in sub], y=[_num(r.get(y)) for r in sub], name=str(c))
        fig.update_xaxes(categoryorder="array", categoryarray=[short_name(str(r[x])) for r in rows])
    fig.update_layout(title=title, yaxis_title=ytitle or y, yaxis_type="log" if log else "linear", **LAYOUT)
    return fig


def grouped_bars(rows: list[dict], x: str, ys: Iterable[str], title: str, log: bool = False,
                 ytitle: str | None = None) -> go.Figure:
    """Several columns side by side per row."""
    fig = go.Figure()
    for y in ys:
        fig.add_bar(x=[short_name(str(r[x])) for r in rows], y=[_num(r.get(y)) for r in rows], name=y)
    fig.update_layout(title=title, barmode="group", yaxis_title=ytitle or "", yaxis_type="log" if log else "linear", **LAYOUT)
    return fig


def lines(series: dict[str, list[float]], x: list[float] | None, title: str, xtitle: str = "", ytitle: str = "",
          log: bool = False) -> go.Figure:
    """One line per named series."""
    fig = go.Figure()
    for name, ys in series.items():
        fig.add_scatter(x=x if x is not None else list(range(len(ys))), y=ys, mode="lines+markers", name=short_name(name))
    fig.update_layout(title=title, xaxis_title=xtitle, yaxis_title=ytitle, yaxis_type="log" if log else "linear", **LAYOUT)
    return fig


def heatmap(z: list[list[float]], x: list | None, y: list, title: str, xtitle: str = "", ytitle: str = "",
            colorscale: str = "Viridis") -> go.Figure:
    fig = go.Figure(go.Heatmap(z=z, x=x, y=[short_name(str(v)) for v in y], colorscale=colorscale))
    fig.update_layout(title=title, xaxis_title=xtitle, yaxis_title=ytitle, **LAYOUT)
    return fig


def scatter(rows: list[dict], x: str, y: str, label: str, title: str, color: str | None = None) -> go.Figure:
    fig = go.Figure()
    fig.add_scatter(
        x=[_num(r.get(x)) for r in rows], y=[_num(r.get(y)) for r in rows], mode="markers+text",
        text=[short_name(str(r[label])) for r in rows], textposition="top center",
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
