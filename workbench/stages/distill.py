"""`distill`: the training loop shared by the distillation recipes (Q-VDiT, S2Q-VDiT, MPQ-DMv2).

    from workbench.stages.distill import DistillSettings, distill, run_distillation
    distill(session, DistillSettings(iters=100, lr=1e-3))          # block reconstruction of weight scales

What it does, top to bottom:

1. Data. Every recorded call of the calibration cache is split into rows (one video of one sampling
   step; with guidance, the conditional and unconditional rows are separate rows). Block mode captures
   the inputs of the first transformer block of the FP model (and of the quantized model: its embedders
   may be quantized too), then walks the blocks in order: the FP block gives the target, the quantized
   block is trained to match it, and the next block's inputs come from the quantized model's previous
   blocks (`inputs="quant"`, the default, as BRECQ / Q-VDiT) or from the FP ones (`inputs="fp"`).
   End-to-end mode (`mode="e2e"`) trains the whole transformer on its final output.
2. Loss. `relative MSE = sum_s w_s ||pred_s - target_s||^2 / sum_s ||target_s||^2` over the tokens s
   of the batch (w_s: optional per-token weights with mean 1, e.g. S2Q-VDiT's attention weights), plus
   extra terms `Term(name, weight, fn)` computed from a `TermContext` (Q-VDiT's temporal relation,
   MPQ-DMv2's memory relation). Every term's curve is recorded.
3. What is trained (`train`): "scales" (the weight quantizers' scales become learnable, LSQ gradients),
   "extras" (every `Compensation` module: TQE, LoRA, binary residual branches), "weights" (the
   weights themselves, i.e. learned rounding / QAT). AdamW, cosine learning-rate decay, gradient
   clipping, a fixed seed (batch sampling and any randomness of the terms use one generator).
4. Checkpoints: with `checkpoint_dir`, the full state (quantized model, optimizer, generator, term
   states, curves) is written every `checkpoint_every` iterations and when a block finishes; running
   the stage again with the same settings resumes from there and ends with the same result as an
   uninterrupted run (block inputs are recomputed from the restored model, bit for bit).
5. Divergence: a NaN/inf loss stops training with `DistillDivergedError`, naming the block and the
   iteration and suggesting a lower learning rate; that block is restored to its state before training.

`Compensation` is the base class of the trainable output corrections the method stages attach to
`QuantLinear.extras`: it quantizes its input exactly as its layer does (its own copy of the layer's
input transform and activation quantizer), so a branch computes on the same low-bit activations as
the layer and exports as a self-contained module (`export_init`).
"""

from __future__ import annotations

import hashlib
import inspect
import json
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils import _pytree as pytree
from tqdm.auto import tqdm

from workbench.quant import QuantLinear, QuantSpec, Quantizer, at_timestep
from workbench.session import Session
from workbench.stages.report import StageReport, plain

MODES = ("block", "e2e")
INPUTS = ("quant", "fp")
TRAINABLE = ("scales", "extras", "weights")
SCHEDULES = ("cosine", "constant")
CHUNK_ROWS = 16  # rows per forward when propagating block inputs / computing targets


class DistillDivergedError(FloatingPointError):
    """The distillation loss became NaN or infinite (the message names the block and the iteration)."""


# ----------------------------------------------------------------------------------------------------
# settings


