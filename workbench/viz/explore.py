"""Drill into one layer at one timestep: where inside its input the quantization error sits.

    from workbench.viz.explore import layer_snapshot, snapshot_figures, layer_explorer
    snap = layer_snapshot(session, "blocks.2.ffn.net.2", timestep_index=0)
    figs = snapshot_figures(snap, bits=8)     # plotly: |x| heatmap, per-channel and per-token errors
    layer_explorer(session)                   # ipywidgets: pick a layer, a timestep and bits; figures redraw
    layer_error_figure(comparison.layer_errors)   # per-layer output error of FP vs quantized (workbench.eval.compare)

`analyze_error_sources` summarises each layer and timestep in a few numbers; this module keeps the whole
(token x channel) input of one layer at one calibration timestep and fake-quantizes it three ways:
one range for the whole tensor (naive static PTQ at its best: the range of this very timestep), one range
per token (ViDiT-Q's dynamic token-wise quantization) and one range per input channel (what channel
balancing approximates; no integer GEMM can use it directly). The figures show which channels carry
outliers and which tokens, laid out as frames x positions of the video, lose most of the layer output.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from workbench.quant.formats import QuantFormat, fake_quant, scale_zero_from_range
from workbench.viz.charts import short_name

STRATEGIES = ("tensor", "token", "channel")


@dataclass
class LayerSnapshot:
    """One layer's input at one calibration call (one batch row) and the layer's weights."""

    layer: str
    timestep: float
    x: torch.Tensor  # (tokens, in_features)
    weight: torch.Tensor  # (out_features, in_features)
    bias: torch.Tensor | None
    grid: tuple[int, int, int] | None  # (frames, rows, cols) of video tokens, when the tokens are video patches


@torch.no_grad()
def layer_snapshot(session, layer: str, timestep_index: int = 0, row: int = 0) -> LayerSnapshot:
    """Replay one calibration call (the `timestep_index`-th recorded timestep, noisiest first) through the FP
    transformer and keep `layer`'s input for batch row `row` (row 0: a conditional call)."""
    from workbench.models.adapters import token_grid
    from workbench.stages.calibration import capturing_inputs, hidden_states_of

    cal = session.calibration
    if cal is None or not cal.entries:
        raise ValueError("no calibration data: run collect_calibration(session) first")
    timesteps = cal.timesteps
    if not 0 <= timestep_index < len(timesteps):
        raise ValueError(f"timestep_index must be in 0..{len(timesteps) - 1}, got {timestep_index}")
    fp = session.fp_transformer
    try:
        lin = fp.get_submodule(layer)
    except AttributeError:
        raise ValueError(f"no layer {layer!r} in the transformer") from None
    entry = next(e for e in cal.entries if e.timestep == timesteps[timestep_index])
    seen: dict[str, torch.Tensor] = {}
    with capturing_inputs(fp, [layer], lambda n, x, out: seen.setdefault(n, x.detach().float().cpu())):
        cal.replay(fp, [entry])
    x = seen[layer]
    x = x[min(row, x.shape[0] - 1)] if x.dim() == 3 else x.reshape(-1, x.shape[-1])
    bias = None if lin.bias is None else lin.bias.detach().float()
    grid = token_grid(fp, tuple(hidden_states_of(entry).shape))
    if grid is not None and grid[0] * grid[1] * grid[2] != x.shape[0]:
        grid = None  # the layer's tokens are not the video patches (e.g. text tokens of a cross-attention)
    return LayerSnapshot(layer, float(entry.timestep), x, lin.weight.detach().float(), bias, grid)


def fake_quantize(x: torch.Tensor, strategy: str, bits: int = 8) -> torch.Tensor:
    """x (tokens, channels) through an asymmetric `bits`-bit grid with one min-max range per tensor, token or channel."""
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown strategy {strategy!r}; choose one of {list(STRATEGIES)}")
    fmt = QuantFormat("int", bits, symmetric=False)
    if strategy == "tensor":
        lo, hi = x.min(), x.max()
    else:
        dim = 1 if strategy == "token" else 0
        lo, hi = x.amin(dim, keepdim=True), x.amax(dim, keepdim=True)
    scale, zero = scale_zero_from_range(lo, hi, fmt)
    return fake_quant(x, scale, zero, fmt)


