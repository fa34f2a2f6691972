"""Hostile inputs: crafted manifests, pickles, path traversal, links, oversized and binary files.

Every case asserts a clear error (the workbench's own error type, through the CLI a one-line `error:`) and
that nothing happened besides: no file created by a payload, no module imported, nothing of the user's
deleted, no fact about a file outside the directory revealed.
"""
from __future__ import annotations

import json
import os
import pickle
import shutil
import sys
from pathlib import Path

import pytest
import torch

from stage_helpers import tiny_world_model
from workbench.cli.commands import main
from workbench.io.export import export_model
from workbench.io.manifest import write_manifest
from workbench.io.packed import PackedModelError, load_packed
from workbench.io.rundir import ArtifactError, load_quantized, save_quantized
from workbench.quant.compensation import LoRABranch
from workbench.session import Session
from workbench.stages import PTQSettings, apply_quantization

W8A8 = {"weight": {"format": "int8"}, "act": {"format": "int8", "granularity": "token", "dynamic": True}}


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """A saved run (2-block tiny-world, W8A8 dynamic) whose first layer carries a LoRA extra."""
    s = Session.start(tiny_world_model(), seed=0)
    apply_quantization(s, PTQSettings(quant=W8A8))
    layer = s.qtransformer.get_submodule("blocks.0.attn1.to_q")
    layer.extras["lora"] = LoRABranch(layer.in_features, layer.out_features, rank=2)
    out = tmp_path_factory.mktemp("run") / "run"
    save_quantized(s, out)
    return out


@pytest.fixture(scope="module")
def packed_dir(run_dir, tmp_path_factory) -> Path:
    _, qt, manifest = load_quantized(run_dir)
    out = tmp_path_factory.mktemp("packed") / "packed"
    export_model(qt, out, manifest["recipe"])
    return out


def _copy(src: Path, tmp_path: Path, name: str = "copy") -> Path:
    dst = tmp_path / name
    shutil.copytree(src, dst)
    return dst


def _edit(directory: Path, change, digest: bool = True) -> None:
    """Apply `change` to the manifest; with `digest` re-sign it (what a crafted file would do)."""
    path = directory / "manifest.json"
    m = json.loads(path.read_text())
    change(m)
    if digest:
        write_manifest(path, m)
    else:
        path.write_text(json.dumps(m))


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "Traceback" not in err and len(err.splitlines()) == 1, err
    return err


# ---- code named in a file never runs ------------------------------------------------------------------------


PAYLOAD = {"class": "os:system", "init": {"command": "touch PWNED"}}


def test_run_dir_naming_a_callable_runs_nothing(run_dir, tmp_path, capsys, monkeypatch):
    d = _copy(run_dir, tmp_path)
    _edit(d, lambda m: m["extras"]["blocks.0.attn1.to_q"].__setitem__("lora", PAYLOAD))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ArtifactError, match="'os:system', which is not one of the workbench's own"):
        load_quantized(d)
    for argv in (["eval", str(d), "--json", "--steps", "1"], ["export", str(d), "--out", str(tmp_path / "e")]):
        assert main(argv) == 2
        assert "not one of the workbench's own" in _one_line_error(capsys)
    assert not (tmp_path / "PWNED").exists() and not (tmp_path / "e").exists()


