"""`calibrate_ranges`: static range estimation, channel balancing and timestep-wise ranges.

Runs on the session's already quantized copy (`apply_quantization` first), using the calibration cache:

1. Optional re-spec of the static activation quantizers: `observer` ("minmax", "percentile" or
   "mse": the clipping ratio minimising the quantization MSE, as in Q-Diffusion / ViDiT-Q) and
   `timestep_wise` (one static range per timestep bucket: ViDiT-Q's timestep-wise ranges; dynamic
   per-token activations need no range at all and are set in the quant config instead); and of the
   weight quantizers' observer (`weight_observer`, e.g. "mse": per-channel clipping by MSE search).
2. Channel balancing of every linear whose input is quantized: SmoothQuant scales
   s_j = max|x_j|^alpha / max|w_j|^(1-alpha) from the FP activations of the whole calibration set
   (`smooth_alpha`, or per layer the best of no smoothing and `alpha_search` by the layer's output
   error), and/or a randomized Hadamard rotation (`rotation`, or per layer by the same error with
   `rotation_search`); ViDiT-Q's static-dynamic channel balancing is both.
3. Static ranges are (re)calibrated on the calibration cache.

The report lists, per layer, the output error on sampled FP inputs before and after (relative MSE of
the quantized layer's output against the FP layer on the same input), the chosen ranges with their
clipping ratio (chosen range / observed range of the balanced input), per-bucket ranges, and how the
three observers compare on each static layer.
"""

from __future__ import annotations

import copy
import time
from dataclasses import asdict, dataclass, replace
from typing import Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from workbench.quant import (QuantConfig, QuantLinear, QuantSpec, Quantizer, at_timestep, calibrate_model,
                             quantize_model, quantized_linears)
from workbench.quant.balance import rotation_matrix, smooth_scales
from workbench.quant.formats import qrange
from workbench.quant.quantizer import OBSERVERS
from workbench.session import Session
from workbench.stages.calibration import capturing_inputs
from workbench.stages.registry import stage
from workbench.stages.report import StageReport
from workbench.viz.stage_figures import ranges_figures


@dataclass
class RangeSettings:
    """observer / percentile: override the static activation observer (None: keep the config's).
    weight_observer: override the weight observer (None: keep the config's).
    timestep_wise / timestep_buckets: override timestep-wise static ranges (None: keep).
    smooth_alpha: SmoothQuant migration strength (None: no smoothing).
    alpha_search: per-layer alpha grid; the alpha (or no smoothing) with the least layer output error wins.
    rotation: randomized Hadamard rotation of every quantized-input linear (after smoothing).
    rotation_search: try every smoothing candidate with and without the rotation; keep the better per layer.
    sample_rows: FP input rows per layer (all timesteps) used for the before/after errors and the search.
    calib_rows: rows of each recorded call used for static calibration (None: all).
    compare_observers: report each static layer's error under minmax / percentile / mse.
    """

    observer: str | None = None
    percentile: float | None = None
    weight_observer: str | None = None
    timestep_wise: bool | None = None
    timestep_buckets: int | None = None
    smooth_alpha: float | None = None
    alpha_search: list[float] | None = None
    rotation: bool = False
    rotation_search: bool = False
    rotation_seed: int = 0
    sample_rows: int = 512
    calib_rows: int | None = None
    compare_observers: bool = True

    def __post_init__(self) -> None:
        for name in ("observer", "weight_observer"):
            v = getattr(self, name)
            if v is not None and v not in OBSERVERS:
                raise ValueError(f"unknown {name} {v!r}; choose one of {list(OBSERVERS)}")
        if self.smooth_alpha is not None and not 0.0 <= self.smooth_alpha <= 1.0:
            raise ValueError(f"smooth_alpha must be in [0, 1], got {self.smooth_alpha}")
        for a in self.alpha_search or []:
            if not 0.0 <= a <= 1.0:
                raise ValueError(f"alpha_search values must be in [0, 1], got {a}")
        if self.sample_rows < 1:
            raise ValueError(f"sample_rows must be >= 1, got {self.sample_rows}")


