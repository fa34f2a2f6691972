from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from stage_helpers import PROMPTS, W4A8_STATIC, tiny_world_model  # noqa: E402
from workbench.models.generator import GenerationSettings
from workbench.io.rundir import ArtifactError, load_quantized, load_reports, read_manifest, save_quantized  # noqa: E402
from workbench.models.adapters import tiny_inputs, tiny_model  # noqa: E402
from workbench.session import Session  # noqa: E402
from workbench.stages import (  # noqa: E402
    CalibrationSettings,
    PTQSettings,
    RangeSettings,
    apply_quantization,
    calibrate_ranges,
    calibration_from_inputs,
    collect_calibration,
)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A text-to-video session (static timestep-wise ranges, smoothing + rotation, attention) saved once."""
    s = Session.start(tiny_world_model(), seed=0)
    collect_calibration(s, CalibrationSettings(prompts=2, steps=2))
    quant = {**W4A8_STATIC, "act": {**W4A8_STATIC["act"], "timestep_wise": True, "timestep_buckets": 4},
             "attention": {"q": {"format": "int8"}}}
    apply_quantization(s, PTQSettings(quant=quant))
    calibrate_ranges(s, RangeSettings(smooth_alpha=0.3, rotation=True, compare_observers=False, sample_rows=64))
    out = tmp_path_factory.mktemp("q") / "model"
    save_quantized(s, out)
    return s, out


def test_round_trip_gives_identical_videos(saved):
    s, out = saved
    model, qt, manifest = load_quantized(out)
    assert manifest["model"]["source"] == "saved" and manifest["format_version"] == 2
    a = s.fp_model.generate(PROMPTS[:1], [7], GenerationSettings(steps=1), transformer=s.qtransformer)
    b = model.generate(PROMPTS[:1], [7], GenerationSettings(steps=1), transformer=qt)
    assert torch.equal(a, b)
    entry = s.calibration.entries[0].rows(1)  # the FP model comes back too
    fp_a = s.calibration.replay(s.fp_transformer, [entry])[0]
    fp_b = s.calibration.replay(model.transformer, [entry])[0]
    assert torch.equal(fp_a, fp_b)
    layers = {r["layer"]: r for r in manifest["layers"]}
    assert layers["blocks.0.attn1.to_q"]["weight"] == "int4" and layers["blocks.0.attn1.to_q"]["rotation"]
    assert [r.name for r in load_reports(out)] == [r.name for r in s.reports]


def test_manifest_lists_hashes_and_recipe(saved):
    _, out = saved
    m = json.loads((out / "manifest.json").read_text())
    assert set(m["files"]) >= {"quantized_transformer.safetensors", "reports.json"}
    assert all(len(f["sha256"]) == 64 for f in m["files"].values())
    assert {"created", "recipe", "model", "quant_config", "layers", "versions"} <= set(m)


def test_force_replaces_only_an_earlier_run(saved, tmp_path):
    """A directory of the user's is never written into; an earlier run is replaced only with force, and only
    the files its manifest lists: what the user added beside them stays."""
    s, _ = saved
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("x")
    for force in (False, True):
        with pytest.raises(ValueError, match="holds no earlier output of this command"):
            save_quantized(s, mine, force=force)
    assert sorted(p.name for p in mine.iterdir()) == ["notes.txt"]
    run = tmp_path / "run"
    save_quantized(s, run)
    (run / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="--force"):
        save_quantized(s, run)
    save_quantized(s, run, force=True)
    assert (run / "notes.txt").read_text() == "mine" and read_manifest(run)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".workbench-staging")]


def _copy(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


def test_corrupt_file_is_caught(saved, tmp_path):
    _, out = saved
    d = _copy(out, tmp_path / "c")
    f = d / "quantized_transformer.safetensors"
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0xFF
    f.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match="quantized_transformer.safetensors.*corrupt"):
        load_quantized(d)


def test_truncated_and_missing_files_are_caught(saved, tmp_path):
    _, out = saved
    d = _copy(out, tmp_path / "t")
    f = d / "reports.json"
    f.write_bytes(f.read_bytes()[:100])
    with pytest.raises(ArtifactError, match="reports.json.*truncated"):
        load_quantized(d)
    d2 = _copy(out, tmp_path / "m")
    (d2 / "manifest.json").write_text((d2 / "manifest.json").read_text()[:50])
    with pytest.raises(ArtifactError, match="manifest.json.*corrupt"):
        load_quantized(d2)
    (d2 / "manifest.json").unlink()
    with pytest.raises(FileNotFoundError, match="manifest.json"):
        load_quantized(d2)


def test_bare_transformer_round_trip(tmp_path):
    t = tiny_model("WanTransformer3DModel")
    s = Session.start(t)
    calibration_from_inputs(s, [tiny_inputs("WanTransformer3DModel", seed=i) for i in range(2)])
    apply_quantization(s, PTQSettings(quant=W4A8_STATIC))
    save_quantized(s, tmp_path / "bare")
    model, qt, manifest = load_quantized(tmp_path / "bare")
    assert manifest["model"]["kind"] == "transformer"
    x = tiny_inputs("WanTransformer3DModel", seed=9)
    with torch.no_grad():
        assert torch.equal(qt(**x, return_dict=False)[0], s.qtransformer(**x, return_dict=False)[0])
        assert torch.equal(model(**x, return_dict=False)[0], t(**x, return_dict=False)[0])
