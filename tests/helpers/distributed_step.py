"""One distillation step of block 0 of the shared tiny quantized session (distill_helpers), computed the way the
distillation loop computes it: in one process (`RowSplit("local")`), or split over the ranks of a process group
with an FSDP2-sharded copy of the block (`"fsdp"`) or a replicated block (`"allreduce"`).

The block trains its learnable weight scales and a low-rank weight correction (a parametrization, with a random
B so every trainable tensor gets a gradient) on a global batch of 5 rows: with 2 ranks the rows split 3 / 2, so
uneven slices are covered. tests/distributed/dp_worker.py runs it under torchrun; the test runs it locally."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from distill_helpers import fresh
from workbench.distributed import sharding
from workbench.distributed.data_parallel import RowSplit
from workbench.quant import QuantLinear
from workbench.quant.compensation import LowRankWeightDelta, add_weight_delta
from workbench.stages.distill import DistillSettings
from workbench.stages.distill.loop import no_weight_cache, trainable_names
from workbench.stages.distill.losses import weighted_rel_mse
from workbench.stages.distill.rows import Rows, first_block_calls, propagate, run_unit

ROWS = torch.tensor([0, 2, 3, 5, 6])  # the global batch of the step
LR = 1e-3


@dataclass
class Step:
    module: nn.Module  # the trained block (a sharded copy for "fsdp")
    names: list[str]  # its trainable parameters
    grads: dict[str, torch.Tensor]  # full gradients after backward
    optimizer: torch.optim.Optimizer  # AdamW after one step
    loss: float


def block_with_delta() -> tuple[nn.Module, nn.Module, list]:
    session = fresh()
    fp, q = session.fp_transformer, session.qtransformer
    g = torch.Generator().manual_seed(5)
    for m in q.blocks[0].modules():
        if isinstance(m, QuantLinear):
            d = LowRankWeightDelta(m.out_features, m.in_features, 2, g)
            d.B.data.normal_(0.0, 0.01, generator=g)
            add_weight_delta(m, d)
    return fp, q, list(session.calibration.entries)


def training_step(kind: str) -> Step:
    """One AdamW step of block 0 on rows ROWS, as the loop does it in mode `kind` (see module docstring)."""
    fp, q, entries = block_with_delta()
    calls = first_block_calls(fp, fp.blocks[0], entries)
    rows = Rows(calls, [e.batch for e in entries])
    row_ts = torch.cat([torch.full((e.batch,), float(e.timestep)) for e in entries])
    batch = lambda idx: rows.batch(idx)  # noqa: E731
    target = propagate(fp.blocks[0], batch, rows.n, row_ts, torch.device("cpu"))
    block = q.blocks[0]
    names = sorted(trainable_names(block, DistillSettings(train=["scales", "extras"])))
    if kind == "fsdp":
        block = no_weight_cache(sharding.shard_copy(block, torch.device("cpu"), names))
    params = [p for n, p in block.named_parameters() if n in names]
    for p in params:
        p.requires_grad_(True)
    split = RowSplit(kind)
    pred = split.gather(run_unit(block, batch, split.rows(ROWS), row_ts, False), ROWS)
    loss = weighted_rel_mse(pred, target[ROWS])
    split.backward(loss, params)
    grads = {n: sharding.full_tensor(p.grad).clone() for n, p in block.named_parameters() if n in names}
    opt = torch.optim.AdamW(params, lr=LR)
    opt.step()
    return Step(block, names, grads, opt, float(loss.detach()))


def full_values(module: nn.Module, names: list[str]) -> dict[str, torch.Tensor]:
    """Full values of parameters `names` (a collective for a sharded module)."""
    sharding.reshard(module)
    params = dict(module.named_parameters())
    return {n: sharding.full_tensor(params[n].detach()).clone() for n in names}
