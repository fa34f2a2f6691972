"""`analyze_error_sources`: where quantization error comes from, layer by layer (ViDiT-Q, section 3).

Four measurements, each switchable in `AnalysisSettings`:

1. Activations (`activations`), per quantizable linear layer and per calibration timestep: max |x| per
   input channel, the range (max - min) of every token, the tensor range; summarised as the
   channel outlier ratio (largest / median channel max |x|), the token range ratio (largest / median
   token range) and the timestep ratio (largest / smallest per-timestep max |x|). The same inputs give
   the layer-output error of three ways to quantize them at the probe's activation bits: one static
   per-tensor range for all timesteps (naive PTQ), one static range per timestep (timestep-wise) and
   a dynamic range per token (ViDiT-Q), so the table says which variation hurts.
2. Weights (`weights`): per output channel max |w|, excess kurtosis, output / input channel outlier
   ratios and the weight quantization error per tensor vs per channel.
3. Layer errors (`layer_errors`): every layer quantized ALONE with the probe config (all others in full
   precision), replayed on sampled calibration timesteps: relative MSE of the transformer's final output
   against FP per timestep, and of the layer's own output against its FP output for the same input.
4. Metric-decoupled sensitivity (`sensitivity`), on generated videos as in ViDiT-Q: one layer group at a
   time (default: each block's self attention, cross attention and FFN) is quantized, a small set of
   training-scene prompts is generated with the same seeds as FP, and the damage is measured twice:
   content (oracle colour + shape accuracy drop, ties broken by PSNR vs FP) and temporal (drop of
   temporal consistency plus drop of direction + speed accuracy). Two rankings result; a group's
   priority is its better rank of the two (sensitive in either sense), which `assign_mixed_precision` uses.

The probe config is the settings' `quant` (QuantConfig data), else the session recipe's quant section,
else naive W4A8 (per-channel int4 weights, static per-tensor uint8 activations).
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from workbench.quant import QuantConfig, QuantSpec, Quantizer, calibrate_model, quantize_model
from workbench.quant.formats import fake_quant, scale_zero_from_range
from workbench.models.generator import GenerationSettings
from workbench.session import Session
from workbench.stages.layer_groups import block_of, layer_groups, only_quantized, rel_mse
from workbench.stages.calibration import CalibrationSettings, calibration_prompts, capturing_inputs, collect_calibration
from workbench.stages.ptq import DEFAULT_KEEP_FP_ROLES, build_config, uncalibrated_static
from workbench.stages.registry import stage
from workbench.stages.report import StageReport
from workbench.viz.stage_figures import analysis_figures

NAIVE_PROBE: dict[str, Any] = {
    "weight": {"format": "int4", "granularity": "channel"},
    "act": {"format": "uint8", "granularity": "tensor", "dynamic": False},
}


@dataclass
class AnalysisSettings:
    """What to measure and how much of it (defaults run in a few minutes on the bundled model, 2 CPU cores).

    quant: probe QuantConfig data (None: the recipe's quant section, else naive W4A8).
    timesteps / error_timesteps: calibration timesteps (evenly spaced) used for the activation statistics /
        for the layer errors.
    stat_rows / error_rows: batch rows of each recorded call used for statistics / layer errors
        (with guidance, 2 rows = the conditional and unconditional call of one prompt).
    sample_rows: token rows kept per layer and timestep to estimate quantization errors.
    grouping: layer groups of the sensitivity analysis: "block", "role", "layer" or "block_all".
    prompts / steps / guidance: the generated prompt set of the sensitivity analysis (calibration prompts of
        the model, never its held-out set); frames / height / width: its video size (None: the model's).
    max_groups: analyse only the first groups (None: all).
    top_layers: layers (largest token range ratio) whose per-token range maps are kept for plots.
    """

    quant: dict[str, Any] | None = None
    keep_fp_roles: list[str] = field(default_factory=lambda: list(DEFAULT_KEEP_FP_ROLES))
    activations: bool = True
    weights: bool = True
    layer_errors: bool = True
    sensitivity: bool = True
    timesteps: int = 4
    error_timesteps: int = 3
    stat_rows: int | None = None
    error_rows: int = 2
    sample_rows: int = 256
    calib_rows: int | None = 4
    grouping: str = "block"
    prompts: int = 2
    steps: int = 8
    guidance: float | None = None
    frames: int | None = None
    height: int | None = None
    width: int | None = None
    max_groups: int | None = None
    top_layers: int = 4
    calibration_prompts: int = 4

    def __post_init__(self) -> None:
        if self.timesteps < 1 or self.error_timesteps < 1 or self.prompts < 1 or self.steps < 1 or self.sample_rows < 1:
            raise ValueError("timesteps, prompts, steps and sample_rows must be >= 1")
        self.generation()

    def generation(self) -> GenerationSettings:
        """Sampler settings of the sensitivity videos (and of a calibration this stage collects itself)."""
        return GenerationSettings(steps=self.steps, guidance=self.guidance, frames=self.frames, height=self.height,
                                  width=self.width)


def probe_config(session: Session, s: AnalysisSettings) -> QuantConfig:
    quant = s.quant
    if quant is None:
        quant = (session.recipe or {}).get("recipe", {}).get("quant") or NAIVE_PROBE
    return build_config(quant, session.fp_transformer, s.keep_fp_roles)


@stage(AnalysisSettings, figures=analysis_figures)
def analyze_error_sources(session: Session, settings: AnalysisSettings | None = None) -> StageReport:
    """Measure error sources per layer, timestep, channel and token, and rank layer groups (module docstring)."""
    s = settings or AnalysisSettings()
    t0 = time.perf_counter()
    if session.calibration is None:
        collect_calibration(session, CalibrationSettings(prompts=s.calibration_prompts, steps=s.steps, guidance=s.guidance,
                                                         frames=s.frames, height=s.height, width=s.width))
    fp = session.fp_transformer
    config = probe_config(session, s)
    layers = config.layers_of(fp)
    if not layers:
        raise ValueError("the probe quant config quantizes no linear layer; check its keep_fp / rules")
    from workbench.models.adapters import adapter_for, layer_role, named_transformer_blocks

    adapter = adapter_for(fp)
    blocks = [n for n, _ in named_transformer_blocks(fp, adapter)]
    info = {n: {"layer": n, "role": layer_role(n, adapter), "block": block_of(n, blocks) or ""} for n in layers}
    cal = session.calibration
    tables: dict[str, list[dict]] = {}
    arrays: dict[str, Any] = {}
    summary: dict[str, float] = {"layers": float(len(layers))}
    notes: list[str] = []

    if s.activations or s.weights:
        entries = cal.select(s.timesteps, s.stat_rows)
        arrays["timesteps"] = [e.timestep for e in entries]
    if s.activations:
        rows, arr = _activation_stats(session, layers, entries, config, s)
        tables["activations"] = [{**info[r["layer"]], **r} for r in rows]
        arrays.update(arr)
        summary.update(_activation_summary(rows))
    if s.weights:
        rows, arr = _weight_stats(fp, layers, config)
        tables["weights"] = [{**info[r["layer"]], **r} for r in rows]
        arrays.update(arr)
        summary["max_weight_kurtosis"] = max(r["kurtosis"] for r in rows)
        summary["mean_weight_err_channel"] = sum(r["weight_err_channel"] for r in rows) / len(rows)
        summary["mean_weight_err_tensor"] = sum(r["weight_err_tensor"] for r in rows) / len(rows)

    probe = None
    if s.layer_errors or s.sensitivity:
        probe = _probe_model(session, config, s)
    if s.layer_errors:
        rows, per_t = _layer_errors(session, probe, layers, s)
        tables["layer_errors"] = [{**info[r["layer"]], **r} for r in rows]
        arrays["error_timesteps"] = per_t.pop("_timesteps")
        arrays["output_error_per_timestep"] = per_t
        summary["max_layer_output_rel_mse"] = max(r["output_rel_mse"] for r in rows)
        summary["sum_layer_output_rel_mse"] = sum(r["output_rel_mse"] for r in rows)
    if s.sensitivity:
        session.require_generator("analyze_error_sources(sensitivity=True)")
        groups = layer_groups(fp, layers, s.grouping)
        if s.max_groups is not None:
            groups = dict(list(groups.items())[: s.max_groups])
        rows, extra = _sensitivity(session, probe, groups, s)
        tables["sensitivity"] = rows
        arrays["groups"] = groups
        summary.update(extra)
        worst_c = min(rows, key=lambda r: r["content_rank"])["group"]
        worst_t = min(rows, key=lambda r: r["temporal_rank"])["group"]
        notes.append(f"most content-sensitive group: {worst_c}; most temporally sensitive group: {worst_t}")
    report = StageReport(
        name="analyze_error_sources",
        settings={**asdict(s), "probe": config.to_dict()},
        summary=summary,
        tables=tables,
        arrays=arrays,
        notes=notes,
        seconds=time.perf_counter() - t0,
    )
    return session.add(report)


# ----------------------------------------------------------------------------------------------------
# 1. activations


def _act_spec(config: QuantConfig) -> QuantSpec:
    """The probe's activation format (uint8 per tensor when it leaves activations unquantized)."""
    spec = config.act or QuantSpec("uint8", "tensor")
    return spec


@torch.no_grad()
def _activation_stats(session: Session, layers: list[str], entries, config: QuantConfig, s: AnalysisSettings):
    fp = session.fp_transformer
    T = len(entries)
    g = session.rng(11)
    st: dict[str, dict[str, list]] = {
        n: {"ch": [None] * T, "lo": [0.0] * T, "hi": [0.0] * T, "tok": [None] * T, "map": [None] * T, "sample": [None] * T}
        for n in layers
    }
    cur = [0]

    def fn(name: str, x: torch.Tensor, out: torch.Tensor) -> None:
        t = cur[0]
        d = st[name]
        # statistics are reduced where the activations are; only vectors and sampled rows move to the CPU
        m = x.detach().float().reshape(-1, x.shape[-1])
        ch = m.abs().amax(0).cpu()
        d["ch"][t] = ch if d["ch"][t] is None else torch.maximum(d["ch"][t], ch)
        lo, hi = float(m.min()), float(m.max())
        d["lo"][t] = min(d["lo"][t], lo) if d["tok"][t] is not None else lo
        d["hi"][t] = max(d["hi"][t], hi) if d["tok"][t] is not None else hi
        rng = (m.amax(1) - m.amin(1)).cpu()
        d["tok"][t] = rng if d["tok"][t] is None else torch.cat([d["tok"][t], rng])
        if x.dim() == 3:
            d["map"][t] = (x.detach().float().amax(-1) - x.detach().float().amin(-1)).mean(0).cpu()
        k = min(s.sample_rows, m.shape[0])
        idx = torch.randperm(m.shape[0], generator=g)[:k]
        rows = m[idx.to(m.device)].cpu()
        d["sample"][t] = rows if d["sample"][t] is None else torch.cat([d["sample"][t], rows])

    cal = session.calibration
    with capturing_inputs(fp, layers, fn):
        for i, e in enumerate(tqdm(entries, desc="activation statistics", disable=not session.progress, leave=False)):
            cur[0] = i
            cal.replay(fp, [e])

    spec = _act_spec(config)
    fmt = QuantSpec(spec.format, "tensor").format
    rows, absmax_t, ch_arr, tokq, maps = [], {}, {}, {}, {}
    for name in layers:
        d = st[name]
        if any(c is None for c in d["ch"]):
            continue  # a layer the replay never reached
        lin = fp.get_submodule(name)
        w, b = lin.weight.detach().float(), None if lin.bias is None else lin.bias.detach().float()
        ch_all = torch.stack(d["ch"])  # (T, C)
        ch_max = ch_all.amax(0)
        a_t = ch_all.amax(1)  # per-timestep max |x|
        q = [torch.quantile(tok, torch.tensor([0.5, 0.99, 1.0])) for tok in d["tok"]]
        tok_ratio = max(float(v[2] / v[0].clamp(min=1e-8)) for v in q)
        # quantization error of the layer output under three activation range strategies
        xs = torch.cat(d["sample"])
        tid = torch.cat([torch.full((smp.shape[0],), i) for i, smp in enumerate(d["sample"])])
        y = F.linear(xs, w, b)
        lo, hi = torch.tensor(min(d["lo"])), torch.tensor(max(d["hi"]))
        sc, z = scale_zero_from_range(lo, hi, fmt)
        err_static = rel_mse(F.linear(fake_quant(xs, sc, z, fmt), w, b), y)
        los, his = torch.tensor(d["lo"])[tid][:, None], torch.tensor(d["hi"])[tid][:, None]
        sc, z = scale_zero_from_range(los, his, fmt)
        err_tw = rel_mse(F.linear(fake_quant(xs, sc, z, fmt), w, b), y)
        sc, z = scale_zero_from_range(xs.amin(1, keepdim=True), xs.amax(1, keepdim=True), fmt)
        err_dyn = rel_mse(F.linear(fake_quant(xs, sc, z, fmt), w, b), y)
        median = ch_max.median().clamp(min=1e-8)
        rows.append({
            "layer": name,
            "in_features": int(ch_max.numel()),
            "absmax": float(ch_max.max()),
            "channel_outlier_ratio": float(ch_max.max() / median),
            "outlier_channels": int((ch_max > 8 * median).sum()),
            "token_range_ratio": tok_ratio,
            "timestep_ratio": float(a_t.max() / a_t.min().clamp(min=1e-8)),
            "act_err_tensor_static": err_static,
            "act_err_timestep_static": err_tw,
            "act_err_token_dynamic": err_dyn,
        })
        absmax_t[name] = a_t.tolist()
        ch_arr[name] = ch_max.tolist()
        tokq[name] = [v.tolist() for v in q]
        if all(m is not None for m in d["map"]):
            maps[name] = [m.tolist() for m in d["map"]]
    top = sorted(rows, key=lambda r: -r["token_range_ratio"])[: s.top_layers]
    arrays = {
        "act_absmax_per_timestep": absmax_t,
        "act_channel_absmax": ch_arr,
        "token_range_quantiles": tokq,
        "token_range_map": {r["layer"]: maps[r["layer"]] for r in top if r["layer"] in maps},
        "act_bits": spec.bits,
    }
    return rows, arrays


def _activation_summary(rows: list[dict]) -> dict[str, float]:
    n = len(rows)
    return {
        "max_channel_outlier_ratio": max(r["channel_outlier_ratio"] for r in rows),
        "mean_channel_outlier_ratio": sum(r["channel_outlier_ratio"] for r in rows) / n,
        "max_token_range_ratio": max(r["token_range_ratio"] for r in rows),
        "max_timestep_ratio": max(r["timestep_ratio"] for r in rows),
        "mean_act_err_tensor_static": sum(r["act_err_tensor_static"] for r in rows) / n,
        "mean_act_err_timestep_static": sum(r["act_err_timestep_static"] for r in rows) / n,
        "mean_act_err_token_dynamic": sum(r["act_err_token_dynamic"] for r in rows) / n,
    }


# ----------------------------------------------------------------------------------------------------
# 2. weights


@torch.no_grad()
def _weight_stats(fp, layers: list[str], config: QuantConfig):
    rows, arr = [], {}
    for name in layers:
        w = fp.get_submodule(name).weight.detach().float()
        wspec = (config.specs_for(name) or (None, None))[0] or QuantSpec("int8", "channel")
        oc, ic = w.abs().amax(1), w.abs().amax(0)
        c = w - w.mean()
        kurt = float(c.pow(4).mean() / c.pow(2).mean().pow(2).clamp(min=1e-20) - 3.0)
        errs = {}
        for gran in ("channel", "tensor"):
            q = Quantizer(wspec.with_(granularity=gran, dynamic=False), is_weight=True)
            q.calibrate(w)
            errs[gran] = rel_mse(q(w), w)
        rows.append({
            "layer": name,
            "shape": f"{w.shape[0]}x{w.shape[1]}",
            "weight_bits": wspec.bits,
            "absmax": float(w.abs().max()),
            "kurtosis": kurt,
            "out_channel_outlier_ratio": float(oc.max() / oc.median().clamp(min=1e-12)),
            "in_channel_outlier_ratio": float(ic.max() / ic.median().clamp(min=1e-12)),
            "weight_err_channel": errs["channel"],
            "weight_err_tensor": errs["tensor"],
        })
        arr[name] = oc.tolist()
    return rows, {"weight_channel_absmax": arr}


# ----------------------------------------------------------------------------------------------------
# 3. layer errors (each layer alone)


def _probe_model(session: Session, config: QuantConfig, s: AnalysisSettings):
    """A deep copy of the FP transformer quantized with the probe config, static ranges calibrated."""
    probe = copy.deepcopy(session.fp_transformer).eval()
    quantize_model(probe, config)
    if uncalibrated_static(probe):
        cal = session.calibration
        calibrate_model(probe, cal.runner(probe, cal.select(None, s.calib_rows)))
    return probe


@torch.no_grad()
def _layer_errors(session: Session, probe, layers: list[str], s: AnalysisSettings):
    cal = session.calibration
    entries = cal.select(s.error_timesteps, s.error_rows)
    ref = cal.replay(session.fp_transformer, entries)
    rows, per_t = [], {"_timesteps": [e.timestep for e in entries]}
    for name in tqdm(layers, desc="layer errors", disable=not session.progress, leave=False):
        own: list[float] = []
        module = probe.get_submodule(name)

        def hook(mod, args, out):  # noqa: ANN001
            own.append(rel_mse(out, F.linear(args[0], mod.weight, mod.bias)))

        handle = module.register_forward_hook(hook)
        try:
            with only_quantized(probe, [name]):
                outs = cal.replay(probe, entries)
        finally:
            handle.remove()
        errs = [rel_mse(o, r) for o, r in zip(outs, ref)]
        per_t[name] = errs
        rows.append({
            "layer": name,
            "output_rel_mse": sum(errs) / len(errs),
            "output_rel_mse_max_timestep": max(errs),
            "layer_rel_mse": sum(own) / max(len(own), 1),
        })
    order = sorted(rows, key=lambda r: -r["output_rel_mse"])
    for i, r in enumerate(order, 1):
        r["rank"] = i
    return rows, per_t


# ----------------------------------------------------------------------------------------------------
# 4. metric-decoupled sensitivity on generated videos


def _content_acc(m: dict) -> float:
    return (m["color_accuracy"] + m["shape_accuracy"]) / 2


def _motion_acc(m: dict) -> float:
    return (m["direction_accuracy"] + m["speed_accuracy"]) / 2


def sensitivity_prompts(model, n: int, seed: int) -> list[str]:  # noqa: ANN001
    """The sensitivity analysis' prompts: calibration prompts of the model (disjoint from its held-out set)."""
    return calibration_prompts(model, n, seed + 1)


@torch.no_grad()
def _sensitivity(session: Session, probe, groups: dict[str, list[str]], s: AnalysisSettings):
    """ViDiT-Q's metric-decoupled sensitivity: each group quantized alone, its videos scored for content and
    for temporal damage. With an oracle (the world model) content is colour + shape accuracy and temporal
    damage the loss of direction + speed accuracy and temporal consistency; without one, content damage is
    1 - SSIM against the FP video and temporal damage the frame-difference error against FP."""
    from workbench.metrics import evaluate_videos

    model = session.fp_model
    prompts = sensitivity_prompts(model, s.prompts, session.seed)
    scenes = model.oracle_scenes(prompts)
    seeds = [session.seed + 20_000 + i for i in range(len(prompts))]
    gen_settings = s.generation()

    def gen(transformer=None):
        return model.generate(prompts, seeds, gen_settings, transformer=transformer)

    fp_videos = gen()
    fp_m = evaluate_videos(fp_videos, scenes) if scenes is not None else {
        "content_acc": 1.0, "motion_acc": 1.0, "temporal_consistency": 1.0}
    if scenes is not None:
        fp_m = {**fp_m, "content_acc": _content_acc(fp_m), "motion_acc": _motion_acc(fp_m)}

    def measure(members: list[str] | None) -> dict[str, float]:
        try:
            if members is None:
                videos = gen(probe)
            else:
                with only_quantized(probe, members):
                    videos = gen(probe)
        except FloatingPointError:
            return {"diverged": 1.0, "content_acc": 0.0, "psnr_vs_fp": 0.0, "ssim_vs_fp": 0.0, "motion_acc": 0.0,
                    "temporal_consistency": 0.0, "oracle_accuracy": 0.0}
        if scenes is None:  # no oracle: damage measured against the FP videos of the same prompts and seeds
            m = evaluate_videos(videos, reference=fp_videos)
            return {"diverged": 0.0, "content_acc": m["ssim_vs_fp"], "psnr_vs_fp": m["psnr_vs_fp"],
                    "ssim_vs_fp": m["ssim_vs_fp"], "motion_acc": 1.0 - m["temporal_diff_error_vs_fp"],
                    "temporal_consistency": 1.0, "oracle_accuracy": None}
        m = evaluate_videos(videos, scenes, reference=fp_videos)
        return {"diverged": 0.0, "content_acc": _content_acc(m), "psnr_vs_fp": m["psnr_vs_fp"], "ssim_vs_fp": m["ssim_vs_fp"],
                "motion_acc": _motion_acc(m), "temporal_consistency": m["temporal_consistency"],
                "oracle_accuracy": m["oracle_accuracy"]}

    rows = []
    for name, members in tqdm(groups.items(), desc="sensitivity (videos)", disable=not session.progress, leave=False):
        m = measure(members)
        params = sum(probe.get_submodule(n).weight.numel() for n in members if hasattr(probe.get_submodule(n), "weight"))
        content_drop = fp_m["content_acc"] - m["content_acc"]
        motion_drop = fp_m["motion_acc"] - m["motion_acc"]
        tc_drop = fp_m["temporal_consistency"] - m["temporal_consistency"]
        rows.append({
            "group": name,
            "layers": sum(1 for n in members if hasattr(probe.get_submodule(n), "weight")),
            "params": params,
            **m,
            "content_drop": content_drop,
            "motion_drop": motion_drop,
            "tc_drop": tc_drop,
            "temporal_damage": motion_drop + tc_drop,
        })
    by_content = sorted(rows, key=lambda r: (-round(r["content_drop"], 6), r["psnr_vs_fp"]))
    by_temporal = sorted(rows, key=lambda r: -r["temporal_damage"])
    for i, r in enumerate(by_content, 1):
        r["content_rank"] = i
    for i, r in enumerate(by_temporal, 1):
        r["temporal_rank"] = i
    for i, r in enumerate(sorted(rows, key=lambda r: (min(r["content_rank"], r["temporal_rank"]),
                                                       r["content_rank"] + r["temporal_rank"])), 1):
        r["priority_rank"] = i
    all_q = measure(None)
    extra = {
        "groups": float(len(rows)),
        "fp_content_acc": fp_m["content_acc"],
        "fp_motion_acc": fp_m["motion_acc"],
        "fp_temporal_consistency": fp_m["temporal_consistency"],
        "probe_all_psnr_vs_fp": all_q["psnr_vs_fp"],
        "probe_all_content_acc": all_q["content_acc"],
        "probe_all_motion_acc": all_q["motion_acc"],
        "probe_all_temporal_consistency": all_q["temporal_consistency"],
        "ranking_spearman": _spearman([r["content_rank"] for r in rows], [r["temporal_rank"] for r in rows]),
    }
    return rows, extra


def _spearman(a: list[int], b: list[int]) -> float:
    n = len(a)
    if n < 2:
        return 1.0
    d2 = sum((x - y) ** 2 for x, y in zip(a, b))
    return 1.0 - 6.0 * d2 / (n * (n * n - 1))


def _finite(x: float) -> float:
    return x if math.isfinite(x) else 0.0
