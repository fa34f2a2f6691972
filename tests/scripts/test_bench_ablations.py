"""scripts/bench_ablations.py: verdicts, means over seed blocks, the PTQ-only variant, cache reuse, the tables."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from script_loader import load_script

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def abl():
    sys.path.insert(0, str(ROOT / "scripts"))
    return load_script("bench_ablations")


def row(acc: float, psnr: float, **extra) -> dict:
    return {"oracle_accuracy": acc, "psnr_vs_fp": psnr, **extra}


def test_verdicts(abl):
    full = row(0.9, 20.0)
    assert abl.verdict(row(0.85, 19.0), full) == "worse"
    assert abl.verdict(row(0.9, 19.5), full) == "worse"
    assert abl.verdict(row(0.95, 21.0), full) == "NOT worse"
    assert abl.verdict(row(0.95, 19.0), full) == "mixed"
    assert abl.verdict(row(0.9, 20.05), full) == "no clear difference"
    # a mean over blocks that equals the full recipe's up to float rounding is no difference in accuracy
    assert abl.verdict(row((0.8 + 0.9 + 1.0) / 3, 19.0), row(0.9, 20.0)) == "worse"


def test_mean_row_is_the_mean_over_blocks_and_keeps_each_block(abl):
    m = abl.mean_row([row(0.75, 18.0, quantize_s=10, stage_seconds={"a": 1}), row(1.0, 20.0, quantize_s=20)])
    assert m["oracle_accuracy"] == pytest.approx(0.875) and m["psnr_vs_fp"] == pytest.approx(19.0)
    assert m["quantize_s"] == pytest.approx(15) and m["blocks"] == [0.75, 1.0]
    assert "stage_seconds" not in m
    assert abl.blocks_cell(m) == "0.750 / 1.000"


def test_ptq_only_variant_keeps_the_recipes_quantizers_and_calibration(abl):
    from workbench.recipes import load_recipe

    full = load_recipe("q-vdit-w3a6")
    ptq = abl.variant_recipe("q-vdit-w3a6", "PTQ only", "ptq-only")
    assert ptq.name == "q-vdit-w3a6~ptq-only" and ptq.quant == full.quant
    # q-vdit-w3a6 is vidit-q-w3a6 plus TQE and TMD: without training it is exactly vidit-q-w3a6's pipeline
    assert ptq.stages == load_recipe("vidit-q-w3a6").stages
    no_tmd = abl.variant_recipe("q-vdit-w3a6", "no TMD", {"qvdit_distill": {"tmd": False}})
    assert no_tmd.name == "q-vdit-w3a6~no-TMD" and dict(no_tmd.stages)["qvdit_distill"]["tmd"] is False
    assert dict(full.stages)["qvdit_distill"].get("tmd", True) is not False  # the loaded recipe is untouched


def test_parse_seeds(abl):
    assert abl.parse_seeds("0,16,32") == [0, 16, 32]
    for bad in ("", "0,0", "a,1"):
        with pytest.raises(SystemExit, match="--seeds"):
            abl.parse_seeds(bad)


def test_cached_rows_are_reused_and_cached_only_skips(abl, tmp_path):
    from workbench.eval.prompt_set import EvalSettings
    from workbench.recipes import load_recipe

    recipe, settings = load_recipe("naive-w8a8"), EvalSettings(steps=2)
    key = abl.bench_quality.key_of(recipe, settings, 16, "w")
    (tmp_path / f"naive-w8a8-{key}.json").write_text(json.dumps(row(0.5, 12.0)))
    got = abl.cached_or_run(None, recipe, settings, 16, None, tmp_path, "w", False, False, "t")
    assert got == row(0.5, 12.0)  # model None: nothing was run
    assert abl.cached_or_run(None, recipe, settings, 0, None, tmp_path, "w", False, True, "t") is None


def test_section_lists_blocks_and_verdicts(abl):
    settings = abl.bench_quality.eval_settings(0, 16)  # the page's evaluation: the 16 held-out prompts
    full = abl.mean_row([row(0.9, 20.0), row(1.0, 21.0)])
    worse = abl.mean_row([row(0.8, 19.0), row(1.0, 20.0)])
    results = {"Q-VDiT": [("full", "-", full), ("no TMD", "TMD", worse), ("no TQE", "TQE", None)]}
    text = "\n".join(abl.section(results, settings, [], seeds=[0, 16]))
    assert "seed blocks 0, 16" in text and "32 videos per row" in text and "1/128" in text
    assert "| no TMD | TMD | 0.900 | 19.500 |" in text and "0.800 / 1.000 | -0.050 | -1.00 | worse |" in text
    assert "| no TQE | TQE | not run" in text
    one = "\n".join(abl.section(results, settings, [], seeds=[0]))
    assert "oracle per seed block" not in one and "16 videos per row" in one
