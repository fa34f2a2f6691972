"""Every shipped recipe through the command line, as a user runs it: `workbench quantize` -> `workbench eval
--json` -> `workbench export` -> `load_packed`, on the 2-block tiny-world model with the recipe's budgets
shrunk (same stages and formats, less data and fewer steps).

The session `workbench quantize` saved is caught in passing, so the reloaded run and the packed export are
compared with the very model the command held in memory: equal videos, bit for bit (fake-quant reload),
and close ones through the kernels' reference math.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from recipe_helpers import shrunk_recipe
from stage_helpers import tiny_world_model
from workbench.models.generator import GenerationSettings
from workbench.cli import jobs
from workbench.cli.commands import main
from workbench.io import rundir
from workbench.io.packed import load_packed
from workbench.metrics.fidelity import PSNR_CAP_DB, psnr
from workbench.recipes import list_recipes

PROMPT = "a fast green square moving up"
@pytest.mark.parametrize("name", list_recipes())
def test_recipe_round_trip(name, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(jobs, "load_model", lambda model="tiny-world", device="cpu", dtype=None: tiny_world_model())
    saved = {}
    real_save = rundir.save_quantized

    def spy(session, out, **kw):
        saved["session"] = session
        return real_save(session, out, **kw)

    monkeypatch.setattr(rundir, "save_quantized", spy)
    run, packed = tmp_path / "run", tmp_path / "packed"
    assert main(["quantize", "--recipe", str(shrunk_recipe(name, tmp_path)), "--out", str(run)]) == 0, \
        capsys.readouterr().err
    assert not (run / rundir.CHECKPOINTS).exists()  # a finished run leaves no checkpoints behind
    session = saved["session"]

    model, qt, manifest = rundir.load_quantized(run)
    assert manifest["recipe"]["name"] == name and manifest["format"] == "workbench-run"
    want = session.fp_model.generate([PROMPT], [5], GenerationSettings(steps=2), transformer=session.qtransformer)
    got = model.generate([PROMPT], [5], GenerationSettings(steps=2), transformer=qt)
    assert torch.equal(got, want), "the reloaded run is not the model `workbench quantize` held"

    prompts = tmp_path / "p.txt"
    prompts.write_text(PROMPT + "\n")
    capsys.readouterr()
    assert main(["eval", str(run), "--json", "--prompts", str(prompts), "--steps", "2", "--seed", "5"]) == 0
    m = json.loads(capsys.readouterr().out)
    assert m["psnr_vs_fp"] is not None and math.isfinite(m["psnr_vs_fp"]) and m["psnr_vs_fp"] < PSNR_CAP_DB
    fp = session.fp_model.generate([PROMPT], [5], GenerationSettings(steps=2))
    assert m["psnr_vs_fp"] == pytest.approx(float(psnr(want, fp)[0]), abs=1e-4)  # eval measured this model

    assert main(["export", str(run), "--out", str(packed)]) == 0
    fake = load_packed(packed, fake_quant=True)
    assert torch.equal(model.generate([PROMPT], [5], GenerationSettings(steps=2), transformer=fake), want)
    kernels = load_packed(packed, backend="reference")
    k_video = model.generate([PROMPT], [5], GenerationSettings(steps=2), transformer=kernels)
    # the kernels round activations their own way: close to the in-memory model, far closer than to FP
    assert float(psnr(k_video, want)[0]) > max(30.0, m["psnr_vs_fp"])
