"""One benchmark variant per Python process, so that a crash, hang or leak costs that variant's row only.

The parent writes a JSON spec, starts `python -m MODULE --worker SPEC` in a new session (a timeout then kills
the worker's own compile subprocesses too) and reads the JSON result the worker wrote; without one it says
why: the exit code, the signal or the timeout, with the worker's last stderr line. Output tensors travel as
safetensors files, so the parent compares every variant against a reference without unpickling anything.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

PACKAGE_ROOT = Path(__file__).resolve().parents[2]  # the folder holding workbench/: workers import this same code


@dataclass
class WorkerResult:
    """What one worker left: its JSON result, or `error` saying why there is none."""

    result: dict[str, Any] | None
    error: str | None
    seconds: float
    stderr_tail: list[str] = field(default_factory=list)


def stderr_tail(path: Path, n: int = 20) -> list[str]:
    """The last n non-empty lines of a worker's stderr (progress bars' carriage returns split lines too)."""
    if not path.exists():
        return []
    text = path.read_bytes()[-20000:].decode("utf-8", "replace")
    lines = [ln.strip() for ln in text.replace("\r", "\n").splitlines()]
    return [ln for ln in lines if ln][-n:]


def _why(returncode: int | None, timed_out: bool, timeout_s: float, tail: list[str]) -> str:
    last = f": {tail[-1][:200]}" if tail else ""
    if timed_out:
        return f"timed out after {timeout_s:.0f} s (worker killed; raise the timeout with --variant-timeout){last}"
    if returncode is not None and returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = f"signal {-returncode}"
        hint = " (out of memory? the kernel's OOM killer sends SIGKILL)" if -returncode == signal.SIGKILL else ""
        return f"worker killed by {name}{hint}{last}"
    if returncode:
        return f"worker exited with code {returncode}{last or ': nothing on stderr'}"
    return f"worker exited without writing its result{last}"


def run_worker(module: str, spec: dict[str, Any], workdir: Path, name: str, timeout_s: float,
               log: Callable[[str], None] = print, label: str | None = None) -> WorkerResult:
    """Run `python -m module --worker SPEC` for one variant and return its result or why it has none.

    The worker's stdout is this process's (its progress lines show live); its stderr goes to a file whose
    last lines are logged when the worker fails.
    """
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    spec_path, result_path, err_path = (workdir / f"{name}.{x}" for x in ("spec.json", "result.json", "stderr.txt"))
    result_path.unlink(missing_ok=True)
    spec_path.write_text(json.dumps({**spec, "result": str(result_path)}))
    env = {**os.environ, "PYTHONUNBUFFERED": "1",
           "PYTHONPATH": os.pathsep.join(p for p in (str(PACKAGE_ROOT), os.environ.get("PYTHONPATH")) if p)}
    t0 = time.time()
    timed_out = False
    sys.stdout.flush()
    with open(err_path, "wb") as err:
        proc = subprocess.Popen([sys.executable, "-m", module, "--worker", str(spec_path)], stderr=err, env=env,
                                start_new_session=True)
        try:
            proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            timed_out = True
        finally:  # a timeout or Ctrl-C here: kill the worker's whole session (not yet reaped, so its id is its own)
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                proc.wait()
    seconds = time.time() - t0
    tail = stderr_tail(err_path)
    if not timed_out and result_path.exists():
        try:
            return WorkerResult(json.loads(result_path.read_text()), None, seconds, tail)
        except ValueError as exc:
            return WorkerResult(None, f"worker wrote an unreadable result ({exc})", seconds, tail)
    error = _why(proc.returncode, timed_out, timeout_s, tail)
    log(f"  {label or name}: {error}" + "".join(f"\n    | {ln}" for ln in tail[-12:]))
    return WorkerResult(None, error, seconds, tail)


def inject_fault(kind: str | None) -> None:
    """Isolation checks (tests, dry run): make this worker "exit" (code 3, no result), "hang" (until killed, with
    a child process that hangs too, as a worker's compile subprocesses would) or "raise" (an uncaught exception:
    exit code 1, traceback on stderr). Fires at the worker's start."""
    if kind is None:
        return
    if kind == "exit":
        os._exit(3)
    if kind == "hang":
        subprocess.Popen([sys.executable, "-c", "import time; time.sleep(3600)", *sys.argv[1:]])
        while True:
            time.sleep(60)
    if kind == "raise":
        raise RuntimeError("injected fault (isolation check)")
    raise ValueError(f"unknown fault {kind!r}; known: exit, hang, raise")


