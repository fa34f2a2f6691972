"""`run_distillation`: the training loop shared by the distillation recipes (Q-VDiT, S2Q-VDiT, MPQ-DMv2).

It reads as four phases:

1. Rows. Every recorded call of the calibration cache is split into rows (one video of one sampling step;
   with guidance, the conditional and unconditional halves are separate rows); `rows` evenly spaced
   rows are kept (`rows.Rows`).
2. Units. Block mode captures the inputs of the first transformer block of the FP model (and of the
   quantized model: its embedders may be quantized too), then walks the blocks in order: the FP block
   gives the target, the quantized block is trained to match it, and the next block's inputs come from
   the quantized model's previous blocks (`inputs="quant"`, as BRECQ / Q-VDiT) or from the FP ones
   (`inputs="fp"`). End-to-end mode (`mode="e2e"`) trains the whole transformer on its final output.
3. Training one unit (`train_unit`): the weighted relative MSE plus extra `Term`s (`losses`), AdamW over
   the parameter groups of `trainable`, cosine decay, gradient clipping, one seeded generator for batch
   sampling and the terms' randomness. A NaN/inf loss or gradient stops with `DistillDivergedError`
   naming the block and the iteration; the block is restored to its state before training.
4. Checkpoints (`checkpoint`): with `checkpoint_dir`, the full state (quantized model, optimizer,
   generator, term states, curves) is written every `checkpoint_every` iterations and when a unit ends;
   running again with the same settings resumes there and ends with the same result as an uninterrupted
   run (block inputs are recomputed from the restored model, bit for bit).

Several ranks (torchrun, `workbench.distributed`): the same phases on every rank. Each step every rank draws the
same global batch from the seeded generator and computes its slice of the rows; the slices are gathered and every
rank computes the one-process loss on the whole batch (`RowSplit`), so the gradient equals the one-process
gradient up to float rounding. Block mode trains an FSDP2-sharded copy of each quantized block (its trainable
parameters created first) against a sharded copy of the FP block, then copies the trained values back into the
session's model on every rank. End-to-end mode keeps the transformer replicated and all-reduces the gradients
of its trainable parameters: they are small (scales, low-rank branches) and the whole model must sit on every
rank for e2e anyway, so sharding it would save little and make the session's model a sharded one. Rows that
only run forward (targets, block inputs, errors) are computed by every rank for all rows. `batch_size` must be
at least the number of ranks (every rank runs the same forward and backward calls each step).
"""

from __future__ import annotations

import gc
import math
import time
import warnings
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from torch import nn
from tqdm.auto import tqdm

from workbench import distributed
from workbench.distributed import sharding
from workbench.distributed.data_parallel import RowSplit
from workbench.quant import QuantLinear
from workbench.session import Session
from workbench.io.checkpoint import fingerprint
from workbench.stages import interrupt
from workbench.stages.distill.checkpoint import LoopCheckpoint, OptimizerRestore
from workbench.stages.distill.losses import Term, TermContext, rel_mse_denominator, weighted_rel_mse
from workbench.stages.distill.rows import (Rows, bind_call, call_tokens, first_block_calls, has_timestep_wise,
                                           hidden_leaf, propagate, run_unit, sample_rows, select_rows, to_cpu,
                                           unit_error)
from workbench.stages.distill.settings import DistillDivergedError, DistillSettings
from workbench.stages.distill.trainable import param_groups, post_step
from workbench.io.plain import plain

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


@dataclass
class UnitJob:
    """Everything `train_unit` needs about one unit: what to run, on which rows, against which target."""

    name: str
    index: int
    module: nn.Module
    batch: Callable[[torch.Tensor], dict[str, Any]]  # rows -> the unit's call kwargs
    target: torch.Tensor  # (N, ...) FP outputs of the unit
    row_ts: torch.Tensor  # (N,) timestep of each row
    weights: torch.Tensor | None = None  # (N, S) per-token loss weights
    whole_model: bool = False
    start_iter: int = 0
    opt_state: OptimizerRestore | None = None  # fills the fresh optimizer when resuming mid-unit