def quantization_errors(snap: LayerSnapshot, bits: int = 8) -> dict[str, dict[str, torch.Tensor]]:
    """Per strategy: `token` (relative error of each token's layer output), `channel` (relative error of each
    input channel, against its max |x|) and `total` (relative MSE of the whole layer output)."""
    y = F.linear(snap.x, snap.weight, snap.bias)
    out = {}
    for s in STRATEGIES:
        xq = fake_quantize(snap.x, s, bits)
        yq = F.linear(xq, snap.weight, snap.bias)
        out[s] = {
            "token": (yq - y).norm(dim=1) / y.norm(dim=1).clamp_min(1e-12),
            "channel": (xq - snap.x).abs().mean(0) / snap.x.abs().amax(0).clamp_min(1e-12),
            "total": (yq - y).pow(2).sum() / y.pow(2).sum().clamp_min(1e-12),
        }
    return out


def snapshot_figures(snap: LayerSnapshot, bits: int = 8) -> list:
    """Four plotly figures: |x| per frame (or token) and channel; per-channel max |x| with the channel error;
    per-token output error of the three strategies; the per-tensor strategy's token error on the video's
    frames x positions. Figures stay small (a few thousand values) so live widgets redraw them quickly."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    errs = quantization_errors(snap, bits)
    where = f"{snap.layer} at t={snap.timestep:.0f}"
    layout = dict(template="plotly_white", height=380, margin=dict(l=60, r=20, t=60, b=50))
    figs = []

    if snap.grid is not None:  # tokens grouped by frame keeps the figure small enough for a live widget
        z = snap.x.abs().reshape(snap.grid[0], -1, snap.x.shape[1]).amax(1)
        rows, rows_title = [f"frame {i}" for i in range(snap.grid[0])], "frame (max over its tokens)"
    else:
        z, rows, rows_title = snap.x.abs(), None, "token"
    fig = go.Figure(go.Heatmap(z=z.numpy(), y=rows, colorscale="Viridis", colorbar=dict(title="|x|")))
    fig.update_layout(title=f"Input of {where}: |x| per {rows_title.split(' ')[0]} (rows) and channel (columns)",
                      xaxis_title="input channel", yaxis_title=rows_title, **layout)
    figs.append(fig)

    fig = make_subplots(specs=[[{"secondary_y": True}]])
    fig.add_bar(x=list(range(snap.x.shape[1])), y=snap.x.abs().amax(0).tolist(), name="max |x| of the channel",
                marker_color="lightgray")
    for s in STRATEGIES:
        fig.add_scatter(x=list(range(snap.x.shape[1])), y=errs[s]["channel"].tolist(), mode="lines",
                        name=f"error, one range per {s}", secondary_y=True)
    fig.update_yaxes(title_text="max |x|", secondary_y=False)
    fig.update_yaxes(title_text="mean |error| / max |x|", type="log", secondary_y=True)
    fig.update_layout(title=f"Per-channel outliers and int{bits} input error, {where}", xaxis_title="input channel", **layout)
    figs.append(fig)

    fig = go.Figure()
    for s in STRATEGIES:
        fig.add_scatter(y=errs[s]["token"].tolist(), mode="lines",
                        name=f"one range per {s} (layer rel. MSE {float(errs[s]['total']):.2e})")
    fig.update_layout(title=f"Per-token output error of int{bits} activations, {where}", xaxis_title="token",
                      yaxis_title="|y_q - y| / |y| of the token", yaxis_type="log", **layout)
    figs.append(fig)

    if snap.grid is not None:
        f, h, w = snap.grid
        z = errs["tensor"]["token"].reshape(f, h * w).numpy()
        fig = go.Figure(go.Heatmap(z=z, colorscale="Reds", colorbar=dict(title="rel. error"),
                                   x=[f"r{i // w}c{i % w}" for i in range(h * w)], y=[f"frame {i}" for i in range(f)]))
        fig.update_layout(title=f"Where in the video: per-token output error, one int{bits} range per tensor, {where}",
                          xaxis_title="patch position (row, column)", yaxis_title="frame", **layout)
        figs.append(fig)
    return figs


def figure(report, title_part: str):
    """The figure of a stage report whose title contains `title_part` (an error lists the titles there are)."""
    figs = report.figures()
    for fig in figs:
        if title_part.lower() in (fig.layout.title.text or "").lower():
            return fig
    raise KeyError(f"no figure of {report.name} has {title_part!r} in its title; titles: "
                   f"{[f.layout.title.text for f in figs]}")


def block_layers(session) -> list[str]:
    """The linear layers inside the transformer blocks (the ones recipes quantize), in network order."""
    from workbench.models.adapters import named_transformer_blocks
    from workbench.stages.layer_groups import block_of
    from workbench.stages.calibration import quantizable_layers

    blocks = [n for n, _ in named_transformer_blocks(session.fp_transformer, session.adapter)]
    return [n for n in quantizable_layers(session) if block_of(n, blocks)]


def layer_explorer(session, report=None, layers: list[str] | None = None, bits: int = 8):
    """ipywidgets: a layer dropdown, a timestep slider and a bits slider above `snapshot_figures` (redrawn on change).

    layers: the choices (default: the block layers); with an `analyze_error_sources` report, the layer whose
    own quantization hurts the final output most is picked first. Snapshots are cached, so going back to a
    layer and timestep is instant."""
    import ipywidgets as widgets

    layers = layers or block_layers(session)
    first = layers[0]
    if report is not None and report.tables.get("layer_errors"):
        ranked = [r["layer"] for r in sorted(report.tables["layer_errors"], key=lambda r: -r["output_rel_mse"])]
        first = next((n for n in ranked if n in layers), first)
    timesteps = session.calibration.timesteps
    layer_w = widgets.Dropdown(options=layers, value=first, description="layer", layout=widgets.Layout(width="420px"))
    t_w = widgets.SelectionSlider(options=[(f"{t:.0f}", i) for i, t in enumerate(timesteps)], value=0,
                                  description="timestep", continuous_update=False)
    bits_w = widgets.IntSlider(value=bits, min=2, max=8, description="act bits", continuous_update=False)
    controls = widgets.HBox([layer_w, t_w, bits_w])
    cache: dict[tuple[str, int], LayerSnapshot] = {}

    def figures() -> list:
        # plotly FigureWidgets (not an Output widget): they redraw in place and execute headless (nbmake) too
        import plotly.graph_objects as go

        key = (layer_w.value, t_w.value)
        if key not in cache:
            cache[key] = layer_snapshot(session, *key)
        return [go.FigureWidget(f) for f in snapshot_figures(cache[key], bits_w.value)]

    box = widgets.VBox([controls, *figures()])

    def redraw(_change=None) -> None:
        box.children = [controls, *figures()]

    for w in (layer_w, t_w, bits_w):
        w.observe(redraw, names="value")
    return box


def layer_error_figure(rows: list[dict], title: str = "Per-layer output error, quantized vs FP"):
    """Bar chart of `workbench.eval.compare.layer_output_errors` rows, in network order."""
    import plotly.graph_objects as go

    fig = go.Figure()
    order = [short_name(r["layer"]) for r in rows]
    for quantized, label in ((True, "quantized layer"), (False, "kept in full precision")):
        sub = [r for r in rows if bool(r.get("quantized", True)) == quantized]
        if sub:
            fig.add_bar(x=[short_name(r["layer"]) for r in sub], y=[r["relative_error"] for r in sub], name=label)
    fig.update_xaxes(categoryorder="array", categoryarray=order)
    fig.update_layout(title=title, xaxis_title="linear layer (network order)", yaxis_title="relative L2 error of its output",
                      xaxis_tickangle=-60, height=420, margin=dict(b=120), template="plotly_white",
                      legend=dict(orientation="h", y=1.08))
    return fig