def add_run_args(p: "argparse.ArgumentParser", out_name: str) -> None:
    """The options every isolated benchmark CLI shares: budget, worker timeout, --in-process, --out, --worker."""
    p.add_argument("--budget", type=float, default=None, help="seconds per model after which variants are skipped")
    p.add_argument("--variant-timeout", type=float, default=None,
                   help="seconds one variant's worker may take before it is killed (default 600; 300 in a dry run)")
    p.add_argument("--in-process", action="store_true",
                   help="run every variant in this process (no isolation: one crash ends the run)")
    p.add_argument("--reference-dir", default=None,
                   help="folder that keeps the reference variant's output between calls of one machine, so a call "
                        "without the reference among its variants still gets errors without recomputing it")
    p.add_argument("--out", default=os.environ.get("OUT"), help=f"folder for {out_name}.{{md,json}}")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # internal: one variant, from a spec file


def worker_main(spec_path: str, fn: Callable[[dict[str, Any]], dict[str, Any]]) -> None:
    """The worker's side: read the spec, run fn(spec) and write its JSON result atomically (a worker killed
    while writing leaves no half file for the parent to read)."""
    spec = json.loads(Path(spec_path).read_text())
    result = fn(spec)
    tmp = Path(spec["result"] + ".tmp")
    tmp.write_text(json.dumps(result))
    tmp.replace(spec["result"])


def save_tensor(t: torch.Tensor, path: Path) -> str:
    """Write one tensor (on the CPU, float32) as safetensors; returns the path as a string."""
    from safetensors.torch import save_file

    save_file({"out": t.detach().float().cpu().contiguous()}, str(path))
    return str(path)


def load_tensor(path: str | Path) -> torch.Tensor:
    """Read a tensor written by save_tensor (safetensors: no code runs on load)."""
    from safetensors.torch import load_file

    return load_file(str(path))["out"]


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """Relative Frobenius error of out against ref, in float64."""
    o, r = out.double(), ref.double()
    return float((o - r).norm() / r.norm().clamp_min(1e-30))


class ReferenceStore:
    """Reference outputs kept between calls (`--reference-dir`), keyed by everything that decides them: the table,
    case, seed, dtype, GPU, torch/diffusers versions and the workbench sources. A call whose variants lack the
    reference reads it here instead of recomputing it; `folder=None` keeps nothing (every call computes its own)."""

    def __init__(self, folder: str | Path | None, table: str, case: str, seed: int, dtype: torch.dtype,
                 device: torch.device, **extra: Any) -> None:
        self.folder = None if folder is None else Path(folder)
        if self.folder is None:
            self.path = None
            return
        import hashlib

        import diffusers

        from workbench.bench.page import code_state

        gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
        key = json.dumps(dict(table=table, case=case, seed=seed, dtype=str(dtype), gpu=gpu, torch=torch.__version__,
                              diffusers=diffusers.__version__, code=code_state(), **extra), sort_keys=True)
        self.path = self.folder / f"{table}-{hashlib.sha256(key.encode()).hexdigest()[:16]}.safetensors"

    def get(self) -> str | None:
        """The kept reference output's path, None when there is none (or no folder)."""
        return str(self.path) if self.path is not None and self.path.exists() else None

    def put(self, path: str | None) -> None:
        """Keep a reference output (written to a temporary name, then renamed: two calls at once cannot leave a
        half file)."""
        if self.path is None or path is None:
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f"{self.path.name}.{os.getpid()}.tmp")
        tmp.write_bytes(Path(path).read_bytes())
        tmp.replace(self.path)


class ErrorsAgainst:
    """Relative errors of worker outputs against one reference variant's output, in whatever order they arrive:
    an output that comes before the reference waits (on disk) until it does."""

    def __init__(self, ref_name: str | None) -> None:
        self.ref_name = ref_name
        self.ref: torch.Tensor | None = None
        self.waiting: dict[str, str] = {}

    def add(self, name: str, path: str | None) -> dict[str, float | None]:
        """Record one variant's output file; returns the errors that became known (variant -> rel. error)."""
        if path is None:
            return {}
        if name == self.ref_name and self.ref is None:
            self.ref = load_tensor(path)
            self.waiting[name] = path
            done = {n: self._err(p) for n, p in self.waiting.items()}
            self.waiting.clear()
            return done
        if self.ref is None:
            self.waiting[name] = path
            return {}
        return {name: self._err(path)}

    def _err(self, path: str) -> float | None:
        out = load_tensor(path)
        return rel_err(out, self.ref) if out.shape == self.ref.shape else None  # None: not comparable