@dataclass
class LoopState:
    """What the loop carries across units: settings, terms, the generator, results, evaluation rows, the
    checkpoint writer and how a step's rows are shared by the ranks."""

    session: Session
    settings: DistillSettings
    terms: list[Term]
    generator: torch.Generator
    results: list[UnitResult]
    grid: tuple[int, int, int] | None
    eval_idx: torch.Tensor | None
    device: torch.device
    save: Callable[[int, int, torch.optim.Optimizer | None, UnitJob | None], None]
    on_step: Callable[[str, int, float], None] | None
    split: RowSplit = field(default_factory=RowSplit)


def _lr_factor(s: DistillSettings, it: int) -> float:
    if s.schedule == "constant" or s.iters <= 1:
        return 1.0
    return 0.5 * (1.0 + math.cos(math.pi * it / s.iters))


def _latent_shape(entry) -> tuple[int, ...] | None:  # noqa: ANN001
    from workbench.stages.calibration import hidden_states_of

    try:
        return tuple(hidden_states_of(entry).shape)
    except StopIteration:
        return None


def _unit_names(q: nn.Module, s: DistillSettings) -> list[str]:
    if s.mode != "block":
        return ["transformer"]
    from workbench.models.adapters import named_transformer_blocks

    blocks = named_transformer_blocks(q)
    if not blocks:
        raise ValueError(f"no transformer blocks found in {type(q).__name__}; use mode='e2e'")
    names = [b for b, _ in blocks]
    unknown = [b for b in (s.blocks or []) if b not in names]
    if unknown:
        raise ValueError(f"unknown block {unknown[0]!r}; blocks: {', '.join(names)}")
    return names


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
    from workbench.models.adapters import token_grid

    s = settings
    terms = list(terms or [])
    if session.calibration is None or not session.calibration.entries:
        raise ValueError("distillation needs calibration data: run collect_calibration(session) first")
    if session.quant_config is None and not any(isinstance(m, QuantLinear) for m in session.qtransformer.modules()):
        raise ValueError("the session's transformer is not quantized: run apply_quantization(session) first")
    t_start = time.perf_counter()
    fp, q = session.fp_transformer, session.qtransformer
    home = next(q.parameters()).device
    device = distributed.rank_device(s.device) if s.device is not None else home
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"distillation device {s.device!r} asks for CUDA, which this machine lacks: pass device=None")
    split = RowSplit("local")
    if distributed.active():
        split = RowSplit("fsdp" if s.mode == "block" else "allreduce")
        if s.batch_size < distributed.world():
            raise ValueError(
                f"distillation batch_size {s.batch_size} is smaller than the {distributed.world()} ranks: every rank "
                f"computes at least one row of each step; raise batch_size to >= {distributed.world()} or use fewer "
                "ranks")

    # phase 1: rows
    entries = list(session.calibration.entries)
    row_ts = torch.cat([torch.full((e.batch,), float(e.timestep)) for e in entries])
    keep = torch.tensor(select_rows([e.batch for e in entries], s.rows))
    row_ts = row_ts[keep]
    n = int(keep.numel())
    lat = _latent_shape(entries[0])
    grid = token_grid(fp, lat) if lat is not None else None
    unit_names = _unit_names(q, s)
    todo = set(unit_names if s.blocks is None or s.mode == "e2e" else s.blocks)

    # resume point
    d = {k: v for k, v in asdict(s).items() if k not in ("checkpoint_dir", "checkpoint_every", "resume", "device")}
    fp_hash = fingerprint({"name": name, "settings": plain(d), "units": unit_names, "rows": n,
                           "terms": [(t.name, t.weight) for t in terms], "extra": plain(fingerprint_extra or {})})
    ckpt = None if s.checkpoint_dir is None else LoopCheckpoint(Path(s.checkpoint_dir) / name, fp_hash)
    state = ckpt.load(q) if (ckpt is not None and s.resume) else None
    gen = torch.Generator().manual_seed(s.seed)
    results = [UnitResult(u, u in todo) for u in unit_names]
    resumed_from = None
    if state is not None:
        gen.set_state(state.generator)
        for r, saved in zip(results, state.results):
            r.__dict__.update(saved)
        for t, ts in zip(terms, state.terms):
            if ts is not None and hasattr(t.fn, "load_state_dict"):
                t.fn.load_state_dict(ts)
        resumed_from = state.where
    start_unit = 0 if state is None else state.unit
    start_iter = 0 if state is None else state.iteration
    opt_state = None if state is None else state.optimizer
    trained_keys: set[str] = set() if state is None else set(state.trained_keys)  # what distributed saves hold

    def save(unit_i: int, it: int, opt: torch.optim.Optimizer | None, job: UnitJob | None = None) -> None:
        if ckpt is None:
            return
        loop_state = {"generator": gen.get_state(), "results": [asdict(r) for r in results],
                      "terms": [t.fn.state_dict() if hasattr(t.fn, "state_dict") else None for t in terms]}
        ckpt.save(q, unit_i, it, loop_state, opt, None if job is None else job.module,
                  "" if job is None or job.whole_model else f"{job.name}.", trained_keys)

    eval_idx = torch.linspace(0, n - 1, min(s.eval_rows, n)).round().long().unique() if s.eval_rows else None
    loop = LoopState(session, s, terms, gen, results, grid, eval_idx, device, save, on_step, split)
    captured: dict[str, torch.Tensor] = {}

    # phase 2: units, in order
    if s.mode == "block":
        fp_blocks = [fp.get_submodule(b) for b in unit_names]
        q_blocks = [q.get_submodule(b) for b in unit_names]
        fp_calls = first_block_calls(fp, fp_blocks[0], entries)
        q_calls = fp_calls if s.inputs == "fp" else first_block_calls(q, q_blocks[0], entries)
        batches = [e.batch for e in entries]
        fp_rows, q_rows = Rows(fp_calls, batches), Rows(q_calls, batches)
        _, hleaf = hidden_leaf(fp_calls[0])
        fp_h = fp_rows.per_row[hleaf][keep]
        q_h = q_rows.per_row[hleaf][keep] if s.inputs == "quant" else fp_h
        fp_rows, q_rows = fp_rows.subset(keep), q_rows.subset(keep)
        for ui, (uname, fb, qb) in enumerate(zip(unit_names, fp_blocks, q_blocks)):
            trained = uname in todo and ui >= start_unit
            if split.parallel:  # sharded copies on this rank's device; the session's blocks stay as they are
                names = trainable_names(qb, s) if trained else set()
                trained_keys.update(f"{uname}.{k}" for k in names)
                teacher = sharding.shard_copy(fb, device, reshard_after_forward=True)
                student = no_weight_cache(sharding.shard_copy(qb, device, names))
            else:
                fb.to(device), qb.to(device)  # streaming: only this block's teacher and student on the device
                teacher, student = fb, qb
            fp_batch = fp_rows.batch_fn(hleaf, fp_h, device)
            q_batch = q_rows.batch_fn(hleaf, q_h, device)
            target = propagate(teacher, fp_batch, n, row_ts, fp_h.device)
            del teacher  # a sharded copy is freed here; the session's FP block stays
            weights = None
            if token_weights is not None and uname in todo:
                with _on_device(fb, device, home) if split.parallel else nullcontext():
                    weights = token_weights(uname, fb, fp_batch, n).detach().float().cpu()
                captured[uname] = weights if eval_idx is None else weights[eval_idx]
            if trained:
                resuming = state is not None and ui == start_unit
                train_unit(loop, UnitJob(uname, ui, student, q_batch, target, row_ts, weights,
                                         start_iter=start_iter if resuming else 0,
                                         opt_state=opt_state if resuming else None))
                if split.parallel:
                    sharding.copy_back(student, qb, names)
                save(ui + 1, 0, None)
            q_h = propagate(student, q_batch, n, row_ts, fp_h.device) if s.inputs == "quant" else target
            fp_h = target
            if split.parallel:
                del student
                gc.collect()  # FSDP modules hold reference cycles: free this block's shards now
            else:
                fb.to(home), qb.to(home)
    else:
        if device != home:
            raise ValueError("mode='e2e' trains the whole transformer on its own device: leave device unset (or "
                             "use mode='block' to stream blocks to another device)")
        calls = [to_cpu(bind_call(fp.forward, e.args, e.kwargs)) for e in entries]
        rows = Rows(calls, [e.batch for e in entries]).subset(keep)
        batch = lambda idx: rows.batch(idx, device)  # noqa: E731
        target = propagate(fp, batch, n, row_ts, torch.device("cpu"), split=True).float()
        if start_unit == 0:
            if split.parallel:
                trained_keys.update(trainable_names(q, s))
            train_unit(loop, UnitJob("transformer", 0, q, batch, target, row_ts, None, whole_model=True,
                                     start_iter=start_iter, opt_state=opt_state))
            save(1, 0, None)
    return DistillResult(results, resumed_from, grid, n, time.perf_counter() - t_start, captured)


