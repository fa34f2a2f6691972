"""scripts/real_models.py's logic on the CPU (--dry-run-cpu: tiny pipelines, 2 steps): the rows it records for a
recipe's stages, quantization, generation and the 14B path, the page rendered from them, and probe comparison."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "scripts"))

import real_models  # noqa: E402


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory) -> tuple[Path, Path]:
    tmp = tmp_path_factory.mktemp("real-models")
    rows, probe = tmp / "rows.json", tmp / "probe.json"
    rc = real_models.main(["run", "--dry-run-cpu", "--models", "cogvideox", "--recipes", "vidit-q-w8a8,s2q-vdit-w4a6",
                           "--calibration-prompts", "1", "--distill-iters", "2", "--wan14b", "--wan14b-iters", "2",
                           "--work", str(tmp / "work"), "--out", str(rows), "--probe-out", str(probe)])
    assert rc == 0
    return rows, probe


def test_rows_of_every_part(dry_run):
    rows = json.loads(dry_run[0].read_text())["rows"]
    stages = {(r["recipe"], r["stage"]): r for r in rows if r["part"] == "stage"}
    # the recipe's stages with their scaled settings recorded
    assert stages[("vidit-q-w8a8", "collect_calibration")]["prompts"] == 1
    assert stages[("s2q-vdit-w4a6", "sparse_token_distill")]["iters"] == 2
    assert stages[("s2q-vdit-w4a6", "select_salient_calibration")]["budget"] == 4
    gens = {r.get("recipe", "FP"): r for r in rows if r["part"] == "generate"}
    assert gens["vidit-q-w8a8"]["variant"].startswith("packed kernels") and gens["vidit-q-w8a8"]["psnr_vs_fp"] > 30
    assert gens["s2q-vdit-w4a6"]["variant"] == "packed fake-quant, eager" and gens["s2q-vdit-w4a6"]["psnr_vs_fp"] > 20
    quant = {r["recipe"]: r for r in rows if r["part"] == "quantize"}
    assert quant["vidit-q-w8a8"]["kernel_layers"] == quant["vidit-q-w8a8"]["layers"] > 0
    assert quant["s2q-vdit-w4a6"]["packed_ratio_vs_bf16"] < 0.35
    distill = next(r for r in rows if r.get("stage") == "qvdit_distill")
    assert distill["iterations"] == 2 and distill["fits_one_gpu"]


def test_page_from_the_rows(dry_run, tmp_path):
    notes = tmp_path / "notes.txt"
    notes.write_text("first note\n\nsecond note\n")
    out = tmp_path / "page.md"
    assert real_models.main(["render", str(dry_run[0]), "--out", str(out), "--notes", str(notes)]) == 0
    page = out.read_text()
    assert "## cogvideox (tiny)" in page and "## wan transformer (tiny), 1 rank(s)" in page
    assert "| s2q-vdit-w4a6 | sparse_token_distill | iters 2 |" in page
    assert "- first note" in page and "- second note" in page


def test_probe_diff(dry_run, tmp_path, capsys):
    probe = dry_run[1]
    assert real_models.main(["probe-diff", str(probe), str(probe)]) == 0
    same = json.loads(capsys.readouterr().out)
    assert same["max_abs"] == 0.0 and same["rel_l2"] == 0.0
    data = json.loads(probe.read_text())
    other = tmp_path / "other.json"
    other.write_text(json.dumps(dict(data, values=[v * 1.01 for v in data["values"]])))
    moved = real_models.probe_diff(probe, other)
    assert moved["rel_l2"] == pytest.approx(0.01, rel=1e-6)
    other.write_text(json.dumps(dict(data, values=data["values"][:-1])))
    with pytest.raises(ValueError, match="cannot be compared"):
        real_models.probe_diff(probe, other)
