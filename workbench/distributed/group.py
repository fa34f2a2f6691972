"""The process group of a run launched by torchrun: start it from torchrun's environment, ask who this rank is,
wait for the others with a deadline, agree on small facts, and end it.

    from workbench import distributed
    if distributed.launched_by_torchrun():
        distributed.init_from_env(device="cuda")   # NCCL, this rank's GPU (LOCAL_RANK); gloo for "cpu"
    distributed.rank(), distributed.world(), distributed.is_main()
    distributed.barrier("after calibration")     # names the ranks that did not arrive in time
    distributed.shutdown(ok=True)

Without a process group every function answers for a single process (rank 0 of 1, barriers return at once), so
library code calls them unconditionally and the one-process path is unchanged.

Deadlines: every collective of the group and every barrier gives up after WORKBENCH_DIST_TIMEOUT seconds (default
600 with NCCL, 300 with gloo) and raises instead of hanging; a rank that dies is noticed at once (gloo sees the
closed connection, torchrun stops the other workers). Barriers run on a gloo group (`monitored_barrier`), whose
error names the ranks that did not arrive. Raise the timeout when rank 0 alone writes something large while the
others wait (a snapshot of a 14B model).
"""

from __future__ import annotations

import gc
import os
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

TIMEOUT_ENV = "WORKBENCH_DIST_TIMEOUT"
DEFAULT_TIMEOUT_S = {"nccl": 600.0, "gloo": 300.0}
TORCHRUN_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")

_state: dict[str, Any] = {"cpu_group": None, "timeout": None, "device": None}


class DistributedError(RuntimeError):
    """A distributed run that cannot go on (a rank missing at a barrier, ranks that disagree, a bad launch);
    the message names the rank(s) and the fix."""


def launched_by_torchrun() -> bool:
    """True when this process is a torchrun worker (torchrun sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_*)."""
    return all(k in os.environ for k in TORCHRUN_ENV)


def active() -> bool:
    """True while a process group is initialised (distributed behaviour is on)."""
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if active() else 0


def world() -> int:
    return dist.get_world_size() if active() else 1


def local_rank() -> int:
    """This worker's index on its host (torchrun's LOCAL_RANK; 0 without torchrun)."""
    return int(os.environ.get("LOCAL_RANK", "0"))


def is_main() -> bool:
    """True on the rank that writes shared files (rank 0; the only process without a group)."""
    return rank() == 0


def timeout_seconds(backend: str) -> float:
    """The deadline of collectives and barriers: WORKBENCH_DIST_TIMEOUT, else 600 s (NCCL) / 300 s (gloo)."""
    text = os.environ.get(TIMEOUT_ENV)
    if text is None:
        return DEFAULT_TIMEOUT_S.get(backend, 300.0)
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value > 0:
        raise DistributedError(f"{TIMEOUT_ENV}={text!r} is not a positive number of seconds: set it to e.g. 600")
    return value


def rank_device(device: str | torch.device) -> torch.device:
    """The device this rank computes on for a requested `device`: under torchrun any CUDA device means this
    rank's GPU (cuda:LOCAL_RANK, one process per GPU); anything else is returned as is."""
    dev = torch.device(device)
    if dev.type == "cuda" and launched_by_torchrun():
        return torch.device("cuda", local_rank())
    return dev