def test_packed_export_never_imports_a_named_module(packed_dir, tmp_path, monkeypatch):
    """A module on the path whose import would leave a mark: loading an export that names it imports nothing."""
    mark = tmp_path / "imported"
    (tmp_path / "evil_extras_mod.py").write_text(f"open({str(mark)!r}, 'w').write('x')\nclass Foo: pass\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    d = _copy(packed_dir, tmp_path)
    name = next(n for n, e in json.loads((d / "manifest.json").read_text())["layers"].items() if e["extras"])
    _edit(d, lambda m: m["layers"][name]["extras"].__setitem__("lora", {"class": "evil_extras_mod:Foo", "init": {}}))
    with pytest.raises(PackedModelError, match="evil_extras_mod:Foo.*not one of the workbench's own"):
        load_packed(d)
    assert not mark.exists() and "evil_extras_mod" not in sys.modules


def test_transformer_class_outside_the_allow_list_is_refused(run_dir, packed_dir, tmp_path):
    d = _copy(run_dir, tmp_path, "r")
    _edit(d, lambda m: m["model"]["transformer"].__setitem__("class", "DiffusionPipeline"))
    with pytest.raises(ArtifactError, match="'DiffusionPipeline' is not one this workbench rebuilds"):
        load_quantized(d)
    p = _copy(packed_dir, tmp_path, "p")
    _edit(p, lambda m: m["model"].__setitem__("class", "AutoencoderKL"))
    with pytest.raises(PackedModelError, match="'AutoencoderKL', not one of the transformer classes"):
        load_packed(p)


class _Boom:
    """A pickle payload: unpickling it would create a file."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_checkpoints_are_never_unpickled_and_checked_before_reading(tmp_path):
    """A pickled `.pt` beside the checkpoint is ignored; a checkpoint of another run is refused before its
    tensors are read; a tensor file that does not belong to its JSON is refused."""
    from workbench.io.checkpoint import CheckpointError, load_checkpoint, save_checkpoint

    mark = tmp_path / "unpickled"
    ckpt = tmp_path / "ckpt" / "qvdit_distill"
    ckpt.parent.mkdir()
    with open(ckpt.with_suffix(".pt"), "wb") as f:
        pickle.dump(_Boom(str(mark)), f)
    assert load_checkpoint(ckpt, "abc") is None and not mark.exists()
    save_checkpoint(ckpt, "abc", {"x": torch.ones(3), "step": 4})
    assert load_checkpoint(ckpt, "abc")["step"] == 4
    with pytest.raises(CheckpointError, match="another run|other settings"):
        load_checkpoint(ckpt, "other")
    ckpt.with_suffix(".safetensors").write_bytes(b"\x80\x04 not safetensors, maybe a pickle")
    with pytest.raises(CheckpointError, match="do not belong"):
        load_checkpoint(ckpt, "abc")
    assert not mark.exists()


# ---- integrity: edits, traversal, links, sizes ----------------------------------------------------------------


def test_edited_manifest_names_the_field(run_dir, tmp_path, capsys):
    d = _copy(run_dir, tmp_path)
    _edit(d, lambda m: m["quant_config"]["weight"].__setitem__("format", "int2"), digest=False)
    with pytest.raises(ArtifactError, match=r"modified after it was written \(changed: quant_config\)"):
        load_quantized(d)
    assert main(["eval", str(d), "--json"]) == 2
    assert "quant_config" in _one_line_error(capsys)


@pytest.mark.parametrize("name", ["../../../etc/passwd", "/etc/passwd", "a/../../x", "..", "~/x"])
def test_file_entries_outside_the_directory(run_dir, packed_dir, tmp_path, name):
    """Refused as text, before the file system is asked: the message reveals nothing about the target."""
    d = _copy(run_dir, tmp_path, "r")
    _edit(d, lambda m: m["files"].__setitem__(name, {"bytes": 1, "sha256": "0" * 64}))
    with pytest.raises(ArtifactError, match="outside its directory|invalid file name") as e:
        load_quantized(d)
    if Path("/etc/passwd").exists():
        assert str(Path("/etc/passwd").stat().st_size) not in str(e.value)
    p = _copy(packed_dir, tmp_path, "p")
    _edit(p, lambda m: m["files"].append({"name": name, "bytes": 1, "sha256": "0" * 64, "tensors": 0}))
    with pytest.raises(PackedModelError, match="outside its directory|invalid file name"):
        load_packed(p)


def test_a_link_out_of_the_directory_is_refused(run_dir, tmp_path):
    outside = tmp_path / "secret.bin"
    outside.write_bytes(b"s" * 1234)
    d = _copy(run_dir, tmp_path, "r")
    (d / "reports.json").unlink()
    os.symlink(outside, d / "reports.json")
    with pytest.raises(ArtifactError, match="leads outside the directory") as e:
        load_quantized(d)
    assert "1234" not in str(e.value)


def test_oversized_and_binary_manifests(run_dir, tmp_path):
    d = _copy(run_dir, tmp_path, "big")
    with open(d / "manifest.json", "wb") as f:  # sparse: costs no disk
        f.truncate(65 * 2**20)
    with pytest.raises(ArtifactError, match="larger than any manifest"):
        load_quantized(d)
    b = _copy(run_dir, tmp_path, "bin")
    (b / "manifest.json").write_bytes(bytes(range(256)) * 4)
    with pytest.raises(ArtifactError, match="not UTF-8 text"):
        load_quantized(b)


def test_binary_recipe_and_prompts_files_name_the_file(tmp_path, capsys):
    junk = bytes(range(128, 256)) * 8
    recipe, prompts = tmp_path / "r.yaml", tmp_path / "p.txt"
    recipe.write_bytes(junk)
    prompts.write_bytes(junk)
    assert main(["quantize", "--recipe", str(recipe), "--out", str(tmp_path / "q")]) == 2
    assert f"recipe file {recipe} is not UTF-8 text" in _one_line_error(capsys)
    assert main(["eval-fp", "--prompts", str(prompts), "--json"]) == 2
    assert f"prompts file {prompts} is not UTF-8 text" in _one_line_error(capsys)
    assert not (tmp_path / "q").exists()


def test_a_huge_prompt_is_not_echoed(tmp_path, capsys):
    prompt = "a red circle " * 800
    assert main(["generate", "--prompt", prompt, "--out", str(tmp_path / "c.mp4")]) == 2
    err = _one_line_error(capsys)
    assert len(err) < 400 and err.count("a red circle") <= 7 and "10400 characters" in err


# ---- nothing of the user's is lost --------------------------------------------------------------------------


def test_export_out_inside_or_equal_to_the_source_is_refused(run_dir, tmp_path, capsys):
    d = _copy(run_dir, tmp_path)
    before = sorted(p.name for p in d.iterdir())
    for out in (d, d / "packed"):
        for force in ([], ["--force"]):
            assert main(["export", str(d), "--out", str(out), *force]) == 2
            assert "which this command reads" in _one_line_error(capsys)
    assert sorted(p.name for p in d.iterdir()) == before
    load_quantized(d)  # still a valid run


def test_force_never_deletes_files_it_did_not_write(run_dir, tmp_path, capsys):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "model.safetensors").write_bytes(b"my own weights")
    (mine / "manifest.json").write_text('{"format": "something-else", "files": {"model.safetensors": {}}}')
    assert main(["export", str(run_dir), "--out", str(mine), "--force"]) == 2
    assert "holds no earlier output of this command" in _one_line_error(capsys)
    assert (mine / "model.safetensors").read_bytes() == b"my own weights"


def test_unwritable_out_is_found_before_any_work(tmp_path, capsys, monkeypatch):
    from workbench.cli import jobs

    monkeypatch.setattr(jobs, "load_model", lambda model="tiny-world", device="cpu", dtype=None: pytest.fail("the model was loaded"))
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    assert main(["quantize", "--recipe", "naive-w8a8", "--out", str(blocker / "out")]) == 2
    assert "is a file" in _one_line_error(capsys)
    assert main(["generate", "--prompt", "a red circle moving left", "--out", str(tmp_path / "clip.txt")]) == 2
    assert "unsupported video extension '.txt'" in _one_line_error(capsys)
