"""Every recipe on tiny random diffusers pipelines (CogVideoX, Wan, LTX-Video) through the command line, as
on a real checkpoint: `workbench quantize --model DIR` -> `workbench eval --json` -> `workbench export` ->
`load_packed`, plus the errors a user meets with a pipeline folder."""
from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch

from pipeline_fixtures import network_refused, one_torch_thread, saved_pipelines  # noqa: F401  (fixtures)
from recipe_helpers import shrunk_recipe
from workbench.cli.commands import main
from workbench.io import rundir
from workbench.io.packed import load_packed
from workbench.metrics.fidelity import PSNR_CAP_DB, psnr
from workbench.models.generator import GenerationSettings
from workbench.recipes import list_recipes

FAMILIES = ("cogvideox", "wan", "ltx-video")
ORACLE_KEYS = ("oracle_accuracy", "exact_match", "temporal_consistency", "color_accuracy")


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("name", list_recipes())
def test_every_recipe_on_a_pipeline(family, name, saved_pipelines, tmp_path, capsys, monkeypatch):  # noqa: F811
    saved = {}
    real_save = rundir.save_quantized

    def spy(session, out, **kw):
        saved["s"] = session
        return real_save(session, out, **kw)

    monkeypatch.setattr(rundir, "save_quantized", spy)
    run, packed = tmp_path / "run", tmp_path / "packed"
    with network_refused():
        assert main(["quantize", "--model", str(saved_pipelines[family]), "--recipe",
                     str(shrunk_recipe(name, tmp_path)), "--out", str(run)]) == 0, capsys.readouterr().err
        capsys.readouterr()
        assert main(["eval", str(run), "--json", "--steps", "2", "--seed", "4"]) == 0
        m = json.loads(capsys.readouterr().out)
    for k in ("psnr_vs_fp", "ssim_vs_fp", "temporal_diff_error_vs_fp", "flicker_ratio_vs_fp", "latent_rel_l2_mean",
              "seconds_per_video"):
        assert m[k] is not None and math.isfinite(m[k]), k
    assert not set(ORACLE_KEYS) & set(m), "a random pipeline has no oracle"
    assert m["psnr_vs_fp"] < PSNR_CAP_DB and 0 < m["latent_rel_l2_mean"] < 1 and m["model"] == family
    if name.endswith("w8a8"):
        assert m["psnr_vs_fp"] >= 30.0

    # the run names the pipeline, and reloads as the model the command held in memory
    gen, qt, manifest = rundir.load_quantized(run)
    assert manifest["model"]["source"] == "pipeline" and manifest["model"]["path"] == str(saved_pipelines[family])
    session, s = saved["s"], GenerationSettings(steps=2)
    want = session.fp_model.generate(["a red car moving left"], [2], s, transformer=session.qtransformer)
    assert torch.equal(gen.generate(["a red car moving left"], [2], s, transformer=qt), want)
    assert main(["export", str(run), "--out", str(packed)]) == 0
    fake = load_packed(packed, fake_quant=True)
    assert torch.equal(gen.generate(["a red car moving left"], [2], s, transformer=fake), want)


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _one_line_error(capsys) -> str:
    """The `error:` line the command ended with (loading progress bars may come before it)."""
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and err.splitlines()[-1].startswith("error: "), err[-500:]
    return err.splitlines()[-1]


def test_pipeline_errors_name_the_fix(saved_pipelines, tmp_path, capsys):  # noqa: F811
    cog = saved_pipelines["cogvideox"]
    out = str(tmp_path / "q")

    def run(*argv: str) -> str:
        assert main(list(argv)) == 2
        return _one_line_error(capsys)

    assert "not a video pipeline folder" in run("quantize", "--model", str(tmp_path), "--recipe", "naive-w8a8", "--out", out)
    assert "transformer alone" in run("quantize", "--model", str(cog / "transformer"), "--recipe", "naive-w8a8",
                                      "--out", out)
    no_vae = _copy(cog, tmp_path / "no-vae")
    shutil.rmtree(no_vae / "vae")
    err = run("quantize", "--model", str(no_vae), "--recipe", "naive-w8a8", "--out", out)
    assert "vae" in err.lower()
    no_te = _copy(cog, tmp_path / "no-te")
    index = json.loads((no_te / "model_index.json").read_text())
    index["text_encoder"] = [None, None]
    (no_te / "model_index.json").write_text(json.dumps(index))
    assert "text_encoder" in run("quantize", "--model", str(no_te), "--recipe", "naive-w8a8", "--out", out)
    if not torch.cuda.is_available():
        assert "--device cpu" in run("quantize", "--model", str(cog), "--recipe", "naive-w8a8", "--out", out,
                                     "--device", "cuda")
    err = run("quantize", "--model", str(cog), "--recipe", "naive-w8a8", "--out", out, "--frames", "10")
    assert "frames=10" in err and "nearest valid: 9 or 13" in err
    prompts = tmp_path / "long.txt"
    prompts.write_text("a red car " * 40 + "\n")
    err = run("quantize", "--model", str(cog), "--recipe", "naive-w8a8", "--out", out, "--prompts", str(prompts))
    assert f"{prompts}:1:" in err and "tokens" in err
    assert not Path(out).exists()  # every refusal before any work


def test_generate_and_eval_with_sizes_and_clip(saved_pipelines, tmp_path, capsys):  # noqa: F811
    """generate from a pipeline and from a quantized run; eval at another video size with CLIP scores."""
    from clip_fixtures import save_tiny_clip

    wan = saved_pipelines["wan"]
    run = tmp_path / "run"
    assert main(["quantize", "--model", str(wan), "--recipe", str(shrunk_recipe("naive-w8a8", tmp_path)),
                 "--out", str(run)]) == 0
    for model, clip in ((str(wan), tmp_path / "fp.gif"), (str(run), tmp_path / "q.gif")):
        assert main(["generate", "--model", model, "--prompt", "a red car moving left", "--out", str(clip),
                     "--steps", "2", "--frames", "5"]) == 0
        assert clip.stat().st_size > 100
    clip_dir = save_tiny_clip(tmp_path / "clip")
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red car moving left\na blue boat on the sea\n")
    capsys.readouterr()
    assert main(["eval", str(run), "--json", "--steps", "2", "--frames", "5", "--height", "48", "--width", "32",
                 "--prompts", str(prompts), "--clip", str(clip_dir)]) == 0
    m = json.loads(capsys.readouterr().out)
    assert (m["frames"], m["height"], m["width"], m["num_prompts"]) == (5, 48, 32, 2)
    assert 0 <= m["clip_score"] <= 100 and m["clip_fd_vs_fp"] >= 0 and "fp_clip_score" in m
