"""One variant per process: a hung worker is killed at its timeout, a worker's death is named (code, signal),
outputs travel as safetensors and errors are computed against the reference in whatever order rows arrive."""
from __future__ import annotations

import time
from dataclasses import asdict
from pathlib import Path

import torch

from workbench.bench import isolate
from workbench.bench.e2e import Variant


def test_a_hung_worker_is_killed_at_its_timeout(tmp_path):
    spec = {"variant": asdict(Variant("test: hangs", fault="hang"))}
    t0 = time.time()
    res = isolate.run_worker("workbench.bench.e2e", spec, tmp_path, "hang", timeout_s=3, log=lambda m: None)
    assert res.result is None and res.error.startswith("timed out after 3 s (worker killed")
    assert 3 <= res.seconds < 30 and time.time() - t0 < 30
    alive = [p for p in Path("/proc").iterdir() if p.name.isdigit() and _cmdline(p).count(str(tmp_path / "hang"))]
    assert not alive  # the worker and the child it started (same spec path in its argv) are both gone


def _cmdline(proc: Path) -> str:
    try:
        return (proc / "cmdline").read_bytes().decode(errors="replace")
    except OSError:
        return ""


def test_a_dead_worker_is_named_by_its_exit_code_or_signal(tmp_path):
    res = isolate.run_worker("workbench.bench.e2e", {"variant": asdict(Variant("t", fault="raise"))}, tmp_path, "raise",
                             timeout_s=60, log=lambda m: None)
    assert res.error == "worker exited with code 1: RuntimeError: injected fault (isolation check)"
    assert isolate._why(-9, False, 0, ["Killed"]) == (
        "worker killed by SIGKILL (out of memory? the kernel's OOM killer sends SIGKILL): Killed")
    assert isolate._why(-11, False, 0, []) == "worker killed by SIGSEGV"
    assert isolate._why(0, False, 0, []) == "worker exited without writing its result"


def test_errors_wait_for_the_reference_and_tensors_round_trip(tmp_path):
    ref = torch.randn(3, 4)
    paths = {n: isolate.save_tensor(t, tmp_path / f"{n}.safetensors")
             for n, t in {"ref": ref, "a": ref * 1.1, "b": ref + 0.5, "odd": torch.zeros(2)}.items()}
    assert torch.equal(isolate.load_tensor(paths["ref"]), ref)
    errors = isolate.ErrorsAgainst("ref")
    assert errors.add("a", paths["a"]) == {}  # before the reference: waits
    assert errors.add("failed", None) == {}
    done = errors.add("ref", paths["ref"])
    assert set(done) == {"a", "ref"} and done["ref"] == 0.0 and abs(done["a"] - 0.1) < 1e-6
    assert abs(errors.add("b", paths["b"])["b"] - isolate.rel_err(ref + 0.5, ref)) < 1e-12
    assert errors.add("odd", paths["odd"]) == {"odd": None}  # another shape: not comparable
