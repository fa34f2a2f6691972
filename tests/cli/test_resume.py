"""Long runs survive Ctrl-C: `workbench quantize` in a real process, interrupted in the middle of its
distillation, saves, prints the command that resumes, and the same command finishes the run with exactly
the result of an uninterrupted run (which also pins that quantize is deterministic for a seed)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from workbench.cli.commands import main
from workbench.io.rundir import CHECKPOINTS

RECIPE = {
    "name": "q-vdit-resume-test",
    "method": "Q-VDiT",
    "quant": {"weight": {"format": "int4", "granularity": "channel"},
              "act": {"format": "uint8", "granularity": "token", "dynamic": True}},
    "stages": [
        {"collect_calibration": {"prompts": 2, "steps": 2}},
        {"apply_quantization": {}},
        {"qvdit_distill": {"mode": "e2e", "iters": 10, "batch_size": 1, "rows": 4, "tqe_rank": 2, "tqe_out_rank": 1,
                           "checkpoint_every": 2}},
    ],
}


def _quantize(recipe: Path, out: Path, *extra: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-m", "workbench", "quantize", "--recipe", str(recipe), "--out", str(out),
                             *extra], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def _state(out: Path) -> dict[str, torch.Tensor]:
    return load_file(str(out / "quantized_transformer.safetensors"))


def test_ctrl_c_then_the_same_command_resumes_to_the_same_result(tmp_path, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(RECIPE))
    out = tmp_path / "run"
    p = _quantize(recipe, out)
    ckpt = out / CHECKPOINTS / "stage03-qvdit_distill" / "qvdit_distill.json"
    deadline = time.time() + 300
    while not ckpt.exists() and p.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    assert ckpt.exists(), "the distillation never wrote a checkpoint"
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=300)
    assert p.returncode == 130, err[-2000:]
    assert "interrupted at transformer, iteration" in err and "Resume with the same command" in err
    assert f"--out {out}" in err
    assert not (out / "manifest.json").exists()  # no half-written run that `workbench eval` would take

    assert main(["eval", str(out), "--json"]) == 2  # refused, and told how to resume
    assert "rerun the same `workbench quantize` command to resume" in capsys.readouterr().err

    # another command into the same folder is refused while the unfinished run is there
    assert main(["quantize", "--recipe", str(recipe), "--out", str(out), "--seed", "1"]) == 2
    err = capsys.readouterr().err
    assert "unfinished run of another command" in err and "seed" in err and "--restart" in err

    p = _quantize(recipe, out)
    _, err = p.communicate(timeout=600)
    assert p.returncode == 0, err[-2000:]
    assert not (out / CHECKPOINTS).exists()
    resumed = json.loads((out / "reports.json").read_text())[-1]
    assert resumed["summary"]["resumed"] == 1.0

    fresh = tmp_path / "fresh"  # the same command, never interrupted
    assert main(["quantize", "--recipe", str(recipe), "--out", str(fresh)]) == 0
    a, b = _state(out), _state(fresh)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    plain = json.loads((fresh / "reports.json").read_text())[-1]
    assert plain["summary"]["resumed"] == 0.0
    assert {k: v for k, v in resumed["summary"].items() if k != "resumed"} == \
        {k: v for k, v in plain["summary"].items() if k != "resumed"}
    assert resumed["arrays"]["curves"] == plain["arrays"]["curves"]


@pytest.mark.parametrize("restart", [False, True])
def test_restart_discards_an_unfinished_run(tmp_path, capsys, restart):
    """--restart deletes the checkpoints and starts over; without it an unfinished run of another command
    is refused before any work."""
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({**RECIPE, "stages": RECIPE["stages"][:2]}))
    out = tmp_path / "run"
    (out / CHECKPOINTS).mkdir(parents=True)
    (out / CHECKPOINTS / "run.json").write_text(json.dumps({"fingerprint": "0" * 16, "key": {"seed": 9}}))
    argv = ["quantize", "--recipe", str(recipe), "--out", str(out)] + (["--restart"] if restart else [])
    assert main(argv) == (0 if restart else 2)
    if restart:
        assert (out / "manifest.json").exists() and not (out / CHECKPOINTS).exists()
    else:
        assert "unfinished run of another command" in capsys.readouterr().err
        assert not (out / "manifest.json").exists()