def _respec(spec: QuantSpec | None, s: RangeSettings) -> QuantSpec | None:
    if spec is None or spec.dynamic or spec.fixed_range is not None:
        return spec
    changes: dict[str, Any] = {}
    if s.observer is not None:
        changes["observer"] = s.observer
    if s.percentile is not None:
        changes["percentile"] = s.percentile
    if s.timestep_wise is not None:
        changes["timestep_wise"] = s.timestep_wise
    if s.timestep_buckets is not None:
        changes["timestep_buckets"] = s.timestep_buckets
    return spec.with_(**changes) if changes else spec


def _respec_weight(spec: QuantSpec | None, s: RangeSettings) -> QuantSpec | None:
    if spec is None or s.weight_observer is None or spec.dynamic:
        return spec
    return spec.with_(observer=s.weight_observer)


def respec_config(config: QuantConfig, s: RangeSettings) -> QuantConfig:
    """The config with its static activation specs and weight observers changed per the settings."""
    rules = [replace(r, act=_respec(r.act, s), weight=_respec_weight(r.weight, s)) for r in config.rules]
    return replace(config, act=_respec(config.act, s), weight=_respec_weight(config.weight, s), rules=rules)


Samples = list[tuple[float, torch.Tensor]]


@torch.no_grad()
def _fp_inputs(session: Session, names: list[str], rows: int) -> tuple[dict[str, torch.Tensor], dict[str, Samples]]:
    """Exact per-channel max |x| of every named layer's FP input over the whole calibration set, and a
    random sample of about `rows` input rows per layer spread over the recorded timesteps (in the model's
    dtype, on the layer's device)."""
    cal = session.calibration
    per_entry = max(8, rows // max(1, len(cal.entries)))
    g = session.rng(23)
    absmax: dict[str, torch.Tensor] = {}
    samples: dict[str, Samples] = {n: [] for n in names}
    cur = [0.0]

    def fn(name: str, x: torch.Tensor, out: torch.Tensor) -> None:
        # reduce and sample where the activations are: only a K-vector and the sampled rows are kept
        m = x.detach().reshape(-1, x.shape[-1])
        a = m.abs().amax(0).float()
        absmax[name] = a if name not in absmax else torch.maximum(absmax[name], a)
        idx = torch.randperm(m.shape[0], generator=g)[:per_entry]
        samples[name].append((cur[0], m[idx.to(m.device)]))

    fp = session.fp_transformer
    with capturing_inputs(fp, names, fn):
        for e in tqdm(cal.entries, desc="FP layer inputs", disable=not session.progress, leave=False):
            cur[0] = e.timestep
            cal.replay(fp, [e])
    return absmax, samples


@torch.no_grad()
def layer_error(ql: QuantLinear, samples: Samples, max_timestep: float = 1000.0) -> float:
    """Relative MSE of the quantized layer's output against the FP layer on the same FP inputs."""
    num = den = 0.0
    for t, x in samples:
        with at_timestep(t, max_timestep):
            yq = ql(x)
        y = F.linear(x, ql.weight, ql.bias).float()
        num += float((yq.float() - y).pow(2).sum())
        den += float(y.pow(2).sum())
    return num / den if den > 0 else num


@torch.no_grad()
def _calibrate_on(q: Quantizer, xs: Samples, max_timestep: float) -> None:
    q.reset()
    mode = q.mode
    q.mode = "observe"
    for t, x in xs:
        with at_timestep(t, max_timestep):
            q(x)
    q.calibrate()
    q.mode = mode


@torch.no_grad()
def _balance(m: QuantLinear, alpha: float | None, rotate: bool, absmax: torch.Tensor, samples: Samples | None,
             seed: int, max_timestep: float) -> float:
    """Give m smoothing with `alpha` (None: none) and the rotation (or none); with samples, calibrate a
    static input range on them and return the layer's output error (else 0)."""
    m.set_balance(None if alpha is None else smooth_scales(absmax, m.weight, alpha),
                  rotation_matrix(m.in_features, seed) if rotate else None)
    if samples is None:
        return 0.0
    if _static(m):
        _calibrate_on(m.input_quantizer, [(t, m.transform_input(x)) for t, x in samples], max_timestep)
    return layer_error(m, samples, max_timestep)


def _static(ql: QuantLinear) -> bool:
    iq = ql.input_quantizer
    return iq is not None and not iq.spec.dynamic and iq.spec.fixed_range is None


def _quantizer_range(q: Quantizer, scale: torch.Tensor, zero: torch.Tensor) -> tuple[float, float]:
    qmin, qmax = qrange(q.spec.format)
    lo = (qmin - zero.float()) * scale.float()
    hi = (qmax - zero.float()) * scale.float()
    return float(lo.min()), float(hi.max())


@stage(RangeSettings, figures=ranges_figures)
def calibrate_ranges(session: Session, settings: RangeSettings | None = None) -> StageReport:
    """Re-spec static observers, balance channels, calibrate static ranges; report errors and ranges."""
    s = settings or RangeSettings()
    t0 = time.perf_counter()
    if session.quant_config is None:
        raise ValueError("calibrate_ranges works on a quantized copy: run apply_quantization(session) first")
    if session.calibration is None:
        raise ValueError("calibrate_ranges needs calibration data: run collect_calibration(session) first")
    qt = session.qtransformer
    max_t = session.quant_config.max_timestep

    layers = quantized_linears(qt, act_quantized=True)
    absmax, samples = _fp_inputs(session, list(layers), s.sample_rows)

    # errors as the stage found them (static quantizers need a range first)
    if any(_static(m) and not m.input_quantizer.calibrated for m in layers.values()):
        calibrate_model(qt, session.calibration.runner(qt, session.calibration.select(None, s.calib_rows)))
    before = {n: layer_error(m, samples[n], max_t) for n, m in layers.items()}
    # each layer as the stage found it: a layer the new observer / balancing makes worse is put back.
    # The stage never changes weights, so the copies share them (only quantizer state is duplicated).
    previous = {n: copy.deepcopy(m, memo={id(p): p for p in m.parameters(recurse=False)}) for n, m in layers.items()}

    new_config = respec_config(session.quant_config, s)
    if new_config != session.quant_config:
        quantize_model(qt, new_config)
        session.quant_config = new_config
        layers = quantized_linears(qt, act_quantized=True)

    # channel balancing: every (alpha, rotation) candidate is tried per layer, the least output error wins
    alphas: list[float | None] = [None, *s.alpha_search] if s.alpha_search else [s.smooth_alpha]
    rotations = [False, True] if s.rotation_search else [s.rotation]
    candidates = [(a, r) for a in alphas for r in rotations]
    chosen_alpha: dict[str, float | None] = {}
    for n, m in tqdm(layers.items(), desc="channel balancing", disable=not session.progress, leave=False):
        best = (float("inf"), candidates[0])
        if len(candidates) > 1:
            for a, r in candidates:
                err = _balance(m, a, r, absmax[n], samples[n], s.rotation_seed, max_t)
                if err < best[0]:
                    best = (err, (a, r))
        chosen_alpha[n] = best[1][0]
        _balance(m, *best[1], absmax[n], None, s.rotation_seed, max_t)

    # static ranges on the whole calibration set, recording the observed (balanced) input ranges
    observed: dict[str, list[float]] = {}

    def record(name: str, x: torch.Tensor, out: torch.Tensor) -> None:
        xt = layers[name].transform_input(x.detach()).float()
        lo, hi = float(xt.min()), float(xt.max())
        o = observed.get(name)
        observed[name] = [lo, hi] if o is None else [min(o[0], lo), max(o[1], hi)]

    static_names = [n for n, m in layers.items() if _static(m)]
    calibrated: list[str] = []
    if static_names:
        with capturing_inputs(qt, static_names, record):
            calibrated = calibrate_model(qt, session.calibration.runner(qt, session.calibration.select(None, s.calib_rows)))
    after = {n: layer_error(m, samples[n], max_t) for n, m in layers.items()}
    kept = [n for n in layers if after[n] > before[n]]
    for n in kept:  # never leave a layer worse than the stage found it
        qt.set_submodule(n, previous[n])
        chosen_alpha[n] = None
        after[n] = before[n]
    del previous
    layers = quantized_linears(qt, act_quantized=True)
    static_names = [n for n, m in layers.items() if _static(m)]

    from workbench.models.adapters import adapter_for, layer_role

    adapter = adapter_for(qt)
    err_rows, range_rows, bucket_ranges, obs_rows = [], [], {}, []
    for n, m in layers.items():
        iq = m.input_quantizer
        err_rows.append({
            "layer": n, "role": layer_role(n, adapter), "act": str(iq.spec.format),
            "act_granularity": iq.spec.granularity, "dynamic": iq.spec.dynamic,
            "alpha": chosen_alpha[n], "rotation": m.rotation is not None, "kept_previous": n in kept,
            "err_before": before[n], "err_after": after[n],
            "improvement": before[n] / after[n] if after[n] > 0 else None,
            "smooth_max": None if m.smooth is None else float(m.smooth.max()),
            "smooth_min": None if m.smooth is None else float(m.smooth.min()),
        })
        if n in static_names:
            lo, hi = _quantizer_range(iq, iq.scale, iq.zero)
            olo, ohi = (lo, hi) if n in kept else observed.get(n, [lo, hi])  # kept: observed with the new balancing
            range_rows.append({
                "layer": n, "observer": iq.spec.observer, "timestep_wise": iq.spec.timestep_wise,
                "range_lo": lo, "range_hi": hi, "observed_lo": olo, "observed_hi": ohi,
                "clip_ratio": (hi - lo) / (ohi - olo) if ohi > olo else 1.0,
            })
            if iq.spec.timestep_wise and iq.bucket_scale.numel():
                bucket_ranges[n] = [list(_quantizer_range(iq, iq.bucket_scale[b], iq.bucket_zero[b]))
                                    for b in range(iq.bucket_scale.shape[0])]
            if s.compare_observers:
                xs = [(t, m.transform_input(x)) for t, x in samples[n]]
                wq = m.quantized_weight()
                row = {"layer": n}
                for obs in OBSERVERS:
                    q = Quantizer(iq.spec.with_(observer=obs, timestep_wise=False))
                    _calibrate_on(q, xs, max_t)
                    num = den = 0.0
                    for (t, x), (_, xt) in zip(samples[n], xs):
                        y = F.linear(x, m.weight, m.bias).float()
                        yq = F.linear(q(xt), wq, m.bias).float()
                        num += float((yq - y).pow(2).sum())
                        den += float(y.pow(2).sum())
                    row[f"err_{obs}"] = num / den if den > 0 else num
                obs_rows.append(row)
    mean = lambda d: sum(d.values()) / max(len(d), 1)  # noqa: E731
    report = StageReport(
        name="calibrate_ranges",
        settings=asdict(s),
        summary={
            "layers": float(len(layers)),
            "static_layers": float(len(static_names)),
            "calibrated_quantizers": float(len(calibrated)),
            "smoothed_layers": float(sum(m.smooth is not None for m in layers.values())),
            "rotated_layers": float(sum(m.rotation is not None for m in layers.values())),
            "mean_err_before": mean(before),
            "mean_err_after": mean(after),
            "kept_previous_layers": float(len(kept)),
            "mean_clip_ratio": sum(r["clip_ratio"] for r in range_rows) / len(range_rows) if range_rows else 1.0,
        },
        tables={"layer_errors": err_rows, "ranges": range_rows, "observers": obs_rows},
        notes=[f"{len(kept)} layer(s) kept the quantizer they had before this stage, because the new observer and "
               f"balancing gave a larger output error there: {', '.join(kept)}"] if kept else [],
        arrays={"bucket_ranges": bucket_ranges},
        seconds=time.perf_counter() - t0,
    )
    return session.add(report)
