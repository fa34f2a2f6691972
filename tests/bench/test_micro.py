"""The attention microbenchmark on the CPU dry run: each peer row (SDPA as torch picks it, SDPA forced to cuDNN /
flash, SageAttention2) comes from its own process, and our rows' speed-ups are against the peer baseline's time."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest


def test_attention_peers_run_in_their_own_processes(tmp_path):
    env = {**os.environ, "OUT": str(tmp_path)}
    proc = subprocess.run([sys.executable, "-m", "workbench.bench.micro", "--dry-run-cpu", "--only", "attention",
                           "--skip-checks", "--quick", "--attn-models", "Wan2.1-1.3B"], env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = {r["method"]: r for r in json.loads((tmp_path / "gpu_kernels_bench.json").read_text())["rows"]}
    base = rows["SDPA bf16 (backend torch picks)"]
    assert base["ms"] > 0 and base["note"] == "own process" and base["rel_err"] < 0.01
    flash = rows["SDPA bf16 FLASH_ATTENTION"]
    assert flash["note"] == "own process" and flash["speedup"] == pytest.approx(base["ms"] / flash["ms"])
    assert rows["SDPA bf16 CUDNN_ATTENTION"]["ms"] is None  # the CPU has no cuDNN attention: its error, its row only
    sage = rows["SageAttention2 sageattn (int8 QK, fp8 PV)"]
    assert sage["ms"] is None and sage["error"].startswith("skipped: ")
    if "not importable" in sage["error"]:
        assert "git clone https://github.com/thu-ml/SageAttention" in sage["error"]
    ours = next(r for m, r in rows.items() if m.startswith("ours int8 QK"))
    assert ours["speedup"] == pytest.approx(base["ms"] / ours["ms"])  # against the other process's baseline


def test_attention_shapes_include_the_hunyuan_like_case_and_unknown_names_are_refused():
    """The three shapes of the attention target are timed by default; a misspelt shape name is an error that
    lists the known ones."""
    from workbench.bench import micro

    assert micro.ATTN_SHAPES["HunyuanVideo-like"] == (1, 24, 32768, 128)
    assert set(micro.ATTN_SHAPES) == set(micro.ATTN_SHAPES_DRY)
    proc = subprocess.run([sys.executable, "-m", "workbench.bench.micro", "--dry-run-cpu", "--only", "attention",
                           "--skip-checks", "--attn-models", "Hunyuan"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "unknown --attn-models ['Hunyuan']" in proc.stderr
    assert "HunyuanVideo-like" in proc.stderr


def test_timing_window_holds_enough_calls_of_a_slow_kernel():
    """A fixed window held ~5 calls of an 8 ms attention (a noisy median); slow functions get MIN_CALLS calls."""
    from workbench.bench import micro
    assert micro.timing_window_ms(0.1, quick=True) == 40.0
    assert micro.timing_window_ms(0.1, quick=False) == 100.0
    assert micro.timing_window_ms(8.0, quick=True) / 8.0 >= micro.MIN_CALLS[0] >= 25
    assert micro.timing_window_ms(8.0, quick=False) / 8.0 >= micro.MIN_CALLS[1] >= 50
