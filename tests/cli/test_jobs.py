"""`workbench recipes / quantize / eval / analyze` on a 2-block model with tiny recipe settings."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import yaml

from stage_helpers import tiny_world_model  # noqa: E402
from workbench.cli import jobs  # noqa: E402
from workbench.io.rundir import load_reports, read_manifest  # noqa: E402
from workbench.cli.commands import main  # noqa: E402
from workbench.metrics.fidelity import PSNR_CAP_DB  # noqa: E402
from workbench.recipes import list_recipes, load_recipe  # noqa: E402


@pytest.fixture(autouse=True)
def small_model(monkeypatch):
    """The jobs run on the 2-block model (same architecture and sampler, 3x cheaper than the bundled one)."""
    monkeypatch.setattr(jobs, "load_model", lambda model="tiny-world", device="cpu", dtype=None: tiny_world_model())


def _small_recipe(tmp_path: Path, name: str, **stage_changes) -> Path:
    d = load_recipe(name).to_dict()
    changes = {"collect_calibration": {"prompts": 2, "steps": 2}, **stage_changes}
    d["stages"] = [{k: {**v, **changes.get(k, {})}} for s in d["stages"] for k, v in s.items()]
    d["name"] = f"{name}-small"
    p = tmp_path / f"{name}-small.yaml"
    p.write_text(yaml.safe_dump(d))
    return p


def test_recipes_lists_every_recipe(capsys):
    assert main(["recipes"]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in list_recipes())
    assert main(["recipes", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["name"] for r in rows] == list_recipes()
    naive = next(r for r in rows if r["name"] == "naive-w4a8")
    assert naive["weight"].startswith("int4") and "static" in naive["act"]


@pytest.mark.parametrize("argv, words", [
    (["quantize", "--recipe", "vidit-q-w9a9", "--out", "{tmp}/q"], ["unknown recipe 'vidit-q-w9a9'", "naive-w8a8"]),
    (["quantize", "--recipe", "{tmp}/missing.yaml", "--out", "{tmp}/q"], ["does not exist"]),
    (["analyze", "--recipe", "nope", "--out", "{tmp}/a"], ["unknown recipe 'nope'"]),
    (["eval", "{tmp}/nothing-here", "--json"], ["not a directory", "workbench quantize"]),
    (["eval", "{tmp}", "--json"], ["manifest.json is missing"]),
])
def test_bad_inputs_are_one_line_errors(tmp_path, capsys, argv, words):
    assert main([a.replace("{tmp}", str(tmp_path)) for a in argv]) == 2
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert err.startswith("error: ") and len(err.splitlines()) == 1 and "Traceback" not in err
    assert all(w in err for w in words)
    assert captured.out == ""


def test_bad_recipe_field_names_the_field(tmp_path, capsys):
    p = _small_recipe(tmp_path, "naive-w8a8", collect_calibration={"promts": 2})
    assert main(["quantize", "--recipe", str(p), "--out", str(tmp_path / "q")]) == 2
    err = capsys.readouterr().err
    assert "unknown field 'promts'" in err and "allowed fields" in err


def test_quantize_refuses_non_empty_out_before_any_work(tmp_path, capsys, monkeypatch):
    out = tmp_path / "q"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    monkeypatch.setattr(jobs, "load_model", lambda model="tiny-world", device="cpu", dtype=None: pytest.fail("the model was loaded"))
    assert main(["quantize", "--recipe", "naive-w8a8", "--out", str(out)]) == 2
    assert "--force" in capsys.readouterr().err
    assert (out / "keep.txt").read_text() == "mine"


def test_quantize_then_eval_json(tmp_path, capsys):
    recipe = _small_recipe(tmp_path, "vidit-q-w8a8", calibrate_ranges={"alpha_search": [0.5], "sample_rows": 64})
    out = tmp_path / "w8a8"
    assert main(["quantize", "--recipe", str(recipe), "--out", str(out)]) == 0
    assert str(out) in capsys.readouterr().out
    manifest = read_manifest(out)
    assert manifest["recipe"]["name"] == "vidit-q-w8a8-small"
    assert [r.name for r in load_reports(out)] == ["collect_calibration", "apply_quantization", "calibrate_ranges"]
    # a second quantize into the same directory is refused, --force overwrites
    assert main(["quantize", "--recipe", str(recipe), "--out", str(out)]) == 2
    assert "holds an earlier output" in capsys.readouterr().err

    prompts = tmp_path / "p.txt"
    prompts.write_text("a red circle moving left\na fast green square moving up\n")
    argv = ["eval", str(out), "--json", "--prompts", str(prompts), "--seed", "3", "--steps", "2"]
    assert main(argv) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 1
    m = json.loads(lines[0])
    for k in ("oracle_accuracy", "psnr_vs_fp", "ssim_vs_fp", "temporal_consistency", "temporal_diff_error_vs_fp",
              "flicker_ratio_vs_fp", "latent_rel_l2_mean", "seconds_per_video", "fp_oracle_accuracy"):
        assert k in m, k  # the tiny model has an oracle; CLIP keys only with --clip
    assert "clip_score" not in m and list(m)[:3] == ["oracle_accuracy", "psnr_vs_fp", "ssim_vs_fp"]
    assert 0 < m["latent_rel_l2_mean"] < 1 and m["flicker_ratio_vs_fp"] > 0
    for k in ("oracle_accuracy", "temporal_consistency"):
        assert 0.0 <= m[k] <= 1.0 and 0.0 <= m[f"fp_{k}"] <= 1.0
    assert m["psnr_vs_fp"] is not None and 10 < m["psnr_vs_fp"] < PSNR_CAP_DB  # quantized: close to FP, not equal
    assert m["num_prompts"] == 2 and m["seed"] == 3 and m["steps"] == 2 and m["recipe"] == "vidit-q-w8a8-small"
    assert main(argv) == 0  # same prompts and seeds: the same numbers
    again = json.loads(capsys.readouterr().out)
    assert {k: v for k, v in again.items() if "seconds" not in k} == {k: v for k, v in m.items() if "seconds" not in k}
    assert main(["quantize", "--recipe", str(recipe), "--out", str(out), "--force"]) == 0


def test_analyze_writes_html_with_figures(tmp_path, capsys):
    recipe = _small_recipe(tmp_path, "naive-w4a8")
    out = tmp_path / "analysis"
    assert main(["analyze", "--recipe", str(recipe), "--out", str(out), "--prompts", "1", "--steps", "2"]) == 0
    html = (out / "analysis.html").read_text()
    assert "Error sources" in html and "analyze_error_sources" in html
    assert html.count("plotly-graph-div") >= 4 and "<script" in html
    reports = json.loads((out / "reports.json").read_text())
    assert [r["name"] for r in reports] == ["collect_calibration", "analyze_error_sources"]
    assert {"activations", "weights", "layer_errors", "sensitivity"} <= set(reports[1]["tables"])
    assert main(["analyze", "--recipe", str(recipe), "--out", str(out)]) == 2
    assert "--force" in capsys.readouterr().err


def test_recipe_with_the_attention_kernel_round_trips(tmp_path, capsys):
    """quant.attention: {kernel: fp8}: quantize -> eval -> export -> load, the loaded model's videos equal the run's."""
    import torch

    from workbench.io import rundir
    from workbench.io.packed import load_packed
    from workbench.kernels import ops
    from workbench.models.generator import GenerationSettings

    d = yaml.safe_load(_small_recipe(tmp_path, "naive-w8a8").read_text())
    d["quant"]["attention"] = {"kernel": "fp8", "kernel_min_tokens": 0}
    d["name"] = "naive-w8a8-qattn"
    recipe = tmp_path / "qattn.yaml"
    recipe.write_text(yaml.safe_dump(d))
    run, packed = tmp_path / "run", tmp_path / "packed"
    assert main(["quantize", "--recipe", str(recipe), "--out", str(run)]) == 0
    capsys.readouterr()
    calls = ops.CALLS["quant_attention"]
    assert main(["eval", str(run), "--json", "--steps", "2", "--seed", "4"]) == 0
    m = json.loads(capsys.readouterr().out)
    assert ops.CALLS["quant_attention"] > calls and 10 < m["psnr_vs_fp"] < PSNR_CAP_DB
    gen, qt, manifest = rundir.load_quantized(run)
    assert manifest["recipe"]["recipe"]["quant"]["attention"]["kernel"] == "fp8"
    assert main(["export", str(run), "--out", str(packed)]) == 0
    s = GenerationSettings(steps=2)
    want = gen.generate(["a red circle moving left"], [1], s, transformer=qt)
    loaded = load_packed(packed, fake_quant=True)
    assert torch.equal(gen.generate(["a red circle moving left"], [1], s, transformer=loaded), want)
