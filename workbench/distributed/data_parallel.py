"""Data parallelism for a training step whose loss must equal the one-process loss.

Every rank draws the same global batch of rows (same seeded generator). `RowSplit.rows(idx)` gives this rank its
contiguous slice of `idx`; the rank runs the model on those rows only; `RowSplit.gather(local, idx)` puts the
slices of all ranks back together in the order of `idx`. Every rank then computes the *same* loss on the whole
batch, so loss terms that mix rows (relation losses, memory queues, anything that draws randomness per row) are
exactly the one-process terms.

The gather's backward hands each rank the gradient of its own rows only (no communication: all ranks computed
the identical loss), so rank r's parameter gradient is its share of the whole-batch gradient, and the sum over
ranks is the one-process gradient. `RowSplit.backward` makes that sum:

* "fsdp": FSDP2 averages gradients over ranks, so the loss is scaled by the world size before backward;
* "allreduce": replicated parameters (no FSDP), their gradients are summed with one all-reduce;
* "local": one process, plain backward.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.distributed as dist
from torch import nn

from workbench.distributed.group import active, rank, world

KINDS = ("local", "fsdp", "allreduce")


def row_counts(n: int, ranks: int) -> list[int]:
    """How many of n rows each rank takes (contiguous slices, the first n % ranks ranks one more)."""
    return [n // ranks + (1 if r < n % ranks else 0) for r in range(ranks)]


class _GatherRows(torch.autograd.Function):
    """All ranks' row slices concatenated; backward returns this rank's slice of the incoming gradient."""

    @staticmethod
    def forward(ctx, local: torch.Tensor, counts: Sequence[int], me: int) -> torch.Tensor:  # noqa: ANN001
        most = max(counts)
        padded = local.new_zeros((most, *local.shape[1:]))
        padded[: local.shape[0]] = local
        parts = [torch.empty_like(padded) for _ in counts]
        dist.all_gather(parts, padded.contiguous())
        ctx.start, ctx.count = sum(counts[:me]), counts[me]
        return torch.cat([p[:c] for p, c in zip(parts, counts)])

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # noqa: ANN001, ANN205
        return grad[ctx.start: ctx.start + ctx.count], None, None


def all_reduce_grads(params: Sequence[nn.Parameter]) -> None:
    """Sum the gradients of replicated parameters over all ranks (one flat all-reduce; a missing gradient
    counts as zeros, so every rank sends the same shapes)."""
    if not active() or not params:
        return
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    flat = torch.cat([p.grad.reshape(-1) for p in params])
    dist.all_reduce(flat)
    offset = 0
    for p in params:
        n = p.numel()
        p.grad.copy_(flat[offset: offset + n].view_as(p.grad))
        offset += n


@dataclass(frozen=True)
class RowSplit:
    """How the rows of one step are shared by the ranks and how their gradients are made whole (module doc)."""

    kind: str = "local"

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown RowSplit kind {self.kind!r}; choose one of {list(KINDS)}")
        if self.kind != "local" and not active():
            raise ValueError(f"RowSplit({self.kind!r}) needs a process group (torchrun); use RowSplit('local')")

    @property
    def parallel(self) -> bool:
        return self.kind != "local"

    def rows(self, idx: torch.Tensor) -> torch.Tensor:
        """This rank's contiguous slice of the global rows `idx` (all of them in one process)."""
        if not self.parallel:
            return idx
        counts = row_counts(int(idx.numel()), world())
        start = sum(counts[: rank()])
        return idx[start: start + counts[rank()]]

    def gather(self, local: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """The outputs of all rows `idx` (rank order = the order of idx) from this rank's `local` outputs."""
        if not self.parallel:
            return local
        return _GatherRows.apply(local, row_counts(int(idx.numel()), world()), rank())

    @property
    def loss_scale(self) -> int:
        """What the whole-batch loss is multiplied by before backward (FSDP2 averages gradients over ranks)."""
        return world() if self.kind == "fsdp" else 1

    def finish(self, params: Sequence[nn.Parameter]) -> None:
        """After all backward calls of a step: sum replicated parameters' gradients over ranks ("allreduce")."""
        if self.kind == "allreduce":
            all_reduce_grads(params)

    def backward(self, loss: torch.Tensor, params: Sequence[nn.Parameter]) -> None:
        """Backward of the whole-batch `loss` (identical on every rank) leaving the one-process gradient in
        every trainable parameter (sharded or replicated)."""
        (loss * self.loss_scale).backward()
        self.finish(params)


__all__ = ["KINDS", "RowSplit", "all_reduce_grads", "row_counts"]