def init_from_env(device: str | torch.device = "cpu") -> torch.device:
    """Start the process group from torchrun's environment and return this rank's device.

    CUDA (`device` "cuda" or "cuda:N"): NCCL, device cuda:LOCAL_RANK (made the current device, so "cuda" means
    it from here on). Anything else: gloo on the CPU. A gloo side group serves barriers and small agreements.
    """
    if not launched_by_torchrun():
        raise DistributedError("not launched by torchrun (RANK / WORLD_SIZE / LOCAL_RANK are not set): start the "
                               "run with `torchrun --nproc-per-node N -m workbench ...` or `workbench quantize --nproc N`")
    if active():
        return _state["device"]
    dev = rank_device(device)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise DistributedError(f"--device {device} asks for CUDA, which this machine lacks: pass --device cpu "
                                   "(gloo) or run on a GPU machine")
        if local_rank() >= torch.cuda.device_count():
            raise DistributedError(
                f"rank {os.environ['RANK']} has LOCAL_RANK {local_rank()} but this host has "
                f"{torch.cuda.device_count()} GPU(s): start at most {torch.cuda.device_count()} processes per host "
                "(--nproc-per-node)")
        torch.cuda.set_device(dev)
        backend = "nccl"
    elif dev.type == "cpu":
        backend = "gloo"
    else:
        raise DistributedError(f"distributed runs support --device cpu (gloo) and cuda (NCCL), not {device!r}")
    timeout = timedelta(seconds=timeout_seconds(backend))
    kwargs: dict[str, Any] = {"backend": backend, "timeout": timeout}
    if backend == "nccl":
        kwargs["device_id"] = dev
    dist.init_process_group(**kwargs)
    _state.update(timeout=timeout, device=dev,
                  cpu_group=dist.new_group(backend="gloo", timeout=timeout) if backend != "gloo" else dist.group.WORLD)
    return dev


def device() -> torch.device:
    """This rank's device (the CPU without a process group)."""
    return _state["device"] if active() and _state["device"] is not None else torch.device("cpu")


def _cpu_group():  # noqa: ANN202
    return _state["cpu_group"] if _state["cpu_group"] is not None else dist.group.WORLD


def _timeout() -> timedelta:
    return _state["timeout"] or timedelta(seconds=DEFAULT_TIMEOUT_S["gloo"])


def barrier(what: str) -> None:
    """Wait until every rank arrives at `what`; after the timeout raise DistributedError naming the ranks that
    did not arrive (a rank that died or hangs). A no-op without a process group."""
    if not active():
        return
    t = _timeout()
    try:
        dist.monitored_barrier(group=_cpu_group(), timeout=t, wait_all_ranks=True)
    except RuntimeError as e:
        raise DistributedError(
            f"[rank {rank()} of {world()}] waited {t.total_seconds():.0f} s at '{what}' for the other ranks: "
            f"{str(e).splitlines()[0]}. A rank died or hangs (see its own error above); if rank 0 was only slow "
            f"(writing a large file), raise {TIMEOUT_ENV}") from e


def any_rank(flag: bool) -> bool:
    """True on every rank when `flag` is True on at least one (e.g. a Ctrl-C seen by one worker)."""
    if not active():
        return bool(flag)
    t = torch.tensor([1 if flag else 0], dtype=torch.int32)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=_cpu_group())
    return bool(t.item())


def broadcast_object(obj: Any) -> Any:
    """Rank 0's `obj` on every rank (small picklable values only: a path, a flag)."""
    if not active():
        return obj
    box = [obj if is_main() else None]
    dist.broadcast_object_list(box, src=0, group=_cpu_group())
    return box[0]


def check_same(value: str, what: str) -> None:
    """Raise DistributedError on every rank unless all ranks hold the same `value` (a fingerprint of `what`)."""
    if not active():
        return
    values: list[Any] = [None] * world()
    dist.all_gather_object(values, value, group=_cpu_group())
    odd = [r for r, v in enumerate(values) if v != values[0]]
    if odd:
        raise DistributedError(
            f"ranks {', '.join(map(str, odd))} hold another {what} than rank 0 ({values[0]} vs "
            f"{values[odd[0]]}): the ranks diverged. Every rank must run the same code on the same inputs; a "
            "stage that draws randomness without the session's seeded generators causes this")


def shutdown(ok: bool = True) -> None:
    """End the process group. After a successful run all ranks meet once more first (so no rank tears down
    while another still talks to it); after a failure each rank leaves at once."""
    if not active():
        return
    gc.collect()  # FSDP modules hold reference cycles; free them while the group still exists
    try:
        if ok:
            barrier("the end of the run")
    finally:
        from workbench.distributed.sharding import forget_meshes

        forget_meshes()
        dist.destroy_process_group()
        _state.update(cpu_group=None, timeout=None, device=None)


__all__ = ["DistributedError", "TIMEOUT_ENV", "active", "any_rank", "barrier", "broadcast_object", "check_same",
           "device", "init_from_env", "is_main", "launched_by_torchrun", "local_rank", "rank", "rank_device",
           "shutdown", "timeout_seconds", "world"]
