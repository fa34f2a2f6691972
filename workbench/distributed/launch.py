"""Starting a distributed run from the command line: `workbench quantize --nproc N` runs

    python -m torch.distributed.run --standalone --nproc-per-node N -m workbench quantize <the other arguments>

(torchrun on this host, one worker per GPU or CPU process) and returns its exit status. The workers get the
NCCL settings this workplace needs (NVLink multicast off) unless the environment sets them already, and the
command that resumes the run, so a failing rank can print it.

Ctrl-C: torchrun runs in its own session and each Ctrl-C is passed to it, so on the first the workers stop at
their next checkpoint together (a second stops them at once); the status is then 130, as for one process.
Under a plain `torchrun` the terminal signals every worker and torchrun itself; the workers then stop at once
and resume from the last checkpoint.
"""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
from typing import Mapping

from workbench.distributed.group import launched_by_torchrun

RESUME_ENV = "WORKBENCH_RESUME_COMMAND"
# NVLink SHARP / multicast stays off on this workplace's GPUs (see the device notes)
NCCL_ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}


def torchrun_command(nproc: int, argv: list[str]) -> list[str]:
    """The torchrun command line that runs `workbench <argv>` with `nproc` workers on this host."""
    if nproc < 1:
        raise ValueError(f"--nproc must be >= 1, got {nproc}")
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
            "-m", "workbench", *argv]


def worker_env(base: Mapping[str, str], nproc: int, resume: str) -> dict[str, str]:
    """`base` plus the NCCL settings (where unset), one share of the CPU threads per worker (where
    OMP_NUM_THREADS is unset) and the resume command."""
    env = dict(base)
    for key, value in NCCL_ENV.items():
        env.setdefault(key, value)
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    env[RESUME_ENV] = resume
    return env


def strip_nproc(argv: list[str]) -> list[str]:
    """`argv` without `--nproc N` / `--nproc=N` (what the workers run)."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == "--nproc":
            skip = True
        elif not a.startswith("--nproc="):
            out.append(a)
    return out


def resume_command(argv: list[str]) -> str:
    """The command that resumes this run: the one the user typed (`workbench ... --nproc N`), else the torchrun
    command of this worker's launch. Checkpoints reshard, so any number of ranks resumes it."""
    given = os.environ.get(RESUME_ENV)
    if given:
        return given
    args = shlex.join(["-m", "workbench", *argv])
    if launched_by_torchrun():
        local, total = int(os.environ.get("LOCAL_WORLD_SIZE", "1")), int(os.environ["WORLD_SIZE"])
        if local == total:
            return f"torchrun --standalone --nproc-per-node {local} {args}"
        return f"torchrun --nnodes {total // local} --nproc-per-node {local} <the same --rdzv-* flags> {args}"
    return shlex.join(["workbench", *argv])


def relaunch(argv: list[str], nproc: int) -> int:
    """Run `workbench <argv>` (argv holding --nproc) under torchrun with `nproc` workers; the exit status of
    torchrun. On failure the command that resumes is printed (torchrun's summary above it names the rank)."""
    if launched_by_torchrun():
        raise ValueError("--nproc starts torchrun itself: drop --nproc when launching with torchrun")
    resume = shlex.join(["workbench", *argv])
    cmd = torchrun_command(nproc, strip_nproc(argv))
    p = subprocess.Popen(cmd, env=worker_env(os.environ, nproc, resume), start_new_session=True)
    signals: list[int] = []

    def forward(signum, frame):  # noqa: ANN001
        signals.append(signum)
        try:
            os.kill(p.pid, signum)
        except ProcessLookupError:
            pass

    previous = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        rc = p.wait()
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
    if rc != 0 and signals:
        print(f"\nthe distributed run was interrupted. Resume it with the same command (any number of processes):"
              f"\n  {resume}", file=sys.stderr)
        return 130
    if rc != 0:
        print(f"\nthe distributed run failed (exit status {rc}; torchrun's summary above names the rank). "
              f"Resume it with the same command (any number of processes):\n  {resume}", file=sys.stderr)
    return rc


__all__ = ["NCCL_ENV", "RESUME_ENV", "relaunch", "resume_command", "strip_nproc", "torchrun_command",
           "worker_env"]