@contextmanager
def checkpointed_blocks(model: nn.Module, on: bool) -> Iterator[None]:
    """While active, every transformer block of `model` runs under activation checkpointing (non-reentrant):
    backward recomputes the block from its inputs, so only block boundaries are kept for the whole model."""
    from torch.utils.checkpoint import checkpoint

    from workbench.models.adapters import transformer_blocks

    blocks = list(transformer_blocks(model)) if on else []
    for b in blocks:
        inner = b.forward
        b.forward = lambda *a, _f=inner, **k: checkpoint(_f, *a, use_reentrant=False, **k)  # instance attribute
    try:
        yield
    finally:
        for b in blocks:
            del b.forward


def train_unit(loop: LoopState, job: UnitJob) -> None:
    """Optimise one unit (phase 3 of the module docstring)."""
    s, result = loop.settings, loop.results[job.index]
    t0 = time.perf_counter()
    groups = param_groups(job.module, s)
    params = [p for g in groups for p in g["params"]]
    result.params = int(sum(p.numel() for p in params))
    for t in loop.terms:
        if hasattr(t.fn, "reset") and job.start_iter == 0:
            t.fn.reset(job.name)
    split = has_timestep_wise(job.module)
    mode = "e2e" if job.whole_model else "block"
    if loop.eval_idx is not None and job.start_iter == 0:
        result.err_before = unit_error(job.module, job.batch, job.target, loop.eval_idx, job.row_ts, split)
    if not params or s.iters == 0:
        result.err_after = result.err_before if loop.eval_idx is not None else None
        result.seconds = time.perf_counter() - t0
        return
    snapshot = [p.detach().clone() for p in params]
    opt = torch.optim.AdamW([{k: v for k, v in g.items() if k != "name"} for g in groups], betas=(0.9, 0.999))
    if job.opt_state is not None and job.start_iter > 0:
        job.opt_state(job.module, opt)
    base_lrs = [g["lr"] for g in groups]
    for p in params:
        p.requires_grad_(True)
    n = job.target.shape[0]
    recompute = s.grad_checkpoint if s.grad_checkpoint is not None else params[0].is_cuda
    try:
        with checkpointed_blocks(job.module, job.whole_model and recompute):
            bar = tqdm(range(job.start_iter, s.iters), desc=f"distill {job.name}", disable=not loop.session.progress,
                       leave=False, initial=job.start_iter, total=s.iters)
            for it in bar:
                idx = sample_rows(loop.generator, n, s.batch_size, job.row_ts, split)
                for g, lr in zip(opt.param_groups, base_lrs):
                    g["lr"] = lr * _lr_factor(s, it)
                opt.zero_grad(set_to_none=True)
                total, parts = _step_gradient(loop, job, idx, it, split, mode, params)
                if s.grad_clip is not None:
                    gn = sharding.full_tensor(torch.nn.utils.clip_grad_norm_(params, s.grad_clip))
                    if not torch.isfinite(gn):
                        raise DistillDivergedError(
                            f"distillation diverged in {job.name} at iteration {it + 1} of {s.iters}: the gradient "
                            f"is {float(gn)}. Lower the learning rate (lr={s.lr:g}; try lr={s.lr / 10:g}); {job.name} "
                            "was restored to its state before this training")
                opt.step()
                post_step(groups)
                result.curves.setdefault("total", []).append(float(total.detach()))
                for k, v in parts.items():
                    result.curves.setdefault(k, []).append(float(v.detach()))
                if s.checkpoint_every and (it + 1) % s.checkpoint_every == 0 and it + 1 < s.iters:
                    loop.save(job.index, it + 1, opt, job)
                if loop.on_step is not None:
                    loop.on_step(job.name, it + 1, float(total.detach()))
                if it + 1 < s.iters:  # a Ctrl-C asked for a stop: save this position, then stop (resumable)
                    stop_point(lambda it=it: loop.save(job.index, it + 1, opt, job),
                               f"{job.name}, iteration {it + 1}/{s.iters}")
    except DistillDivergedError:
        with torch.no_grad():
            for p, v in zip(params, snapshot):
                p.copy_(v)
        raise
    finally:
        for p in params:
            p.requires_grad_(False)
            p.grad = None
    if loop.eval_idx is not None:
        result.err_after = unit_error(job.module, job.batch, job.target, loop.eval_idx, job.row_ts, split)
        if result.err_before is not None and result.err_after > result.err_before:
            warnings.warn(f"distillation made {job.name} worse: its error on the evaluation rows rose from "
                          f"{result.err_before:.4g} to {result.err_after:.4g}; lower the learning rate (lr={s.lr:g})",
                          RuntimeWarning, stacklevel=2)
    result.seconds += time.perf_counter() - t0


