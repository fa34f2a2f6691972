"""One drawing per stage: `fn(report) -> list of plotly figures`, drawn from the report's plain data only
(so a report read back from reports.json draws the same figures). Stages name theirs in `@stage(...)`."""

from __future__ import annotations

import plotly.graph_objects as go

from workbench.viz.charts import LAYOUT, bar, grouped_bars, heatmap, lines, scatter, table_figure




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


def attention_kernel_figures(report) -> list[go.Figure]:
    """Per attention module: relative error of fp8 and fp16 P.V against full precision, the tolerance, the choice."""
    rows = report.tables.get("modules", [])
    if not rows:
        return []
    fig = grouped_bars(rows, "module", ["err_fp8", "err_fp16"],
                       "Quantized attention: error vs full precision per module (choice in the table)",
                       ytitle="relative error")
    fig.add_hline(y=report.settings["tolerance"], line_dash="dash", annotation_text="tolerance")
    return [fig, table_figure(rows, "Attention kernel per module")]


def generic_figures(report) -> list[go.Figure]:
    return [table_figure(rows, f"{report.name}: {name}") for name, rows in report.tables.items() if rows]


def distill_figures(report) -> list:  # noqa: ANN001
    """Loss curves per block and term, block error before / after training."""

    figs = []
    curves = report.arrays.get("curves") or {}
    for key in ["total", "rec"] + [k for k in curves if k not in ("total", "rec")]:
        series = {u: ys for u, ys in (curves.get(key) or {}).items() if ys}
        if series:
            figs.append(lines(series, None, f"{report.name}: {key} loss per iteration (one line per block)",
                              "iteration", "loss", log=key in ("total", "rec")))
    rows = [r for r in report.tables.get("blocks", []) if r.get("err_before") is not None]
    if rows:
        figs.append(grouped_bars(rows, "block", ["err_before", "err_after"],
                                 f"{report.name}: block output error vs FP before / after training",
                                 log=True, ytitle="relative MSE"))
    return figs


def qvdit_figures(report) -> list:  # noqa: ANN001
    """Distillation curves, TQE magnitude per layer, token scales, frame-similarity matrices."""

    figs = distill_figures(report)
    rows = report.tables.get("tqe") or []
    if rows:
        figs.append(grouped_bars(rows, "layer", ["inner_rel", "branch_rel"],
                                 "TQE magnitude per layer: in-quantizer estimate ||BA||/||W|| and token branch",
                                 log=True, ytitle="relative to ||W||"))
    scales = report.arrays.get("token_scales") or {}
    if scales:
        names = list(scales)
        figs.append(heatmap([scales[n] for n in names], None, names,
                            "TQE token scales per layer (columns: frames or tokens)", "frame / token", "layer", "RdBu"))
    sims = report.arrays.get("frame_similarity") or {}
    for key, title in (("fp", "FP"), ("before", "quantized before Q-VDiT"), ("after", "quantized after Q-VDiT")):
        if sims.get(key) is not None:
            figs.append(heatmap(sims[key], None, list(range(len(sims[key]))),
                                f"Frame-to-frame cosine similarity of the output: {title}", "frame", "frame"))
    if sims.get("fp") is not None and sims.get("after") is not None:
        for key in ("before", "after"):
            diff = [[a - b for a, b in zip(ra, rb)] for ra, rb in zip(sims[key], sims["fp"])]
            figs.append(heatmap(diff, None, list(range(len(diff))),
                                f"Frame similarity error ({key} - FP)", "frame", "frame", "RdBu"))
    return figs


def mpq_figures(report) -> list:  # noqa: ANN001
    """Distillation curves and the weight error per layer: plain, + residual, + LoRA init, trained."""

    figs = distill_figures(report)
    rows = report.tables.get("weights") or []
    if rows:
        cols = [c for c in ("err_plain", "err_residual", "err_lora_init", "err_trained") if any(r.get(c) is not None for r in rows)]
        figs.append(grouped_bars(rows, "layer", cols, "Weight reconstruction error per layer: Q(W), + binary residual, "
                                 "+ LoRA initialised from the error, after training", log=True, ytitle="||W - W_hat||^2 / ||W||^2"))
        if any(r.get("salient_share") is not None for r in rows):
            figs.append(bar(rows, "layer", "salient_share", "Share of salient weights in the binary residual branch"))
    return figs


def _frames_side_by_side(vol: list) -> list[list[float | None]]:
    """(F, H, W) nested lists -> H rows of the F frames side by side, one empty column between frames."""
    rows = []
    for h in range(len(vol[0])):
        row: list[float | None] = []
        for f, frame in enumerate(vol):
            if f:
                row.append(None)
            row.extend(frame[h])
        rows.append(row)
    return rows


def selection_figures(report) -> list:  # noqa: ANN001

    figs = []
    a = report.arrays
    ts = a.get("timesteps")
    if a.get("per_timestep"):
        figs.append(lines(a["per_timestep"], ts, "Salience per timestep (mean over prompts)", "timestep", "salience"))
    for name in ("score", "diffusion", "quantization"):
        z = (a.get("grids") or {}).get(name)
        if z:
            figs.append(heatmap(z, [f"t={t:.0f}" for t in ts], [f"prompt {p}" for p in a.get("prompts", [])],
                                f"{name} salience per prompt and timestep", "timestep", "prompt", "Viridis"))
    sel = [r for r in report.tables.get("candidates", [])]
    if sel:
        import plotly.graph_objects as go

        fig = go.Figure()
        for chosen in (False, True):
            sub = [r for r in sel if r["selected"] == chosen]
            fig.add_scatter(x=[r["timestep"] for r in sub], y=[r["score"] for r in sub], mode="markers",
                            name="selected" if chosen else "not selected", text=[r["prompt_text"] for r in sub])
        fig.update_layout(title="Salience score of every candidate vs timestep", xaxis_title="timestep",
                          yaxis_title="score", **LAYOUT)
        figs.append(fig)
    if report.tables.get("comparison"):
        figs.append(grouped_bars(report.tables["comparison"], "method", ["output_err_untrained", "output_err_trained"],
                                 "Output error vs FP after a short reconstruction on each selection", log=True,
                                 ytitle="relative MSE"))
    return figs


def sparse_token_figures(report) -> list:  # noqa: ANN001

    figs = distill_figures(report)
    for unit, m in (report.arrays.get("token_maps") or {}).items():
        for key, label in (("mean", "mean over rows"), ("first", "one row")):
            vol = m.get(key)
            if vol:
                figs.append(heatmap(_frames_side_by_side(vol), None, list(range(len(vol[0]))),
                                    f"{unit}: token weights ({label}), frames left to right (height x width each)",
                                    "frame x width", "height", "Viridis"))
    if report.tables.get("token_weights"):
        figs.append(bar(report.tables["token_weights"], "block", "top10_attention_share",
                        "Share of the attention received by the top 10% tokens (sparsity)", ytitle="share"))
    return figs
