"""The distributed code paths inside this process, under a one-rank gloo process group (what
`torchrun --nproc-per-node 1` gives): calibration through the shard folder and distillation through FSDP2 and
distributed checkpoints give exactly the one-process results, and checkpoints move between the two kinds of run
as the resume rules say."""
from __future__ import annotations

import copy
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import pytest
import torch
import torch.distributed as dist

from distill_helpers import fresh, state_of
from stage_helpers import tiny_world_model
from workbench import distributed
from workbench.io.checkpoint import CheckpointError
from workbench.session import Session
from workbench.stages import CalibrationSettings, collect_calibration
from workbench.stages.distill import DistillSettings, run_distillation
from workbench.stages.distill.checkpoint import LoopCheckpoint


@contextmanager
def one_rank_group() -> Iterator[None]:
    """A gloo process group of this process alone, for the block."""
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield
    finally:
        distributed.shutdown(ok=False)
    assert not distributed.active()


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def _calibrate(settings: CalibrationSettings) -> Session:
    session = Session.start(tiny_world_model(), seed=0)
    collect_calibration(session, settings)
    return session


def _same_cache(a, b) -> None:  # noqa: ANN001
    assert len(a.entries) == len(b.entries) and a.prompts == b.prompts and a.seeds == b.seeds
    for x, y in zip(a.entries, b.entries):
        assert (x.step, x.timestep, x.batch, x.prompt_ids) == (y.step, y.timestep, y.batch, y.prompt_ids)
        assert (x.path is None) == (y.path is None)  # in memory / spilled exactly where one process has it
        for u, v in zip([*x.args, *x.kwargs.values()], [*y.args, *y.kwargs.values()]):
            assert not isinstance(u, torch.Tensor) or torch.equal(u, v)


@pytest.mark.parametrize("spill", [True, False])
def test_calibration_through_the_shard_folder_is_the_one_process_cache(spill, tmp_path):
    # 3 prompts in batches of 2 (the last batch smaller), 3 steps; max_mb holds 4 calls of the first batch: past
    # it calls are written to disk (spill), or (no spill) one process plans to keep 2 of the 3 steps
    settings = dict(prompts=3, steps=3, batch_size=2, spill=spill)
    per_call = _calibrate(CalibrationSettings(**settings)).calibration.entries[0].nbytes
    settings["max_mb"] = (4 * per_call + 100) / 2**20
    alone = _calibrate(CalibrationSettings(**settings, spill_dir=str(tmp_path / "alone")))
    with one_rank_group():
        grouped = _calibrate(CalibrationSettings(**settings, spill_dir=str(tmp_path / "group")))
    _same_cache(grouped.calibration, alone.calibration)
    assert grouped.reports[0].summary == alone.reports[0].summary
    spilled = [e for e in grouped.calibration.entries if e.path is not None]
    assert bool(spilled) == spill and grouped.reports[0].summary["kept_steps"] == (3 if spill else 2)
    # the folder keeps the spilled calls the cache reads back, nothing else (no indexes, no loaded parts)
    left = sorted(p.name for p in (tmp_path / "group").iterdir())
    assert left == sorted(n for e in spilled for n in (Path(e.path).name + ".json", Path(e.path).name + ".safetensors"))


@pytest.mark.parametrize("mode", ["block", "e2e"])
def test_distillation_on_one_rank_is_the_one_process_result(mode, tmp_path):
    s = DistillSettings(mode=mode, iters=2, batch_size=2, rows=6, eval_rows=2, checkpoint_dir=str(tmp_path),
                        checkpoint_every=1)
    alone = fresh()
    want = run_distillation(alone, DistillSettings(**{**s.__dict__, "checkpoint_dir": None}))
    grouped = fresh()
    with one_rank_group():  # FSDP2 over one rank (block) or all-reduce over one rank (e2e), DCP checkpoints
        got = run_distillation(grouped, s)
    a, b = state_of(grouped.qtransformer), state_of(alone.qtransformer)
    assert [k for k in a if not torch.equal(a[k], b[k])] == []
    assert [u.curves for u in got.units] == [u.curves for u in want.units]
    assert [(u.err_before, u.err_after) for u in got.units] == [(u.err_before, u.err_after) for u in want.units]
    # the finished loop's distributed checkpoint (trained tensors only) resumes in one process without a group
    dcp = [d for d in Path(tmp_path).rglob("*-dcp-*") if d.is_dir()]
    assert len(dcp) == 1 and (dcp[0] / ".metadata").is_file()
    resumed = fresh()
    again = run_distillation(resumed, s)
    assert again.resumed_from is not None and "iteration 0)" in again.resumed_from
    assert [k for k, v in state_of(resumed.qtransformer).items() if not torch.equal(v, a[k])] == []


def test_a_one_process_checkpoint_is_refused_under_a_group(tmp_path):
    s = DistillSettings(iters=2, batch_size=2, rows=6, eval_rows=0, checkpoint_dir=str(tmp_path), checkpoint_every=1)
    run_distillation(fresh(), s)  # one process: workbench.io.checkpoint files, no DCP folder
    assert not [d for d in tmp_path.rglob("*") if d.is_dir()]
    with one_rank_group(), pytest.raises(CheckpointError, match="written by a run without torchrun .* --restart"):
        run_distillation(fresh(), s)


@one_rank_group()
def test_a_sharded_block_copy_leaves_the_original_alone():
    from workbench.distributed import sharding
    from workbench.stages.distill.loop import trainable_names

    block = fresh().qtransformer.blocks[0]
    names = trainable_names(block, DistillSettings())
    before = copy.deepcopy(block.state_dict())
    shard = sharding.shard_copy(block, torch.device("cpu"), names)
    with torch.no_grad():
        for n, p in shard.named_parameters():
            if n in names:
                p.mul_(2.0)
    assert all(torch.equal(v, block.state_dict()[k]) for k, v in before.items())
    sharding.copy_back(shard, block, names)
    after = dict(block.named_parameters())
    assert all(torch.equal(after[n], before[n] * 2.0) for n in names)
    with pytest.raises(ValueError, match="no parameter 'nope'"):
        sharding.shard_copy(block, torch.device("cpu"), {"nope"})
