"""scripts/bench_quality.py: table order, the quality bar, cache keys, the marked section, a cached rerun."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
from script_loader import load_script  # noqa: E402
from stage_helpers import tiny_world_model  # noqa: E402


@pytest.fixture(scope="module")
def bench():
    return load_script("bench_quality")


def test_table_groups_bit_widths_with_naive_first(bench):
    names = ["vidit-q-w4a8", "naive-w3a6", "naive-w8a8", "vidit-q-w8a8", "naive-w4a8", "q-vdit-w3a6", "custom"]
    assert bench.table_order(names) == ["naive-w8a8", "vidit-q-w8a8", "naive-w4a8", "vidit-q-w4a8", "naive-w3a6",
                                        "q-vdit-w3a6", "custom"]


def test_quality_bar_verdicts(bench):
    fp = {"oracle_accuracy": 0.9}
    rows = {
        "naive-w8a8": {"psnr_vs_fp": 30.0, "oracle_accuracy": 0.9},
        "vidit-q-w8a8": {"psnr_vs_fp": 40.0, "oracle_accuracy": 0.9},
        "naive-w4a8": {"psnr_vs_fp": 20.0, "oracle_accuracy": 0.8},
        "vidit-q-w4a8": {"psnr_vs_fp": 19.0, "oracle_accuracy": 0.85},
    }
    lines = "\n".join(bench.checks(rows, fp))
    assert "W8A8 psnr_vs_fp: vidit-q 40.000 vs naive 30.000: beats naive" in lines
    assert "W8A8 oracle_accuracy: vidit-q 0.900 vs naive 0.900: ties with naive" in lines
    assert "W4A8 psnr_vs_fp: vidit-q 19.000 vs naive 20.000: does NOT beat naive" in lines
    assert "drop vs FP: +0.000 (target <= 0.02): met" in lines
    rows["vidit-q-w8a8"]["oracle_accuracy"] = 0.85
    assert "NOT met" in bench.checks(rows, fp)[-1]


def test_cache_key_covers_recipe_settings_seed_and_weights(bench):
    from workbench.eval.prompt_set import EvalSettings
    from workbench.recipes import load_recipe, recipe_from_dict

    r = load_recipe("naive-w8a8")
    s = EvalSettings(steps=4)
    key = bench.key_of(r, s, 0, "w1")
    assert key == bench.key_of(load_recipe("naive-w8a8"), EvalSettings(steps=4), 0, "w1")
    d = r.to_dict()
    d["stages"][0]["collect_calibration"]["prompts"] = 3
    others = [bench.key_of(recipe_from_dict(d), s, 0, "w1"), bench.key_of(r, EvalSettings(steps=5), 0, "w1"),
              bench.key_of(r, s, 1, "w1"), bench.key_of(r, s, 0, "w2")]
    assert len({key, *others}) == 5
    m = tiny_world_model()
    h = bench.weights_hash(m)
    assert len(h) == 16 and h == bench.weights_hash(tiny_world_model())
    with torch.no_grad():
        m.transformer.proj_out.weight[0, 0] += 1e-3
    assert bench.weights_hash(m) != h


def test_section_keeps_text_outside_the_markers(bench, tmp_path):
    out = tmp_path / "results.md"
    out.write_text("# Notes kept above\n")
    fp = {"oracle_accuracy": 0.9, "eval_s": 1.0}
    row = {"oracle_accuracy": 0.85, "psnr_vs_fp": 30.0, "avg_weight_bits": 8.0}
    args = (bench.eval_settings(0, 2), "today", 60.0, "a model", "abc")
    bench.write_markdown(out, fp, {"naive-w8a8": row}, *args)
    out.write_text(out.read_text() + "\n## Ablations (appended by another script)\n| a | b |\n")
    bench.write_markdown(out, fp, {"naive-w8a8": row, "vidit-q-w8a8": row}, *args)
    text = out.read_text()
    assert text.count(bench.BEGIN) == 1 and text.count(bench.END) == 1
    assert text.index(bench.BEGIN) < text.index("| vidit-q-w8a8 |") < text.index(bench.END) < text.index("## Ablations")
    assert text.index(bench.END) < text.index("# Notes kept above")  # a file we did not write goes below us


def test_run_writes_table_and_reuses_cache(bench, tmp_path, monkeypatch, capsys):
    from workbench.recipes import load_recipe, recipe_from_dict

    def small(name):  # the shipped recipe with a 2-prompt, 2-step calibration set
        d = load_recipe(name).to_dict()
        d["stages"][0]["collect_calibration"].update(prompts=2, steps=2)
        return recipe_from_dict(d)

    monkeypatch.setattr(bench, "load_bundled", tiny_world_model)
    monkeypatch.setattr(bench, "load_recipe", small)
    out, cache = tmp_path / "results.md", tmp_path / "cache"
    argv = ["--recipes", "naive-w8a8", "--prompts", "1", "--steps", "2", "--out", str(out), "--cache", str(cache)]
    assert bench.main(argv) == 0
    text = out.read_text()
    assert "| FP |" in text and "| naive-w8a8 |" in text and "- machine: " in text and "- date: " in text
    assert len(list(cache.glob("naive-w8a8-*.json"))) == 1
    capsys.readouterr()
    assert bench.main(argv) == 0
    log = capsys.readouterr().out
    assert "FP: cached" in log and "naive-w8a8: cached" in log
    assert bench.main(["--recipes", "bogus"]) == 2
    assert "unknown recipe 'bogus'" in capsys.readouterr().err