@dataclass
class DistillSettings:
    """How to train (the method stages extend these settings with their own components).

    mode: "block" (block-wise reconstruction) or "e2e" (the transformer's final output).
    iters: optimizer steps per block ("block") or in total ("e2e").
    batch_size: calibration rows per step. rows: rows used (evenly spaced; None: all).
    lr / scale_lr / weight_lr: AdamW learning rates of the extras, the weight scales and the weights
        (None: lr / 10 for scales, lr / 100 for weights). weight_decay applies to the extras only.
    schedule: "cosine" (decay to 0) or "constant". grad_clip: max gradient norm (None: no clipping).
    inputs: "quant" (block inputs from the quantized model's previous blocks) or "fp".
    train: what is trained: any of "scales", "extras", "weights".
    blocks: names of the blocks to train (None: all; the others are only propagated).
    seed: seed of the batch sampling and of the terms' randomness.
    eval_rows: fixed rows on which each block's error is measured before and after training.
    checkpoint_dir / checkpoint_every / resume: see the module docstring (0: only when a block ends).
    """

    mode: str = "block"
    iters: int = 100
    batch_size: int = 4
    rows: int | None = None
    lr: float = 1e-3
    scale_lr: float | None = None
    weight_lr: float | None = None
    weight_decay: float = 0.0
    schedule: str = "cosine"
    grad_clip: float | None = 1.0
    inputs: str = "quant"
    train: list[str] = field(default_factory=lambda: ["scales", "extras"])
    blocks: list[str] | None = None
    seed: int = 0
    eval_rows: int = 8
    checkpoint_dir: str | None = None
    checkpoint_every: int = 50
    resume: bool = True

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"unknown mode {self.mode!r}; choose one of {list(MODES)}")
        if self.inputs not in INPUTS:
            raise ValueError(f"unknown inputs {self.inputs!r}; choose one of {list(INPUTS)}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"unknown schedule {self.schedule!r}; choose one of {list(SCHEDULES)}")
        unknown = [t for t in self.train if t not in TRAINABLE]
        if unknown:
            raise ValueError(f"unknown trainable {unknown[0]!r} in train; choose from {list(TRAINABLE)}")
        if self.iters < 0 or self.batch_size < 1 or self.eval_rows < 0 or self.checkpoint_every < 0:
            raise ValueError("iters, eval_rows and checkpoint_every must be >= 0 and batch_size >= 1")
        if self.rows is not None and self.rows < 1:
            raise ValueError(f"rows must be >= 1 or None, got {self.rows}")
        for name in ("lr", "scale_lr", "weight_lr"):
            v = getattr(self, name)
            if v is not None and not (v > 0 and math.isfinite(v)):
                raise ValueError(f"{name} must be a positive number, got {v}")

    def distill_settings(self) -> DistillSettings:
        """The plain DistillSettings part of (a subclass of) these settings."""
        names = [f.name for f in DistillSettings.__dataclass_fields__.values()]
        return DistillSettings(**{n: getattr(self, n) for n in names})


# ----------------------------------------------------------------------------------------------------
# compensation modules (attached to QuantLinear.extras)


class Compensation(nn.Module):
    """Base of trainable output corrections `extra(x, y_q) -> delta` living in `QuantLinear.extras`.

    It owns a copy of its layer's input transform (smoothing / rotation) and activation quantizer, so
    `quant_input(x)` is the very x' the layer multiplies its weight with. Subclasses implement
    `delta(xq, x, y_q)`; `export_init()` returns the constructor arguments (plain data).
    """

    def __init__(self, in_features: int, out_features: int, act_spec: dict | None = None,
                 smooth: bool = False, rotation: bool = False) -> None:
        super().__init__()
        self.in_features, self.out_features = int(in_features), int(out_features)
        self.act_spec = None if act_spec is None else dict(act_spec)
        self.register_buffer("smooth", torch.ones(self.in_features) if smooth else None)
        self.register_buffer("rotation", torch.eye(self.in_features) if rotation else None)
        if act_spec is not None:
            from workbench.quant.config import spec_from_dict

            self.input_quantizer: Quantizer | None = Quantizer(spec_from_dict(act_spec, where="compensation act"))
        else:
            self.input_quantizer = None

    def _init_kwargs(self) -> dict[str, Any]:
        return {"in_features": self.in_features, "out_features": self.out_features, "act_spec": self.act_spec,
                "smooth": self.smooth is not None, "rotation": self.rotation is not None}

    def export_init(self) -> dict[str, Any]:
        return self._init_kwargs()

    def adopt_input_side(self, layer: QuantLinear) -> Compensation:
        """Copy the layer's input transform and activation quantizer state (static ranges included)."""
        with torch.no_grad():
            if self.smooth is not None and layer.smooth is not None:
                self.smooth = layer.smooth.detach().clone()
            if self.rotation is not None and layer.rotation is not None:
                self.rotation = layer.rotation.detach().clone()
            iq = layer.input_quantizer
            if self.input_quantizer is not None and iq is not None and not iq.spec.dynamic and iq.calibrated:
                self.input_quantizer._set(iq.scale.detach(), iq.zero.detach())
                if iq.bucket_scale.numel():
                    self.input_quantizer.bucket_scale.data = iq.bucket_scale.detach().clone()
                    self.input_quantizer.bucket_zero.data = iq.bucket_zero.detach().clone()
        return self

    @staticmethod
    def layer_kwargs(layer: QuantLinear) -> dict[str, Any]:
        """Constructor arguments describing `layer`'s input side."""
        iq = layer.input_quantizer
        return {"in_features": layer.in_features, "out_features": layer.out_features,
                "act_spec": None if iq is None else iq.spec.to_dict(),
                "smooth": layer.smooth is not None, "rotation": layer.rotation is not None}

    def quant_input(self, x: torch.Tensor) -> torch.Tensor:
        """x' = fq((x / s) R), as the layer computes it."""
        xt = x
        if self.smooth is not None:
            xt = xt / self.smooth.to(xt.dtype)
        if self.rotation is not None:
            xt = xt @ self.rotation.to(xt.dtype)
        iq = self.input_quantizer
        if iq is not None and iq.mode == "quantize":
            xt = iq(xt)
        return xt

    def delta(self, xq: torch.Tensor, x: torch.Tensor, y_q: torch.Tensor) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError

    def weight_delta(self) -> torch.Tensor | None:
        """The (out, in) matrix this branch adds to the effective weight, when it is a linear map."""
        return None

    def forward(self, x: torch.Tensor, y_q: torch.Tensor) -> torch.Tensor:
        return self.delta(self.quant_input(x), x, y_q)


class WeightDelta(nn.Module):
    """Base of trainable weight parametrizations (torch.nn.utils.parametrize): forward(W) -> W + delta.
    Training them and then `bake_weight_deltas` changes the weight the quantizer sees (no extra branch)."""

    def delta(self) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return w + self.delta().to(w.dtype)


class LowRankWeightDelta(WeightDelta):
    """W + B A (B: out x rank, zero at start; A: rank x in, Kaiming-uniform from `generator`)."""

    def __init__(self, out_features: int, in_features: int, rank: int, generator: torch.Generator | None = None) -> None:
        super().__init__()
        a = torch.empty(rank, in_features)
        bound = 1.0 / math.sqrt(in_features)
        a.uniform_(-bound, bound, generator=generator)
        self.A = nn.Parameter(a)
        self.B = nn.Parameter(torch.zeros(out_features, rank))

    def delta(self) -> torch.Tensor:
        return self.B @ self.A


def add_weight_delta(layer: QuantLinear, delta: WeightDelta) -> None:
    """Parametrize `layer.weight` as delta(W) (the layer stops caching its quantized weight meanwhile)."""
    from torch.nn.utils import parametrize

    parametrize.register_parametrization(layer, "weight", delta)
    layer.cache_weight = False
    layer._weight_cache = None


@torch.no_grad()
def bake_weight_deltas(model: nn.Module) -> list[str]:
    """Fold every WeightDelta parametrization of `model`'s QuantLinears into the weight; returns the layers."""
    from torch.nn.utils import parametrize

    done = []
    for name, m in list(model.named_modules()):
        if isinstance(m, QuantLinear) and parametrize.is_parametrized(m, "weight"):
            parametrize.remove_parametrizations(m, "weight", leave_parametrized=True)
            m.weight.requires_grad_(False)
            m.cache_weight = True
            m._weight_cache = None
            done.append(name)
    return done


def weight_deltas(model: nn.Module) -> dict[str, WeightDelta]:
    """Every WeightDelta parametrization in `model` by the name of its QuantLinear."""
    out = {}
    for name, m in model.named_modules():
        par = getattr(m, "parametrizations", None)
        if isinstance(m, QuantLinear) and par is not None and "weight" in par:
            for d in par["weight"]:
                if isinstance(d, WeightDelta):
                    out[name] = d
    return out


def compensations(model: nn.Module) -> dict[str, Compensation]:
    """Every Compensation module in `model` by name."""
    return {n: m for n, m in model.named_modules() if isinstance(m, Compensation)}


# ----------------------------------------------------------------------------------------------------
# loss terms


@dataclass
class TermContext:
    """What an extra loss term sees at one step.

    pred / target: the unit's output (block: (B, S, D) tokens; e2e: the transformer output).
    token_weights: (B, S) or None. grid: (frames, height, width) of the token grid or None.
    generator: the loop's generator (use it for any randomness, so resuming is exact).
    """

    pred: torch.Tensor
    target: torch.Tensor
    unit: str
    iteration: int
    timesteps: torch.Tensor
    token_weights: torch.Tensor | None
    grid: tuple[int, int, int] | None
    mode: str
    generator: torch.Generator

    def tokens(self, x: torch.Tensor) -> torch.Tensor:
        """x as (B, S, D) tokens (e2e outputs (B, C, F, H, W) become one token per pixel)."""
        if self.mode == "block":
            return x
        b, c = x.shape[:2]
        return x.reshape(b, c, -1).transpose(1, 2)

    def frames(self, x: torch.Tensor) -> torch.Tensor:
        """x as (B, F, N): one feature vector per frame."""
        if self.mode == "e2e":
            return x.transpose(1, 2).reshape(x.shape[0], x.shape[2], -1)
        if self.grid is None:
            raise ValueError("frame relations need the token grid (frames x height x width); this model's "
                             "grid is unknown (supported: Wan-style transformers with a 3D patch_size)")
        f = self.grid[0]
        if x.shape[1] % f:
            raise ValueError(f"{x.shape[1]} tokens do not split into {f} frames")
        return x.reshape(x.shape[0], f, -1)


@dataclass
class Term:
    """An extra loss term: `weight * fn(ctx)`; fn may have reset(unit) / state_dict() / load_state_dict()."""

    name: str
    weight: float
    fn: Callable[[TermContext], torch.Tensor]


def frame_similarity(frames: torch.Tensor) -> torch.Tensor:
    """(B, F, N) -> (B, F, F) cosine similarity between the frames."""
    f = F.normalize(frames.float(), dim=-1)
    return f @ f.transpose(1, 2)


def relation_kl(pred_sim: torch.Tensor, target_sim: torch.Tensor, tau: float = 1.0) -> torch.Tensor:
    """KL(softmax(target / tau) || softmax(pred / tau)) over the last dim, mean over rows."""
    logp = F.log_softmax(pred_sim / tau, dim=-1)
    logt = F.log_softmax(target_sim / tau, dim=-1)
    return (logt.exp() * (logt - logp)).sum(-1).mean()


def weighted_rel_mse(pred: torch.Tensor, target: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """sum_s w_s ||pred_s - target_s||^2 / sum_s ||target_s||^2 over tokens (B, S, D); w: (B, S) or None."""
    err = (pred.float() - target.float()).pow(2)
    den = target.float().pow(2).sum().clamp(min=1e-12)
    if weights is None:
        return err.sum() / den
    return (err.sum(-1) * weights).sum() / den


# ----------------------------------------------------------------------------------------------------
# rows: calibration calls split into rows


class _Rows:
    """Calls of one signature stored row-wise: per-row leaves stacked (N, ...), shared leaves kept once."""

    def __init__(self, calls: list[dict[str, Any]], batches: list[int]) -> None:
        flat = [pytree.tree_flatten(c) for c in calls]
        self.spec = flat[0][1]
        n_leaves = len(flat[0][0])
        for leaves, spec in flat:
            if spec != self.spec or len(leaves) != n_leaves:
                raise ValueError("calibration calls differ in structure; distillation needs calls of one kind")
        self.per_row: dict[int, torch.Tensor] = {}
        self.shared: dict[int, Any] = {}
        all_single = all(b == 1 for b in batches)
        for i in range(n_leaves):
            vals = [leaves[i] for leaves, _ in flat]
            v0 = vals[0]
            row_wise = isinstance(v0, torch.Tensor) and v0.dim() > 0 and all(
                isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape[0] == b for v, b in zip(vals, batches))
            if row_wise and all_single and all(torch.equal(v, v0) for v in vals[1:]):
                row_wise = False  # identical batch-1 leaves (e.g. rotary tables) are shared
            if row_wise:
                self.per_row[i] = torch.cat([v.detach() for v in vals])
            else:
                self.shared[i] = v0
        self.n = int(sum(batches))

    def batch(self, idx: torch.Tensor, device: torch.device | None = None) -> dict[str, Any]:
        leaves = []
        for i in range(len(self.per_row) + len(self.shared)):
            v = self.per_row[i][idx] if i in self.per_row else self.shared[i]
            if device is not None and isinstance(v, torch.Tensor):
                v = v.to(device)
            leaves.append(v)
        return pytree.tree_unflatten(leaves, self.spec)

    def replace(self, leaf: int, value: torch.Tensor) -> _Rows:
        """A shallow copy whose per-row leaf `leaf` is `value` (N, ...)."""
        new = object.__new__(_Rows)
        new.spec, new.n, new.shared = self.spec, self.n, self.shared
        new.per_row = dict(self.per_row)
        new.per_row[leaf] = value
        return new


def _bind(fn: Callable, args: tuple, kwargs: dict) -> dict[str, Any]:
    """args / kwargs as one kwargs dict (names from fn's signature)."""
    try:
        return dict(inspect.signature(fn).bind(*args, **kwargs).arguments)
    except (TypeError, ValueError):
        if args:
            raise ValueError(f"cannot bind positional block arguments to names for {fn}") from None
        return dict(kwargs)


class _Stop(Exception):
    pass


@torch.no_grad()
def _first_block_calls(transformer: nn.Module, block: nn.Module, entries: list) -> list[dict[str, Any]]:
    """Inputs of `block` (kwargs form) for every calibration entry; the forward stops at the block."""
    from workbench.stages.calibration import _to

    device = next(transformer.parameters()).device
    calls: list[dict[str, Any]] = []

    def hook(module, args, kwargs):  # noqa: ANN001
        calls.append(_cpu(_bind(module.forward, args, kwargs)))
        raise _Stop

    handle = block.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for e in entries:
            try:
                transformer(*_to(e.args, device), **_to(e.kwargs, device))
            except _Stop:
                pass
    finally:
        handle.remove()
    if len(calls) != len(entries):
        raise RuntimeError("the first transformer block was not called for every calibration entry")
    return calls


def _cpu(x: Any) -> Any:
    return pytree.tree_map(lambda v: v.detach().cpu() if isinstance(v, torch.Tensor) else v, x)


def _output(out: Any) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (tuple, list)):
        return out[0]
    return getattr(out, "sample", out)


def token_grid(transformer: nn.Module, latent_shape: tuple[int, ...]) -> tuple[int, int, int] | None:
    """(frames, height, width) of the transformer's token grid for a latent (B, C, F, H, W), or None."""
    cfg = getattr(transformer, "config", None)
    p = getattr(cfg, "patch_size", None) if cfg is not None else None
    if isinstance(p, (tuple, list)) and len(p) == 3 and len(latent_shape) == 5:
        f, h, w = latent_shape[2:]
        if f % p[0] == 0 and h % p[1] == 0 and w % p[2] == 0:
            return f // p[0], h // p[1], w // p[2]
    return None


def _hidden_leaf(call: dict[str, Any]) -> tuple[str, int]:
    """(name, leaf index) of the hidden states: the first argument of the block."""
    name = next(iter(call))
    leaves, _ = pytree.tree_flatten(call)
    target = call[name]
    for i, v in enumerate(leaves):
        if v is target:
            return name, i
    raise ValueError(f"the block's first argument {name!r} is not a tensor")


# ----------------------------------------------------------------------------------------------------
# what is trained


def make_scales_learnable(layer: QuantLinear) -> nn.Parameter | None:
    """Turn `layer`'s static weight quantizer into one with a learnable scale (same calibrated range)."""
    wq = layer.weight_quantizer
    if wq is None or wq.spec.dynamic or wq.spec.timestep_wise or wq.spec.fixed_range is not None:
        return None
    if not wq.spec.learnable_scale:
        new = Quantizer(wq.spec.with_(learnable_scale=True), is_weight=True).to(wq.zero.device)
        new._set(wq.scale.detach().clone(), wq.zero.detach().clone())
        new.mode = wq.mode
        layer.weight_quantizer = new
        layer._weight_cache = None
        wq = new
    return wq.scale if isinstance(wq.scale, nn.Parameter) and wq.scale.numel() else None


def param_groups(unit: nn.Module, s: DistillSettings) -> list[dict[str, Any]]:
    """AdamW parameter groups of the things `s.train` names inside `unit` (unique, ordered)."""
    seen: set[int] = set()

    def take(ps: Iterable[nn.Parameter]) -> list[nn.Parameter]:
        out = []
        for p in ps:
            if p is not None and p.numel() and id(p) not in seen:
                seen.add(id(p))
                out.append(p)
        return out

    groups = []
    qls = [m for m in unit.modules() if isinstance(m, QuantLinear)]
    if "extras" in s.train:
        ps = take(p for c in compensations(unit).values() for n, p in c.named_parameters()
                  if not n.startswith("input_quantizer."))
        ps += take(p for d in weight_deltas(unit).values() for p in d.parameters())
        if ps:
            groups.append({"name": "extras", "params": ps, "lr": s.lr, "weight_decay": s.weight_decay})
    if "scales" in s.train:
        ps = take(make_scales_learnable(q) for q in qls)
        if ps:
            groups.append({"name": "scales", "params": ps, "lr": s.scale_lr or s.lr / 10, "weight_decay": 0.0})
    if "weights" in s.train:
        ps = take(_raw_weight(q) for q in qls if q.weight_quantizer is not None)
        if ps:
            groups.append({"name": "weights", "params": ps, "lr": s.weight_lr or s.lr / 100, "weight_decay": 0.0})
    return groups


def _raw_weight(q: QuantLinear) -> nn.Parameter:
    par = getattr(q, "parametrizations", None)
    if par is not None and "weight" in par:
        return par["weight"].original
    return q.weight


@torch.no_grad()
def _post_step(groups: list[dict[str, Any]]) -> None:
    for g in groups:
        if g["name"] == "scales":
            for p in g["params"]:
                p.clamp_(min=1e-8)


# ----------------------------------------------------------------------------------------------------
# the loop


TokenWeightFn = Callable[[str, nn.Module, Callable[[torch.Tensor], dict[str, Any]], int], torch.Tensor]


@dataclass
class UnitResult:
    """Curves and errors of one trained unit (a block, or the whole transformer)."""

    unit: str
    trained: bool
    params: int = 0
    curves: dict[str, list[float]] = field(default_factory=dict)  # "total", "rec", term names
    err_before: float | None = None
    err_after: float | None = None
    seconds: float = 0.0


@dataclass
class DistillResult:
    """What `run_distillation` did: per-unit results, whether it resumed, the token grid."""

    units: list[UnitResult]
    resumed_from: str | None
    grid: tuple[int, int, int] | None
    rows: int
    seconds: float
    token_weights: dict[str, torch.Tensor] = field(default_factory=dict)  # unit -> (eval rows, S)


def _select_rows(n_entries_rows: list[int], rows: int | None) -> list[int]:
    total = sum(n_entries_rows)
    if rows is None or rows >= total:
        return list(range(total))
    return torch.linspace(0, total - 1, rows).round().long().unique().tolist()


def _fingerprint(name: str, s: DistillSettings, units: list[str], n_rows: int, terms: list[Term],
                 extra: dict[str, Any] | None) -> str:
    d = {k: v for k, v in asdict(s).items() if k not in ("checkpoint_dir", "checkpoint_every", "resume")}
    blob = json.dumps({"name": name, "settings": plain(d), "units": units, "rows": n_rows,
                       "terms": [(t.name, t.weight) for t in terms], "extra": plain(extra or {})},
                      sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _lr_factor(s: DistillSettings, it: int) -> float:
    if s.schedule == "constant" or s.iters <= 1:
        return 1.0
    return 0.5 * (1.0 + math.cos(math.pi * it / s.iters))


def run_distillation(
    session: Session,
    settings: DistillSettings,
    *,
    name: str = "distill",
    terms: list[Term] | None = None,
    token_weights: TokenWeightFn | None = None,
    on_step: Callable[[str, int, float], None] | None = None,
    fingerprint_extra: dict[str, Any] | None = None,
) -> DistillResult:
    """Train `session.qtransformer` per the settings (module docstring); returns curves and errors.

    terms: extra loss terms. token_weights(unit, fp_block, batch_fn, n_rows) -> (N, S) per-token weights
    of the reconstruction loss (block mode; batch_fn(idx) gives the FP block's kwargs for rows idx).
    on_step(unit, iteration, loss) is called after every step (tests use it to interrupt a run).
    """
    s = settings
    terms = list(terms or [])
    if session.calibration is None or not session.calibration.entries:
        raise ValueError("distillation needs calibration data: run collect_calibration(session) first")
    if session.quant_config is None and not any(isinstance(m, QuantLinear) for m in session.qtransformer.modules()):
        raise ValueError("the session's transformer is not quantized: run apply_quantization(session) first")
    t_start = time.perf_counter()
    fp, q = session.fp_transformer, session.qtransformer
    device = next(q.parameters()).device
    entries = list(session.calibration.entries)
    row_ts = torch.cat([torch.full((e.batch,), float(e.timestep)) for e in entries])
    keep = torch.tensor(_select_rows([e.batch for e in entries], s.rows))
    row_ts = row_ts[keep]
    n = int(keep.numel())
    lat = _latent_shape(entries[0])
    grid = token_grid(fp, lat) if lat is not None else None

    if s.mode == "block":
        from workbench.models.adapters import named_transformer_blocks

        blocks = named_transformer_blocks(q)
        if not blocks:
            raise ValueError(f"no transformer blocks found in {type(q).__name__}; use mode='e2e'")
        unit_names = [b for b, _ in blocks]
        if s.blocks is not None:
            unknown = [b for b in s.blocks if b not in unit_names]
            if unknown:
                raise ValueError(f"unknown block {unknown[0]!r}; blocks: {', '.join(unit_names)}")
    else:
        unit_names = ["transformer"]
    todo = set(unit_names if s.blocks is None or s.mode == "e2e" else s.blocks)
    fingerprint = _fingerprint(name, s, unit_names, n, terms, fingerprint_extra)
    ckpt_path = None if s.checkpoint_dir is None else Path(s.checkpoint_dir) / f"{name}.pt"
    state = _load_checkpoint(ckpt_path, fingerprint) if (ckpt_path is not None and s.resume) else None
    resumed_from = None
    if state is not None:
        q.load_state_dict(state["model"], strict=True)
        resumed_from = f"{ckpt_path} (unit {state['unit']}, iteration {state['iteration']})"

    gen = torch.Generator().manual_seed(s.seed)
    results: list[UnitResult] = [UnitResult(u, u in todo) for u in unit_names]
    if state is not None:
        gen.set_state(state["generator"])
        for r, saved in zip(results, state["results"]):
            r.__dict__.update(saved)
        for t, ts in zip(terms, state.get("terms", [])):
            if ts is not None and hasattr(t.fn, "load_state_dict"):
                t.fn.load_state_dict(ts)
    start_unit = 0 if state is None else state["unit"]
    start_iter = 0 if state is None else state["iteration"]
    eval_idx = torch.linspace(0, n - 1, min(s.eval_rows, n)).round().long().unique() if s.eval_rows else None
    captured_weights: dict[str, torch.Tensor] = {}

    def save(unit_i: int, it: int, opt: torch.optim.Optimizer | None) -> None:
        if ckpt_path is None:
            return
        payload = {
            "fingerprint": fingerprint, "unit": unit_i, "iteration": it, "model": q.state_dict(),
            "optimizer": None if opt is None else opt.state_dict(), "generator": gen.get_state(),
            "results": [asdict(r) for r in results],
            "terms": [t.fn.state_dict() if hasattr(t.fn, "state_dict") else None for t in terms],
        }
        ckpt_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = ckpt_path.with_suffix(".tmp")
        torch.save(payload, tmp)
        os.replace(tmp, ckpt_path)

    if s.mode == "block":
        fp_blocks = [fp.get_submodule(b) for b in unit_names]
        q_blocks = [q.get_submodule(b) for b in unit_names]
        fp_calls = _first_block_calls(fp, fp_blocks[0], entries)
        q_calls = fp_calls if s.inputs == "fp" else _first_block_calls(q, q_blocks[0], entries)
        batches = [e.batch for e in entries]
        fp_rows, q_rows = _Rows(fp_calls, batches), _Rows(q_calls, batches)
        hname, hleaf = _hidden_leaf(fp_calls[0])
        fp_h = fp_rows.per_row[hleaf][keep]
        q_h = q_rows.per_row[hleaf][keep] if s.inputs == "quant" else fp_h
        fp_rows = _subset(fp_rows, keep)
        q_rows = _subset(q_rows, keep)
        for ui, (uname, fb, qb) in enumerate(zip(unit_names, fp_blocks, q_blocks)):
            fp_batch = _batch_fn(fp_rows, hleaf, fp_h, device)
            q_batch = _batch_fn(q_rows, hleaf, q_h, device)
            target = _propagate(fb, fp_batch, n, row_ts, fp_h.device)
            w = None
            if token_weights is not None and uname in todo:
                w = token_weights(uname, fb, fp_batch, n).detach().float().cpu()
                captured_weights[uname] = w if eval_idx is None else w[eval_idx]
            if uname in todo and ui >= start_unit:
                resuming = state is not None and ui == start_unit
                _train_unit(session, s, uname, ui, qb, q_batch, target, w, row_ts, terms, gen, results[ui],
                            start_iter if resuming else 0, grid, eval_idx, device, save, on_step,
                            opt_state=state["optimizer"] if resuming else None)
                save(ui + 1, 0, None)
            q_h = _propagate(qb, q_batch, n, row_ts, fp_h.device) if s.inputs == "quant" else target
            fp_h = target
    else:
        calls = [_cpu(_bind(fp.forward, e.args, e.kwargs)) for e in entries]
        batches = [e.batch for e in entries]
        rows = _subset(_Rows(calls, batches), keep)
        batch = lambda idx: rows.batch(idx, device)  # noqa: E731
        target = _propagate_model(fp, batch, n, row_ts)
        if start_unit == 0:
            _train_unit(session, s, "transformer", 0, q, batch, target, None, row_ts, terms, gen, results[0],
                        start_iter, grid, eval_idx, device, save, on_step,
                        opt_state=None if state is None else state["optimizer"], whole_model=True)
            save(1, 0, None)
    return DistillResult(results, resumed_from, grid, n, time.perf_counter() - t_start, captured_weights)


def _latent_shape(entry) -> tuple[int, ...] | None:  # noqa: ANN001
    from workbench.stages.calibration import _hidden_states

    try:
        return tuple(_hidden_states(entry).shape)
    except StopIteration:
        return None


def _subset(rows: _Rows, keep: torch.Tensor) -> _Rows:
    new = object.__new__(_Rows)
    new.spec, new.shared = rows.spec, rows.shared
    new.per_row = {i: v[keep] for i, v in rows.per_row.items()}
    new.n = int(keep.numel())
    return new


def _batch_fn(rows: _Rows, hleaf: int, hidden: torch.Tensor, device: torch.device) -> Callable[[torch.Tensor], dict]:
    r = rows.replace(hleaf, hidden)
    return lambda idx: r.batch(idx, device)


def _timestep_groups(idx: torch.Tensor, row_ts: torch.Tensor) -> list[torch.Tensor]:
    ts = row_ts[idx]
    return [idx[ts == t] for t in ts.unique(sorted=True).flip(0)]


def _has_timestep_wise(module: nn.Module) -> bool:
    return any(isinstance(m, Quantizer) and m.spec.timestep_wise for m in module.modules())


def _run(unit: nn.Module, batch: Callable, idx: torch.Tensor, row_ts: torch.Tensor, split: bool) -> torch.Tensor:
    """unit(**batch(idx)) under the rows' timestep (split into timestep groups when quantizers need it);
    output rows in the order of idx."""
    groups = _timestep_groups(idx, row_ts) if split else [idx]
    outs = []
    for g in groups:
        with at_timestep(float(row_ts[g[0]])):
            outs.append(_output(unit(**batch(g))))
    if len(outs) == 1:
        return outs[0]
    pos = {int(p): i for i, p in enumerate(torch.cat(groups))}
    return torch.cat(outs)[torch.tensor([pos[int(i)] for i in idx])]


@torch.no_grad()
def _propagate(block: nn.Module, batch: Callable, n: int, row_ts: torch.Tensor, store: torch.device) -> torch.Tensor:
    """The block's output hidden states for all n rows (chunks of CHUNK_ROWS rows, fixed order)."""
    split = _has_timestep_wise(block)
    outs = [_run(block, batch, idx, row_ts, split).to(store) for idx in torch.arange(n).split(CHUNK_ROWS)]
    return torch.cat(outs)


@torch.no_grad()
def _propagate_model(model: nn.Module, batch: Callable, n: int, row_ts: torch.Tensor) -> torch.Tensor:
    outs = [_run(model, batch, idx, row_ts, True).float().cpu() for idx in torch.arange(n).split(CHUNK_ROWS)]
    return torch.cat(outs)


def _train_unit(session, s, uname, ui, unit, batch, target, weights, row_ts, terms, gen, result, start_iter,  # noqa: ANN001, PLR0913
                grid, eval_idx, device, save, on_step, opt_state=None, whole_model=False) -> None:
    """Optimise one unit (see run_distillation)."""
    t0 = time.perf_counter()
    groups = param_groups(unit, s)
    params = [p for g in groups for p in g["params"]]
    result.params = int(sum(p.numel() for p in params))
    for t in terms:
        if hasattr(t.fn, "reset") and start_iter == 0:
            t.fn.reset(uname)
    split = _has_timestep_wise(unit)
    mode = "e2e" if whole_model else "block"
    if eval_idx is not None and start_iter == 0:
        result.err_before = _eval_error(unit, batch, target, eval_idx, row_ts, split, device)
    if not params or s.iters == 0:
        result.err_after = result.err_before if eval_idx is not None else None
        result.seconds = time.perf_counter() - t0
        return
    snapshot = [p.detach().clone() for p in params]
    opt = torch.optim.AdamW([{k: v for k, v in g.items() if k != "name"} for g in groups], betas=(0.9, 0.999))
    if opt_state is not None and start_iter > 0:
        opt.load_state_dict(opt_state)
    base_lrs = [g["lr"] for g in groups]
    for p in params:
        p.requires_grad_(True)
    n = target.shape[0]
    curves = result.curves
    try:
        bar = tqdm(range(start_iter, s.iters), desc=f"distill {uname}", disable=not session.progress, leave=False,
                   initial=start_iter, total=s.iters)
        for it in bar:
            idx = _sample(gen, n, s.batch_size, row_ts, split)
            f = _lr_factor(s, it)
            for g, lr in zip(opt.param_groups, base_lrs):
                g["lr"] = lr * f
            pred = _run(unit, batch, idx, row_ts, False if not split else True)
            tgt = target[idx].to(pred.device)
            w = None if weights is None else weights[idx].to(pred.device)
            ctx = TermContext(pred, tgt, uname, it, row_ts[idx], w, grid, mode, gen)
            rec = weighted_rel_mse(ctx.tokens(pred), ctx.tokens(tgt), w)
            parts = {"rec": rec}
            total = rec
            for t in terms:
                v = t.fn(ctx)
                parts[t.name] = v
                total = total + t.weight * v
            if not torch.isfinite(total):
                bad = [k for k, v in parts.items() if not torch.isfinite(v)]
                raise DistillDivergedError(
                    f"distillation diverged in {uname} at iteration {it + 1} of {s.iters}: the loss is "
                    f"{float(total.detach())} ({', '.join(bad) or 'total'} term). Lower the learning rate (lr={s.lr:g}; "
                    f"try lr={s.lr / 10:g}) or train fewer components; {uname} was restored to its state before "
                    "this training (earlier blocks keep theirs)"
                )
            opt.zero_grad(set_to_none=True)
            total.backward()
            if s.grad_clip is not None:
                gn = torch.nn.utils.clip_grad_norm_(params, s.grad_clip)
                if not torch.isfinite(gn):
                    raise DistillDivergedError(
                        f"distillation diverged in {uname} at iteration {it + 1} of {s.iters}: the gradient "
                        f"is {float(gn)}. Lower the learning rate (lr={s.lr:g}; try lr={s.lr / 10:g}); {uname} "
                        "was restored to its state before this training")
            opt.step()
            _post_step(groups)
            curves.setdefault("total", []).append(float(total.detach()))
            for k, v in parts.items():
                curves.setdefault(k, []).append(float(v.detach()))
            if s.checkpoint_every and (it + 1) % s.checkpoint_every == 0 and it + 1 < s.iters:
                save(ui, it + 1, opt)
            if on_step is not None:
                on_step(uname, it + 1, float(total.detach()))
    except DistillDivergedError:
        with torch.no_grad():
            for p, v in zip(params, snapshot):
                p.copy_(v)
        raise
    finally:
        for p in params:
            p.requires_grad_(False)
            p.grad = None
    if eval_idx is not None:
        result.err_after = _eval_error(unit, batch, target, eval_idx, row_ts, split, device)
    result.seconds += time.perf_counter() - t0


def _sample(gen: torch.Generator, n: int, k: int, row_ts: torch.Tensor, same_timestep: bool) -> torch.Tensor:
    if not same_timestep:
        return torch.randperm(n, generator=gen)[:k].sort().values
    uniq = row_ts.unique()
    t = uniq[torch.randint(len(uniq), (1,), generator=gen)]
    pool = torch.nonzero(row_ts == t).flatten()
    return pool[torch.randperm(len(pool), generator=gen)[:k]].sort().values


@torch.no_grad()
def _eval_error(unit, batch, target, idx, row_ts, split, device) -> float:  # noqa: ANN001
    num = den = 0.0
    for part in idx.split(CHUNK_ROWS):
        pred = _run(unit, batch, part, row_ts, split).float()
        tgt = target[part].to(pred.device).float()
        num += float((pred - tgt).pow(2).sum())
        den += float(tgt.pow(2).sum())
    return num / den if den > 0 else num


def _load_checkpoint(path: Path, fingerprint: str) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # noqa: BLE001
        raise ValueError(f"checkpoint {path} cannot be read ({type(e).__name__}: {e}); delete it to start over") from None
    if state.get("fingerprint") != fingerprint:
        raise ValueError(
            f"checkpoint {path} was written by a run with other settings, calibration data or blocks; use another "
            "checkpoint_dir, delete the file, or set resume=False to start over"
        )
    return state


# ----------------------------------------------------------------------------------------------------
# the plain stage and its report


def unit_rows(result: DistillResult) -> list[dict[str, Any]]:
    """One table row per unit: trained, parameters, first / last loss, block error before / after."""
    rows = []
    for r in result.units:
        tot = r.curves.get("total", [])
        rows.append({
            "block": r.unit, "trained": r.trained, "params": r.params, "iterations": len(tot),
            "loss_first": tot[0] if tot else None, "loss_last": tot[-1] if tot else None,
            "err_before": r.err_before, "err_after": r.err_after, "seconds": r.seconds,
        })
    return rows


def curves_of(result: DistillResult, every: int = 1) -> dict[str, Any]:
    """{"total": {unit: [...]}, <term>: {unit: [...]}} (every `every`-th step) for the report arrays."""
    out: dict[str, dict[str, list[float]]] = {}
    for r in result.units:
        for key, ys in r.curves.items():
            out.setdefault(key, {})[r.unit] = ys[::every]
    return out


def distill_summary(result: DistillResult) -> dict[str, float]:
    done = [r for r in result.units if r.err_before is not None and r.err_after is not None and r.trained]
    return {
        "units_trained": sum(r.trained for r in result.units),
        "iterations": sum(len(r.curves.get("total", [])) for r in result.units),
        "trained_params": max([r.params for r in result.units] or [0]),
        "mean_err_before": sum(r.err_before for r in done) / len(done) if done else float("nan"),
        "mean_err_after": sum(r.err_after for r in done) / len(done) if done else float("nan"),
        "resumed": float(result.resumed_from is not None),
        "rows": result.rows,
    }


def distill(session: Session, settings: DistillSettings | None = None) -> StageReport:
    """Block-wise (or end-to-end) reconstruction of the quantized transformer's trainable parts."""
    s = settings or DistillSettings()
    t0 = time.perf_counter()
    result = run_distillation(session, s, name="distill")
    notes = [f"resumed from {result.resumed_from}"] if result.resumed_from else []
    report = StageReport(
        name="distill", settings=asdict(s), summary=distill_summary(result),
        tables={"blocks": unit_rows(result)}, arrays={"curves": curves_of(result)}, notes=notes,
        seconds=time.perf_counter() - t0,
    )
    return session.add(report)


# ----------------------------------------------------------------------------------------------------
# figures (registered in workbench.viz.DRAWINGS by name)


def distill_figures(report) -> list:  # noqa: ANN001
    """Loss curves per block and term, block error before / after training."""
    from workbench.viz.figures import grouped_bars, lines

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


def register_drawing(name: str, fn: Callable) -> None:
    """Make `StageReport.figures()` draw reports called `name` with `fn`."""
    from workbench.viz import DRAWINGS

    DRAWINGS[name] = fn


register_drawing("distill", distill_figures)


__all__ = [
    "Compensation", "LowRankWeightDelta", "WeightDelta", "add_weight_delta", "bake_weight_deltas", "weight_deltas",
    "DistillDivergedError", "DistillResult", "DistillSettings", "Term", "TermContext",
    "UnitResult", "compensations", "curves_of", "distill", "distill_figures", "distill_summary", "frame_similarity",
    "make_scales_learnable", "param_groups", "register_drawing", "relation_kl", "run_distillation", "token_grid",
    "unit_rows", "weighted_rel_mse",
]