def train_rows(batch: Callable[[torch.Tensor], dict[str, Any]], tokens: int) -> int | None:
    """Rows per forward + backward pass of a training step: `tokens` tokens' worth, at least 1 (None: no limit)."""
    return None if tokens <= 0 else max(1, tokens // call_tokens(batch))


def _step_gradient(loop: LoopState, job: UnitJob, idx: torch.Tensor, it: int, split: bool, mode: str,
                   params: list[nn.Parameter]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """One step's loss and its parts, with the gradient of the loss left in `params`. When this rank's rows hold
    more than `train_chunk_tokens` tokens, they run in chunks (the same gradient as one pass, one chunk's
    activations alive at a time): the reconstruction loss alone is a sum over rows with the batch's denominator,
    so each chunk back-propagates its share; with terms that mix rows, a no-grad forward of all rows gives the
    loss's gradient w.r.t. the unit's output first, and each chunk, run again, back-propagates its rows' part."""
    local = loop.split.rows(idx)
    per = train_rows(job.batch, loop.settings.train_chunk_tokens)
    if per is None or local.numel() <= per:
        total, parts = _loss(loop, job, idx, it, split, mode)
        loop.split.backward(total, params)
        return total, parts
    chunks = local.split(per)
    if not loop.terms and not loop.split.parallel:
        # the reconstruction loss alone is a sum over rows with one denominator: each chunk back-propagates its
        # share, no extra forward
        den = rel_mse_denominator(job.target[idx]).to(loop.device)  # tokens() only reorders: the same sum
        total = torch.zeros((), device=loop.device)
        for c in chunks:
            cctx = _context(loop, job, c, it, mode, run_unit(job.module, job.batch, c, job.row_ts, split),
                            job.target[c])
            part = weighted_rel_mse(cctx.tokens(cctx.pred), cctx.tokens(cctx.target), cctx.token_weights, den=den)
            part.backward()
            total = total + part.detach()
        _check_finite(loop, job, it, total, {"rec": total})
        return total, {"rec": total}
    with torch.no_grad():
        out = torch.cat([run_unit(job.module, job.batch, c, job.row_ts, split) for c in chunks])
    leaf = out.requires_grad_()
    total, parts = _loss(loop, job, idx, it, split, mode, pred=loop.split.gather(leaf, idx))
    (grad,) = torch.autograd.grad(total * loop.split.loss_scale, leaf)
    del leaf, out
    for c, g in zip(chunks, grad.split(per)):
        run_unit(job.module, job.batch, c, job.row_ts, split).backward(g)
    loop.split.finish(params)
    return total.detach(), {k: v.detach() for k, v in parts.items()}


def _context(loop: LoopState, job: UnitJob, idx: torch.Tensor, it: int, mode: str, pred: torch.Tensor,
             target: torch.Tensor) -> TermContext:
    """The loss terms' view of rows idx (targets and token weights moved to the prediction's device)."""
    tgt = target.to(pred.device)
    w = None if job.weights is None else job.weights[idx].to(pred.device)
    return TermContext(pred, tgt, job.name, it, job.row_ts[idx], w, loop.grid, mode, loop.generator)


def _loss(loop: LoopState, job: UnitJob, idx: torch.Tensor, it: int, split: bool,
          mode: str, pred: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Total loss of one step and its parts (reconstruction first); NaN/inf raises DistillDivergedError.
    pred: the unit's output for rows idx when already computed (else the unit runs here)."""
    if pred is None:
        pred = loop.split.gather(run_unit(job.module, job.batch, loop.split.rows(idx), job.row_ts, split), idx)
    ctx = _context(loop, job, idx, it, mode, pred, job.target[idx])
    rec = weighted_rel_mse(ctx.tokens(pred), ctx.tokens(ctx.target), ctx.token_weights)
    parts = {"rec": rec}
    total = rec
    for t in loop.terms:
        v = t.fn(ctx)
        parts[t.name] = v
        total = total + t.weight * v
    _check_finite(loop, job, it, total, parts)
    return total, parts


def _check_finite(loop: LoopState, job: UnitJob, it: int, total: torch.Tensor, parts: dict[str, torch.Tensor]) -> None:
    """DistillDivergedError when a step's loss is NaN / inf, naming the term."""
    s = loop.settings
    if not torch.isfinite(total):
        bad = [k for k, v in parts.items() if not torch.isfinite(v)]
        raise DistillDivergedError(
            f"distillation diverged in {job.name} at iteration {it + 1} of {s.iters}: the loss is "
            f"{float(total.detach())} ({', '.join(bad) or 'total'} term). Lower the learning rate (lr={s.lr:g}; "
            f"try lr={s.lr / 10:g}) or train fewer components; {job.name} was restored to its state before "
            "this training (earlier blocks keep theirs)")


def stop_point(save: Callable[[], None], where: str) -> None:
    """`interrupt.check` that all ranks pass alike: a stop asked for on any rank stops every rank here."""
    if distributed.active() and distributed.any_rank(interrupt.stop_requested()):
        interrupt.request_stop()
    interrupt.check(save, where)


def trainable_names(unit: nn.Module, s: DistillSettings) -> set[str]:
    """Names (inside `unit`) of the parameters `s.train` trains; creates them first where they are created on
    demand (learnable weight scales), so a copy of `unit` made afterwards holds them."""
    ids = {id(p) for g in param_groups(unit, s) for p in g["params"]}
    return {name for name, p in unit.named_parameters() if id(p) in ids}


def no_weight_cache(unit: nn.Module) -> nn.Module:
    """`unit` (a sharded copy) without quantized-weight caches: they are keyed on parameter storage, which FSDP2
    swaps between its shards and the gathered values, so the copy recomputes fq(W) at every call."""
    for m in unit.modules():
        if isinstance(m, QuantLinear):
            m.cache_weight, m._weight_cache = False, None
    return unit


@contextmanager
def _on_device(module: nn.Module, device: torch.device, home: torch.device) -> Iterator[nn.Module]:
    """Within the block `module` is on `device`, afterwards back on `home`."""
    try:
        yield module.to(device)
    finally:
        module.to(home)


__all__ = ["DistillResult", "LoopState", "TokenWeightFn", "UnitJob", "UnitResult", "no_weight_cache",
           "run_distillation", "stop_point", "train_unit", "trainable_names"]
