"""Several processes, one result: `workbench quantize` under torchrun with 2 gloo CPU processes equals the same
command in one process, a crashing rank fails the job at once naming itself and the resume command, the
distributed checkpoint it leaves resumes in one process, and a stuck rank ends the job after the timeout.

Tolerances (the assertions state which applies):
* PTQ recipes and the calibration cache: bit for bit. Calibration deals the one-process sampling batches to the
  ranks and reassembles them in the one-process order; every other non-training stage runs alike on all ranks.
* Distillation: `assert_close(rtol=1e-4, atol=2e-5)`. Two ranks each compute a slice of the global batch and
  their gradients are summed, so the gradient differs from the one-process gradient by float rounding (~1e-6
  relative, see test_split_step_gradients_and_dcp_checkpoint); AdamW turns that into parameter differences of
  about 1e-6 after the 3 steps the shrunk recipes take (observed: <= 3.3e-6 block-wise, 1.3e-6 end-to-end).
  Block-wise tests train every block against FP block inputs (`inputs: fp`): with the default quantized inputs
  (block k learns from blocks < k after their training) a 1e-7 change in block 0 flips roundings of the next
  blocks' 3/4-bit quantizers and grows to ~7e-3 by block 6 — as much as a one-process run on 2 threads instead
  of 1 differs from itself on 1 thread, so that spread belongs to the method, not to the ranks.

Each 2-process job takes 8-16 s on 2 CPU cores (most of it importing torch and diffusers twice); the one-process
references run in this process.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from pipeline_fixtures import network_refused, one_torch_thread  # noqa: F401  (fixture)
from recipe_helpers import shrunk_recipe
from torchrun_helpers import REPO, run, torchrun, workbench
from workbench.cli.commands import main
from workbench.io.rundir import CHECKPOINTS, STATE_FILE
from workbench.models.random_pipelines import save_random_pipeline

DISTILL_TOL = {"rtol": 1e-4, "atol": 2e-5}
GRAD_RTOL = 1e-4  # relative to each gradient's largest entry (observed 2.5e-6)


def _recipe(name: str, folder: Path, **stages: dict) -> Path:
    """The shrunk recipe (recipe_helpers) with calibration in batches of one prompt (2 prompts: one batch per
    rank) and the given per-stage settings."""
    folder.mkdir(parents=True, exist_ok=True)
    path = shrunk_recipe(name, folder)
    d = yaml.safe_load(path.read_text())
    for item in d["stages"]:
        (stage, settings), = item.items()
        if stage == "collect_calibration":
            settings["batch_size"] = 1
        settings.update(stages.get(stage, {}))
    path.write_text(yaml.safe_dump(d))
    return path


def _state(out: Path) -> dict[str, torch.Tensor]:
    return load_file(str(out / STATE_FILE))


def _reports(out: Path) -> list[dict]:
    return json.loads((out / "reports.json").read_text())


def _one_process(recipe: Path, out: Path, model: str) -> Path:
    with network_refused():
        assert main(["quantize", "--recipe", str(recipe), "--out", str(out), "--model", model]) == 0
    return out


@pytest.fixture(scope="module")
def wan(tmp_path_factory) -> str:
    with network_refused():
        return str(save_random_pipeline("wan", tmp_path_factory.mktemp("pipelines") / "wan", size="tiny", seed=0))


@pytest.fixture(scope="module")
def mpq_block(tmp_path_factory) -> tuple[Path, Path]:
    """(recipe, one-process output) of MPQ-DMv2 W3A6, block-wise, FP block inputs, a checkpoint every step."""
    folder = tmp_path_factory.mktemp("mpq")
    recipe = _recipe("mpq-dmv2-w3a6", folder, mpq_distill={"inputs": "fp", "checkpoint_every": 1})
    return recipe, _one_process(recipe, folder / "one", "tiny-world")


def _assert_same_run(one: Path, two: Path, exact: bool) -> dict[str, float]:
    a, b = _state(one), _state(two)
    assert a.keys() == b.keys()
    diffs = {}
    for k in a:
        if exact:
            assert torch.equal(a[k], b[k]), k
        else:
            torch.testing.assert_close(b[k], a[k], **DISTILL_TOL, msg=lambda m, k=k: f"{k}: {m}")
        diffs[k] = float((a[k].double() - b[k].double()).abs().max()) if a[k].numel() else 0.0
    ra, rb = _reports(one), _reports(two)
    assert [r["name"] for r in ra] == [r["name"] for r in rb]
    cal_a, cal_b = ra[0], rb[0]  # the calibration cache is the one-process cache, bit for bit
    assert cal_a["name"] == "collect_calibration" and cal_a["tables"] == cal_b["tables"]
    assert {k: v for k, v in cal_a["summary"].items()} == cal_b["summary"]
    return diffs


CASES = {  # id: (model, recipe, stage settings, launcher, exact)
    "wan-ptq-vidit-q-w4a8": ("wan", "vidit-q-w4a8", {}, "torchrun", True),
    "wan-e2e-q-vdit-w4a6": ("wan", "q-vdit-w4a6", {}, "torchrun", False),
}


@pytest.mark.parametrize("case", list(CASES))
def test_two_ranks_equal_one_process_on_a_pipeline(case, wan, tmp_path):
    model, name, stages, _, exact = CASES[case]
    recipe = _recipe(name, tmp_path, **stages)
    one = _one_process(recipe, tmp_path / "one", wan)
    two = tmp_path / "two"
    job = run(torchrun(2, "-m", "workbench", "quantize", "--recipe", str(recipe), "--out", str(two), "--model", wan))
    assert job.returncode == 0, job.output[-4000:]
    assert f"wrote {two}" in job.output and job.output.count(f"wrote {two}") == 1  # rank 0 reports, once
    diffs = _assert_same_run(one, two, exact)
    if not exact:
        assert max(diffs.values()) > 0  # the ranks really trained apart (a 2-rank run is not a 1-rank run)
    assert not (two / CHECKPOINTS).exists()


def test_block_distillation_with_nproc_equals_one_process(mpq_block, tmp_path):
    recipe, one = mpq_block
    two = tmp_path / "two"
    job = run(workbench("quantize", "--recipe", str(recipe), "--out", str(two), "--nproc", "2"))
    assert job.returncode == 0, job.output[-4000:]
    diffs = _assert_same_run(one, two, exact=False)
    trained = {k for k, d in diffs.items() if d > 0}
    assert trained and all(k.startswith("blocks.") for k in trained)  # only distillation moves values
    assert not (two / CHECKPOINTS).exists()


def test_a_crashing_rank_fails_fast_and_its_checkpoint_resumes_in_one_process(mpq_block, tmp_path):
    recipe, one = mpq_block
    out = tmp_path / "run"
    cmd = workbench("quantize", "--recipe", str(recipe), "--out", str(out), "--nproc", "2")
    job = run(cmd, fail="1:blocks.1:2")  # rank 1 raises in block 1's 2nd step (after its 1st checkpoint)
    assert job.returncode != 0
    assert job.seconds < 90, f"a crashing rank must end the job at once, it took {job.seconds:.0f} s"
    assert "injected failure on rank 1 in blocks.1 at iteration 2" in job.output
    root = job.output.split("Root Cause")[1]
    assert re.search(r"rank\s*:\s*1 \(local_rank: 1\)", root) and "injected failure" in root  # torchrun names it
    assert "[rank 1 of 2] failed: RuntimeError: injected failure" in job.output  # and so does the rank
    resume = f"workbench quantize --recipe {recipe} --out {out} --nproc 2"
    assert f"Resume it with the same command (any number of processes):\n  {resume}" in job.output
    assert not (out / "manifest.json").exists()
    stage = out / CHECKPOINTS / "stage03-mpq_distill"
    dcp_dirs = [d.name for d in stage.iterdir() if d.is_dir()]  # the last save only; the JSON names it
    assert dcp_dirs == ["mpq_distill-dcp-u001-i000001"] and (stage / dcp_dirs[0] / ".metadata").is_file()
    assert '"mpq_distill-dcp-u001-i000001"' in (stage / "mpq_distill.json").read_text()

    # the same command in one process (no torchrun) resumes the 2-rank checkpoint: DCP reshards 2 -> 1
    assert main(["quantize", "--recipe", str(recipe), "--out", str(out)]) == 0
    last = _reports(out)[-1]
    assert last["summary"]["resumed"] == 1.0
    assert "unit 1, iteration 1" in last["notes"][0]
    _assert_same_run(one, out, exact=False)
    assert not (out / CHECKPOINTS).exists()


def test_a_stuck_rank_ends_the_job_after_the_timeout(mpq_block, tmp_path):
    recipe, _ = mpq_block
    out = tmp_path / "run"
    job = run(workbench("quantize", "--recipe", str(recipe), "--out", str(out), "--nproc", "2"),
              fail="1:blocks.1:2:hang", env={"WORKBENCH_DIST_TIMEOUT": "10"})  # rank 1 sleeps for an hour
    assert job.returncode != 0
    assert job.seconds < 120, f"the job waited {job.seconds:.0f} s for a stuck rank (timeout 10 s)"
    assert re.search(r"\[rank 0 of 2\] failed: RuntimeError: .*Timed out waiting 10000ms", job.output)
    assert f"Resume it with the same command (any number of processes):\n  workbench quantize --recipe {recipe}" \
        in job.output


def test_split_step_gradients_and_dcp_checkpoint(tmp_path):
    """One distillation step of block 0 split over 2 ranks (FSDP2-sharded, and replicated with all-reduced
    gradients) has the one-process loss and gradient; its DCP checkpoint, written by the 2 ranks, loads in one
    process into the very parameters and AdamW state of the one-process step."""
    from distributed_step import block_with_delta, full_values, training_step
    from workbench.distributed.checkpoints import load_model, load_optimizer
    from workbench.stages.distill import DistillSettings
    from workbench.stages.distill.loop import trainable_names

    job = run(torchrun(2, str(REPO / "tests" / "distributed" / "dp_worker.py"), str(tmp_path)))
    assert job.returncode == 0, job.output[-4000:]
    local = training_step("local")
    values = full_values(local.module, local.names)
    for kind in ("fsdp", "allreduce"):
        got = load_file(str(tmp_path / f"{kind}.safetensors"))
        assert float(got["loss"]) == local.loss  # every rank computes the whole batch's loss from gathered rows
        for k, g in local.grads.items():
            assert g.abs().max() > 0, k
            torch.testing.assert_close(got[f"grad.{k}"], g, rtol=0, atol=GRAD_RTOL * float(g.abs().max()),
                                       msg=lambda m, k=k: f"{kind} gradient of {k}: {m}")
            torch.testing.assert_close(got[f"value.{k}"], values[k], **DISTILL_TOL)

    _, q, _ = block_with_delta()  # a fresh block in this process, as a resumed run builds it
    block = q.blocks[0]
    names = sorted(trainable_names(block, DistillSettings(train=["scales", "extras"])))
    assert names == local.names
    load_model(tmp_path / "dcp", block)
    params = dict(block.named_parameters())
    opt = torch.optim.AdamW([params[n] for n in names], lr=1e-3)
    load_optimizer(tmp_path / "dcp", block, opt)
    fsdp_values = load_file(str(tmp_path / "fsdp.safetensors"))
    mine = dict(local.module.named_parameters())
    for n in names:
        assert torch.equal(params[n].detach(), fsdp_values[f"value.{n}"]), n  # exactly what the 2 ranks held
        want, have = local.optimizer.state[mine[n]], opt.state[params[n]]
        assert int(have["step"]) == 1
        torch.testing.assert_close(have["exp_avg"], want["exp_avg"], rtol=0,
                                   atol=GRAD_RTOL * float(want["exp_avg"].abs().max()))
