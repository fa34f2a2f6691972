"""scripts/kv_pass_sweep.py: the NOTES.md K/V pass table's script, its logic on tiny shapes in the interpreter."""
import json
import os
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "kv_pass_sweep.py"


def test_dry_run_sweeps_both_passes_and_checks_each_row_against_the_production_launch(tmp_path):
    out = tmp_path / "kv.jsonl"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    choice = tmp_path / "best.json"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--dry-run-cpu", "--out", str(out), "--choose", str(choice)],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert {r["shape"] for r in rows} == {"tiny D=64", "tiny D=128"}
    for shape in ("tiny D=64", "tiny D=128"):
        mine = [r for r in rows if r["shape"] == shape]
        assert [r["part"] for r in mine if r.get("production")] == ["stats", "quant"]
        assert all(r["us"] > 0 for r in mine)
        assert all(r["max_rel_diff"] < 1e-4 for r in mine if "max_rel_diff" in r)  # same sums / extremes
        assert all(r["same_codes"] for r in mine if "same_codes" in r)  # 8 warps / split K, V: the same codes
        assert {(r["warps"], r["split_kv"]) for r in mine if r["part"] == "quant"} == {(4, False), (8, False),
                                                                                    (4, True), (8, True)}
        assert {r["unroll"] for r in mine if r["part"] == "stats"} == {1, 2}
    # the choice per head dim: keys of attention.KV_PASSES, each value one of the timed rows', the least total time
    from workbench.kernels.attention import KV_PASSES
    best = json.loads(choice.read_text())
    assert set(best) == {"64", "128"}
    for d, c in best.items():
        assert set(c) == set(KV_PASSES[int(d)])
        shape = f"tiny D={d}"
        quant = {(r["warps"], r["split_kv"]): r["us"] for r in rows if r["shape"] == shape and r["part"] == "quant"}
        assert quant[(c["quant_warps"], c["split_kv"])] == min(quant.values())
        stats = {(r["block_t"], r["unroll"]): r["us"] for r in rows if r["shape"] == shape and r["part"] == "stats"}
        assert stats[(c["stats_block_t"], c["stats_unroll"])] == min(stats.values())


def test_without_cuda_it_refuses_clearly():
    import pytest
    import torch
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    proc = subprocess.run([sys.executable, str(SCRIPT)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and "needs a GPU" in proc.stderr
