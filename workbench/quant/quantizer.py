"""`QuantSpec` (what to quantize how) and `Quantizer` (the module that does it to one tensor stream).

A quantizer has three modes: "observe" collects range statistics and passes values through,
"quantize" fake-quantizes, "off" is the identity. Static quantizers turn their statistics into a
scale / zero point with `calibrate()` (min-max, percentile or MSE-optimal clipping); dynamic
quantizers compute ranges from each call's tensor (ViDiT-Q's per-token dynamic activations).
Timestep-wise quantizers keep one static range per timestep bucket (read from `context`).
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Any

import torch
from torch import nn

from .context import MODES, current_bucket
from .formats import QuantFormat, fake_quant, scale_zero_from_range

GRANULARITIES = ("tensor", "channel", "token", "group")
OBSERVERS = ("minmax", "percentile", "mse")
MSE_GRID = 80  # clipping ratios 1.00, 0.99, ..., 0.21 tried by the MSE observer (as in Q-Diffusion)


@dataclass(frozen=True)
class QuantSpec:
    """How one tensor stream is quantized.

    granularity: "tensor" (one range), "channel" (per slice of dim 0: a weight's output channels),
    "token" (per row: reduce over the last dim only), "group" (groups of `group_size` along the last dim).
    dynamic: ranges computed from each call's tensor instead of calibrated statistics.
    observer: how static ranges are chosen from statistics: "minmax", "percentile", "mse".
    timestep_wise: keep one static range per timestep bucket (`timestep_buckets` uniform buckets).
    learnable_scale: the scale is an nn.Parameter (LSQ-style gradients from `fake_quant`).
    fixed_range: a known static range (e.g. (0, 1) for softmax probabilities); no calibration needed.
    sample_size: values kept for percentile / mse observers (uniform reservoir over everything observed).
    """

    format: QuantFormat = QuantFormat()
    granularity: str = "tensor"
    group_size: int = 128
    dynamic: bool = False
    observer: str = "minmax"
    percentile: float = 99.99
    timestep_wise: bool = False
    timestep_buckets: int = 10
    learnable_scale: bool = False
    fixed_range: tuple[float, float] | None = None
    sample_size: int = 65536

    def __post_init__(self) -> None:
        object.__setattr__(self, "format", QuantFormat.parse(self.format))
        if self.granularity not in GRANULARITIES:
            raise ValueError(f"unknown granularity {self.granularity!r}; choose one of {list(GRANULARITIES)}")
        if self.observer not in OBSERVERS:
            raise ValueError(f"unknown observer {self.observer!r}; choose one of {list(OBSERVERS)}")
        if self.group_size < 1:
            raise ValueError(f"group_size must be >= 1, got {self.group_size}")
        if not 0.0 < self.percentile <= 100.0:
            raise ValueError(f"percentile must be in (0, 100], got {self.percentile}")
        if self.timestep_buckets < 1:
            raise ValueError(f"timestep_buckets must be >= 1, got {self.timestep_buckets}")
        if self.sample_size < 1:
            raise ValueError(f"sample_size must be >= 1, got {self.sample_size}")
        if self.fixed_range is not None:
            lo, hi = (float(v) for v in self.fixed_range)
            if not lo < hi:
                raise ValueError(f"fixed_range must be (low, high) with low < high, got {self.fixed_range}")
            object.__setattr__(self, "fixed_range", (lo, hi))
        if self.dynamic and (self.timestep_wise or self.learnable_scale or self.fixed_range is not None):
            raise ValueError("a dynamic spec cannot also be timestep_wise, learnable_scale or fixed_range")

    @property
    def bits(self) -> int:
        return self.format.bits

    def with_(self, **changes: Any) -> QuantSpec:
        """A copy with some fields changed (`format` may be a string such as "int4")."""
        return replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        d["format"] = str(self.format)
        if self.fixed_range is not None:
            d["fixed_range"] = list(self.fixed_range)
        return d


@dataclass
class _Stats:
    """Running statistics of one static range: per-slice min / max and a bounded uniform sample."""

    lo: torch.Tensor
    hi: torch.Tensor
    shape: tuple[int, ...]  # broadcastable shape of one range per slice
    sample: torch.Tensor | None = None  # (n_slices, k) values
    keys: torch.Tensor | None = None  # random priorities of the sampled values (smallest are kept)


class Quantizer(nn.Module):
    """Fake-quantizes one tensor stream according to a `QuantSpec` (see module docstring for modes)."""

    def __init__(self, spec: QuantSpec, is_weight: bool = False) -> None:
        super().__init__()
        self.spec = spec
        self.is_weight = is_weight
        self.mode = "quantize"
        self._generation = 0  # bumped whenever ranges are replaced (weight caches compare it)
        self._stats: _Stats | None = None
        self._bucket_stats: dict[int, _Stats] = {}
        if spec.learnable_scale:
            self.scale = nn.Parameter(torch.empty(0))
            self.bucket_scale = nn.Parameter(torch.empty(0))
        else:
            self.register_buffer("scale", torch.empty(0))
            self.register_buffer("bucket_scale", torch.empty(0))
        self.register_buffer("zero", torch.empty(0))
        self.register_buffer("bucket_zero", torch.empty(0))
        if spec.fixed_range is not None:
            self._set(*scale_zero_from_range(*(torch.tensor(v) for v in spec.fixed_range), spec.format))

    # ---- state -------------------------------------------------------------------------------------

    @property
    def calibrated(self) -> bool:
        """True once a static range is known (always True for dynamic quantizers)."""
        return self.spec.dynamic or self.scale.numel() > 0

    @property
    def observed(self) -> bool:
        """True when statistics are waiting for `calibrate()`."""
        return self._stats is not None

    @property
    def mode(self) -> str:
        return self._mode

    @mode.setter
    def mode(self, value: str) -> None:
        if value not in MODES:
            raise ValueError(f"unknown mode {value!r}; choose one of {list(MODES)}")
        self._mode = value

    def reset(self) -> None:
        """Forget statistics and calibrated ranges (fixed ranges are kept)."""
        self._stats, self._bucket_stats = None, {}
        if self.spec.fixed_range is None:
            self._set(torch.empty(0), torch.empty(0))
            self.bucket_scale.data = torch.empty(0, device=self.bucket_scale.device)
            self.bucket_zero.data = torch.empty(0, device=self.bucket_zero.device)

    def _set(self, scale: torch.Tensor, zero: torch.Tensor) -> None:
        device = self.scale.device
        self.scale.data = scale.detach().to(device, torch.float32)
        self.zero.data = zero.detach().to(device, torch.float32)
        self._generation += 1

    def state_key(self) -> tuple:
        """Changes whenever this quantizer's output for a fixed input may change (for weight caches)."""
        return (
            id(self),
            self._generation,
            self.mode,
            self.spec,
            *((t.data_ptr(), t._version, t.device) for t in (self.scale, self.zero)),
        )

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):  # type: ignore[no-untyped-def]
        # Ranges are shaped lazily (per channel, per bucket): adopt the saved shapes before loading.
        for name in ("scale", "zero", "bucket_scale", "bucket_zero"):
            saved = state_dict.get(prefix + name)
            mine = getattr(self, name)
            if saved is not None and saved.shape != mine.shape:
                mine.data = torch.empty(saved.shape, dtype=mine.dtype, device=mine.device)
        self._generation += 1
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def extra_repr(self) -> str:
        s = self.spec
        kind = "dynamic" if s.dynamic else ("fixed" if s.fixed_range else s.observer)
        tw = f", timestep_wise({s.timestep_buckets})" if s.timestep_wise else ""
        group = f"({s.group_size})" if s.granularity == "group" else ""
        return f"{s.format}, {s.granularity}{group}, {kind}{tw}, mode={self.mode}"

    # ---- shapes ------------------------------------------------------------------------------------

    def grouped(self, x: torch.Tensor) -> torch.Tensor:
        """x as the quantizer sees it: groups split off the last dim for "group" granularity."""
        if self.spec.granularity != "group":
            return x
        g = self.spec.group_size
        if x.shape[-1] % g:
            raise ValueError(f"last dim {x.shape[-1]} is not a multiple of group_size {g}")
        return x.unflatten(-1, (-1, g))

    def _matrix(self, v: torch.Tensor) -> tuple[torch.Tensor, tuple[int, ...]]:
        """v as (n_slices, values per slice) plus the broadcastable shape of one range per slice."""
        gran = self.spec.granularity
        if gran == "tensor":
            return v.reshape(1, -1), ()
        if gran == "channel":
            return v.reshape(v.shape[0], -1), (v.shape[0],) + (1,) * (v.dim() - 1)
        return v.reshape(-1, v.shape[-1]), tuple(v.shape[:-1]) + (1,)

    # ---- forward -----------------------------------------------------------------------------------

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode == "off":
            return x
        if self.mode == "observe":
            if not self.spec.dynamic and self.spec.fixed_range is None:
                self.observe(x)
            return x
        v = self.grouped(x)
        scale, zero = self.params_for(v)
        return fake_quant(v, scale, zero, self.spec.format).reshape(x.shape)

    def params_for(self, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Scale and zero point for `v = self.grouped(x)`: from v itself (dynamic), the current timestep
        bucket (timestep-wise) or the overall static range; shaped to broadcast against v."""
        if self.spec.dynamic:
            m, shape = self._matrix(v.detach())
            lo, hi = torch.aminmax(m, dim=1)
            lo, hi = _solve_range(m.float(), self.spec, lo.float(), hi.float())
            return scale_zero_from_range(lo.reshape(shape), hi.reshape(shape), self.spec.format)
        if not self.calibrated:
            raise RuntimeError(
                f"static quantizer ({self.extra_repr()}) has no range yet: observe data and calibrate "
                "(workbench.quant.calibrate_model), or use a dynamic spec"
            )
        if self.spec.timestep_wise and self.bucket_scale.numel() > 0:
            bucket = current_bucket(self.spec.timestep_buckets)
            if bucket is not None:
                return self.bucket_scale[bucket], self.bucket_zero[bucket]
        return self.scale, self.zero

    # ---- statistics and calibration ----------------------------------------------------------------

    @torch.no_grad()
    def observe(self, x: torch.Tensor) -> None:
        """Fold x into the running statistics (overall, and the current bucket if timestep-wise)."""
        m, shape = self._matrix(self.grouped(x.detach()).float())
        self._stats = self._merge(self._stats, m, shape)
        if self.spec.timestep_wise:
            bucket = current_bucket(self.spec.timestep_buckets)
            if bucket is not None:
                self._bucket_stats[bucket] = self._merge(self._bucket_stats.get(bucket), m, shape)

    def _merge(self, stats: _Stats | None, m: torch.Tensor, shape: tuple[int, ...]) -> _Stats:
        lo, hi = torch.aminmax(m, dim=1)
        if stats is not None and stats.shape != shape:
            raise ValueError(
                f"static {self.spec.granularity} ranges need the same slices on every call (had "
                f"{stats.shape}, got {shape}); use dynamic=True for per-token / per-group activations"
            )
        if stats is None:
            stats = _Stats(lo, hi, shape)
        else:
            stats.lo, stats.hi = torch.minimum(stats.lo, lo), torch.maximum(stats.hi, hi)
        if self.spec.observer != "minmax":
            # Uniform reservoir: every value gets a random priority; the smallest priorities are kept.
            per_slice = max(1, self.spec.sample_size // m.shape[0])
            keys = torch.rand(m.shape, device=m.device)
            if stats.sample is not None:
                m, keys = torch.cat([stats.sample, m], 1), torch.cat([stats.keys, keys], 1)
            if m.shape[1] > per_slice:
                keys, idx = keys.topk(per_slice, dim=1, largest=False)
                m = m.gather(1, idx)
            stats.sample, stats.keys = m, keys
        return stats

    @torch.no_grad()
    def calibrate(self, x: torch.Tensor | None = None) -> None:
        """Fix the static range: from tensor `x` exactly (weights), else from the observed statistics."""
        spec = self.spec
        if spec.dynamic or spec.fixed_range is not None:
            return
        if x is not None:
            m, shape = self._matrix(self.grouped(x.detach()).float())
            overall = _Stats(m.amin(1), m.amax(1), shape, sample=m)
            buckets: dict[int, _Stats] = {}
        else:
            if self._stats is None:
                raise RuntimeError(f"quantizer ({self.extra_repr()}) observed nothing; cannot calibrate")
            overall, buckets = self._stats, self._bucket_stats
        scale, zero = self._scale_zero(overall)
        self._set(scale, zero)
        if spec.timestep_wise:
            # Unseen buckets fall back to the overall range.
            bs = scale.expand(spec.timestep_buckets, *scale.shape).clone()
            bz = zero.expand(spec.timestep_buckets, *zero.shape).clone()
            for b, stats in buckets.items():
                bs[b], bz[b] = self._scale_zero(stats)
            self.bucket_scale.data = bs.to(self.scale.device)
            self.bucket_zero.data = bz.to(self.zero.device)
        self._stats, self._bucket_stats = None, {}

    def _scale_zero(self, stats: _Stats) -> tuple[torch.Tensor, torch.Tensor]:
        sample = stats.sample if stats.sample is not None else torch.stack([stats.lo, stats.hi], 1)
        lo, hi = _solve_range(sample, self.spec, stats.lo, stats.hi)
        return scale_zero_from_range(lo.reshape(stats.shape), hi.reshape(stats.shape), self.spec.format)


def _quantile(m: torch.Tensor, q: float) -> torch.Tensor:
    """Row-wise q-quantile (nearest rank), without torch.quantile's input-size limit."""
    k = min(max(int(round(q * (m.shape[1] - 1))) + 1, 1), m.shape[1])
    return m.kthvalue(k, dim=1).values


def _solve_range(
    m: torch.Tensor, spec: QuantSpec, lo: torch.Tensor, hi: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row clipping range from values m (n_slices, k) and exact extremes lo / hi, per the observer."""
    if spec.observer == "minmax":
        return lo, hi
    if spec.observer == "percentile":
        p = spec.percentile / 100.0
        return _quantile(m, 1.0 - p), _quantile(m, p)
    best_err = torch.full_like(lo, float("inf"))
    best_lo, best_hi = lo.clone(), hi.clone()
    for i in range(MSE_GRID):
        ratio = 1.0 - 0.01 * i
        c_lo, c_hi = lo * ratio, hi * ratio
        scale, zero = scale_zero_from_range(c_lo[:, None], c_hi[:, None], spec.format)
        err = (fake_quant(m, scale, zero, spec.format) - m).pow(2).sum(1)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_lo, best_hi = torch.where(better, c_lo, best_lo), torch.where(better, c_hi, best_hi)
    return best_lo, best_hi
