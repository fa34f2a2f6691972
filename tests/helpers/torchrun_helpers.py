"""Running multi-process jobs from tests: a command in its own session, killed as a group on timeout (killing only
torchrun would leave its workers running), with one CPU thread per process and the fault-injection folder
(tests/distributed/inject) on PYTHONPATH when a test asks for a failure."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
INJECT = REPO / "tests" / "distributed" / "inject"


@dataclass
class Finished:
    returncode: int
    output: str  # stdout and stderr together
    seconds: float


def torchrun(nproc: int, *args: str) -> list[str]:
    """`python -m torch.distributed.run --standalone --nproc-per-node N <args>` (a free port is chosen)."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
            "--monitor-interval=0.1", *args]


def workbench(*args: str) -> list[str]:
    return [sys.executable, "-m", "workbench", *args]


def run(cmd: list[str], timeout: float = 240.0, fail: str | None = None, env: dict[str, str] | None = None) -> Finished:
    """Run `cmd` from the repository root; `fail` = "RANK:UNIT:ITERATION" injects a crash (inject/sitecustomize.py)."""
    e = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **(env or {})}
    e.pop("WORKBENCH_RESUME_COMMAND", None)
    if fail is not None:
        e["WORKBENCH_TEST_FAIL"] = fail
        e["PYTHONPATH"] = os.pathsep.join([str(INJECT), e.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, cwd=REPO, env=e, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                         start_new_session=True)
    try:
        out, _ = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        _kill_group(p)
        out, _ = p.communicate()
        raise AssertionError(f"{' '.join(cmd[:8])} ... did not finish in {timeout} s; output tail:\n{out[-4000:]}")
    return Finished(p.returncode, out, time.perf_counter() - t0)


def _kill_group(p: subprocess.Popen, grace: float = 5.0) -> None:
    try:
        os.killpg(p.pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    end = time.time() + grace
    while p.poll() is None and time.time() < end:
        time.sleep(0.1)
    try:
        os.killpg(p.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
