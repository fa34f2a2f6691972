"""Calibration calls as training rows: one video of one sampling step (with guidance, the conditional and
unconditional halves are separate rows), stored row-wise so a batch of any rows can be assembled, plus the
plumbing that runs a unit (a block or the whole transformer) on rows under their timesteps."""

from __future__ import annotations

import inspect
from typing import Any, Callable

import torch
from torch import nn
from torch.utils import _pytree as pytree

from workbench.quant import Quantizer, at_timestep

CHUNK_ROWS = 16  # at most this many rows per forward-only call (block inputs, targets, errors, token weights)
CHUNK_TOKENS = 16 * 4096  # and at most about this many tokens: 16 rows of a small model, 2 of Wan2.1's 32,760


def call_tokens(batch: Callable[[torch.Tensor], dict[str, Any]]) -> int:
    """Tokens one row of a unit's calls holds (its first tensor argument of 2+ dims, without the channel dim)."""
    call = batch(torch.arange(1))
    hidden = next((v for v in call.values() if isinstance(v, torch.Tensor) and v.dim() >= 2), None)
    return 1 if hidden is None else max(1, hidden[0].numel() // hidden.shape[-1])


def chunk_rows(batch: Callable[[torch.Tensor], dict[str, Any]]) -> int:
    """Rows per forward-only call of a unit: CHUNK_TOKENS tokens' worth (at least 1, at most CHUNK_ROWS), so that
    a block's activations for the chunk stay small next to the model (16 rows of Wan2.1's 32,760 tokens through
    a block hold 9.4 GB of FFN activations alone). Training steps chunk by `DistillSettings.train_chunk_tokens`."""
    return max(1, min(CHUNK_ROWS, CHUNK_TOKENS // call_tokens(batch)))


class Rows:
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
        """The call (kwargs) holding rows `idx`, on `device`."""
        leaves = []
        for i in range(len(self.per_row) + len(self.shared)):
            v = self.per_row[i][idx] if i in self.per_row else self.shared[i]
            if device is not None and isinstance(v, torch.Tensor):
                v = v.to(device)
            leaves.append(v)
        return pytree.tree_unflatten(leaves, self.spec)

    def replace(self, leaf: int, value: torch.Tensor) -> Rows:
        """A shallow copy whose per-row leaf `leaf` is `value` (N, ...)."""
        new = object.__new__(Rows)
        new.spec, new.n, new.shared = self.spec, self.n, self.shared
        new.per_row = dict(self.per_row)
        new.per_row[leaf] = value
        return new

    def subset(self, keep: torch.Tensor) -> Rows:
        """Only rows `keep`, in that order."""
        new = object.__new__(Rows)
        new.spec, new.shared = self.spec, self.shared
        new.per_row = {i: v[keep] for i, v in self.per_row.items()}
        new.n = int(keep.numel())
        return new

    def batch_fn(self, hleaf: int, hidden: torch.Tensor, device: torch.device) -> Callable[[torch.Tensor], dict]:
        """idx -> the call with the hidden-states leaf replaced by `hidden` (block inputs of one model)."""
        r = self.replace(hleaf, hidden)
        return lambda idx: r.batch(idx, device)


def select_rows(rows_per_entry: list[int], rows: int | None) -> list[int]:
    """`rows` row indices spread evenly over all rows (None: all)."""
    total = sum(rows_per_entry)
    if rows is None or rows >= total:
        return list(range(total))
    return torch.linspace(0, total - 1, rows).round().long().unique().tolist()


def bind_call(fn: Callable, args: tuple, kwargs: dict) -> dict[str, Any]:
    """args / kwargs as one kwargs dict (names from fn's signature)."""
    try:
        return dict(inspect.signature(fn).bind(*args, **kwargs).arguments)
    except (TypeError, ValueError):
        if args:
            raise ValueError(f"cannot bind positional block arguments to names for {fn}") from None
        return dict(kwargs)


def to_cpu(x: Any) -> Any:
    """Every tensor in a pytree detached and on the CPU."""
    return pytree.tree_map(lambda v: v.detach().cpu() if isinstance(v, torch.Tensor) else v, x)


class _Stop(Exception):
    pass


@torch.no_grad()
def first_block_calls(transformer: nn.Module, block: nn.Module, entries: list) -> list[dict[str, Any]]:
    """Inputs of `block` (kwargs form) for every calibration entry; the forward stops at the block."""
    from workbench.stages.calibration import to_device

    device = next(transformer.parameters()).device
    calls: list[dict[str, Any]] = []

    def hook(module, args, kwargs):  # noqa: ANN001
        calls.append(to_cpu(bind_call(module.forward, args, kwargs)))
        raise _Stop

    handle = block.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for e in entries:
            try:
                transformer(*to_device(e.args, device), **to_device(e.kwargs, device))
            except _Stop:
                pass
    finally:
        handle.remove()
    if len(calls) != len(entries):
        raise RuntimeError("the first transformer block was not called for every calibration entry")
    return calls


def output_tensor(out: Any) -> torch.Tensor:
    """The first output of a module call (tensor, tuple or diffusers output object)."""
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (tuple, list)):
        return out[0]
    return getattr(out, "sample", out)


def hidden_leaf(call: dict[str, Any]) -> tuple[str, int]:
    """(name, leaf index) of the hidden states: the first argument of the block."""
    name = next(iter(call))
    leaves, _ = pytree.tree_flatten(call)
    target = call[name]
    for i, v in enumerate(leaves):
        if v is target:
            return name, i
    raise ValueError(f"the block's first argument {name!r} is not a tensor")


def has_timestep_wise(module: nn.Module) -> bool:
    """True when a quantizer inside needs the rows' timestep (timestep-wise ranges)."""
    return any(isinstance(m, Quantizer) and m.spec.timestep_wise for m in module.modules())


def _timestep_groups(idx: torch.Tensor, row_ts: torch.Tensor) -> list[torch.Tensor]:
    ts = row_ts[idx]
    return [idx[ts == t] for t in ts.unique(sorted=True).flip(0)]


def run_unit(unit: nn.Module, batch: Callable, idx: torch.Tensor, row_ts: torch.Tensor, split: bool) -> torch.Tensor:
    """unit(**batch(idx)) under the rows' timestep (split into timestep groups when quantizers need it);
    output rows in the order of idx."""
    groups = _timestep_groups(idx, row_ts) if split else [idx]
    outs = []
    for g in groups:
        with at_timestep(float(row_ts[g[0]])):
            outs.append(output_tensor(unit(**batch(g))))
    if len(outs) == 1:
        return outs[0]
    pos = {int(p): i for i, p in enumerate(torch.cat(groups))}
    return torch.cat(outs)[torch.tensor([pos[int(i)] for i in idx])]


@torch.no_grad()
def propagate(unit: nn.Module, batch: Callable, n: int, row_ts: torch.Tensor, store: torch.device,
              split: bool | None = None) -> torch.Tensor:
    """The unit's output for all n rows (chunks of `chunk_rows` rows, fixed order), stored on `store`."""
    split = has_timestep_wise(unit) if split is None else split
    rows = chunk_rows(batch)
    outs = [run_unit(unit, batch, idx, row_ts, split).to(store) for idx in torch.arange(n).split(rows)]
    return torch.cat(outs)


def sample_rows(gen: torch.Generator, n: int, k: int, row_ts: torch.Tensor, same_timestep: bool) -> torch.Tensor:
    """k distinct rows of n (from one timestep when `same_timestep`), sorted."""
    if not same_timestep:
        return torch.randperm(n, generator=gen)[:k].sort().values
    uniq = row_ts.unique()
    t = uniq[torch.randint(len(uniq), (1,), generator=gen)]
    pool = torch.nonzero(row_ts == t).flatten()
    return pool[torch.randperm(len(pool), generator=gen)[:k]].sort().values


@torch.no_grad()
def unit_error(unit: nn.Module, batch: Callable, target: torch.Tensor, idx: torch.Tensor, row_ts: torch.Tensor,
               split: bool) -> float:
    """Relative MSE of the unit's output against `target` on rows `idx`."""
    num = den = 0.0
    for part in idx.split(chunk_rows(batch)):
        pred = run_unit(unit, batch, part, row_ts, split).float()
        tgt = target[part].to(pred.device).float()
        num += float((pred - tgt).pow(2).sum())
        den += float(tgt.pow(2).sum())
    return num / den if den > 0 else num


__all__ = ["CHUNK_ROWS", "CHUNK_TOKENS", "Rows", "bind_call", "call_tokens", "chunk_rows", "first_block_calls",
           "has_timestep_wise", "hidden_leaf", "output_tensor", "propagate", "run_unit", "sample_rows", "select_rows",
           "to_cpu", "unit_error"]
