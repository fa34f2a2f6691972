"""Tests for workbench.models.loading: every layout, every supported class, every error path.

No test touches the network: an autouse fixture makes any socket connection fail.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import types
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

import diffusers
from workbench.models.adapters import SUPPORTED_CLASSES, ArchAdapter, tiny_inputs, tiny_model
from workbench.models.loading import BUNDLED_NAMES, LoadedModel, ModelLoadError, load, load_pipeline

WEIGHTS = "diffusion_pytorch_model.safetensors"


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args!r}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> dict[str, tuple[nn.Module, Path]]:
    """One tiny model per class, saved with save_pretrained (shared, never modified)."""
    root = tmp_path_factory.mktemp("saved")
    out = {}
    for name in SUPPORTED_CLASSES:
        model = tiny_model(name)
        model.save_pretrained(root / name)
        out[name] = (model, root / name)
    return out


def fresh_copy(model: nn.Module, directory: Path) -> Path:
    model.save_pretrained(directory)
    return directory


def forward(model: nn.Module, class_name: str) -> torch.Tensor:
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Mochi's CPU autocast warning
        return model(**tiny_inputs(class_name), return_dict=False)[0]


def assert_same_parameters(a: nn.Module, b: nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert sa[key].dtype == sb[key].dtype, key
        assert torch.equal(sa[key], sb[key]), key


def write_pipeline(directory: Path, transformer_entry, pipeline_class: str = "WanPipeline", **extra) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    index = {"_class_name": pipeline_class, "_diffusers_version": diffusers.__version__}
    if transformer_entry is not None:
        index["transformer"] = transformer_entry
    index.update(extra)
    (directory / "model_index.json").write_text(json.dumps(index))
    return directory


# ---------------------------------------------------------------------------
# transformer directories, one per class
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("class_name", SUPPORTED_CLASSES)
def test_load_transformer_dir_roundtrip(saved, class_name):
    original, directory = saved[class_name]
    loaded = load(directory)

    assert isinstance(loaded, LoadedModel)
    assert loaded.kind == "transformer"
    assert loaded.source == str(directory.resolve())
    assert loaded.pipeline_path is None and loaded.bundle is None
    assert type(loaded.transformer) is getattr(diffusers, class_name)
    assert isinstance(loaded.adapter, ArchAdapter) and loaded.adapter.class_name == class_name
    assert loaded.class_name == class_name
    assert not loaded.transformer.training
    assert loaded.transformer is not original

    assert_same_parameters(original, loaded.transformer)
    expected = forward(original, class_name)
    got = forward(loaded.transformer, class_name)
    assert got.shape == expected.shape
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


def test_load_accepts_str_and_dtype(saved):
    original, directory = saved["WanTransformer3DModel"]
    loaded = load(str(directory), dtype=torch.bfloat16)
    t = loaded.transformer
    assert t.proj_out.weight.dtype == torch.bfloat16
    assert t.blocks[0].attn1.to_q.weight.dtype == torch.bfloat16
    # diffusers keeps Wan's _keep_in_fp32_modules in float32
    assert t.condition_embedder.time_embedder.linear_1.weight.dtype == torch.float32
    torch.testing.assert_close(t.proj_out.weight.float(), original.proj_out.weight.to(torch.bfloat16).float())


def test_load_sets_offline_and_local_files_only(saved, monkeypatch):
    _, directory = saved["LTXVideoTransformer3DModel"]
    cls = diffusers.LTXVideoTransformer3DModel
    original = cls.from_pretrained.__func__
    seen = {}

    def spy(klass, *args, **kwargs):
        seen["offline"] = os.environ.get("HF_HUB_OFFLINE")
        seen["local_files_only"] = kwargs.get("local_files_only")
        return original(klass, *args, **kwargs)

    monkeypatch.setattr(cls, "from_pretrained", classmethod(spy))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    load(directory)
    assert seen == {"offline": "1", "local_files_only": True}
    assert "HF_HUB_OFFLINE" not in os.environ  # restored afterwards

    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    load(directory)
    assert os.environ["HF_HUB_OFFLINE"] == "0"


# ---------------------------------------------------------------------------
# pipeline layout
# ---------------------------------------------------------------------------


def test_load_pipeline_layout(saved, tmp_path):
    original, _ = saved["WanTransformer3DModel"]
    pipe_dir = write_pipeline(tmp_path / "pipe", ["diffusers", "WanTransformer3DModel"])
    fresh_copy(original, pipe_dir / "transformer")

    loaded = load(pipe_dir)
    assert loaded.kind == "pipeline"
    assert loaded.pipeline_path == pipe_dir.resolve()
    assert loaded.source == str(pipe_dir.resolve())
    assert type(loaded.transformer) is diffusers.WanTransformer3DModel
    assert loaded.adapter.class_name == "WanTransformer3DModel"
    assert_same_parameters(original, loaded.transformer)
    torch.testing.assert_close(
        forward(loaded.transformer, "WanTransformer3DModel"), forward(original, "WanTransformer3DModel"), rtol=0, atol=0
    )


def test_load_pipeline_second_transformer_component(saved, tmp_path):
    wan, _ = saved["WanTransformer3DModel"]
    other = tiny_model("WanTransformer3DModel", seed=7)
    pipe_dir = write_pipeline(
        tmp_path / "pipe",
        ["diffusers", "WanTransformer3DModel"],
        transformer_2=["diffusers", "WanTransformer3DModel"],
    )
    fresh_copy(wan, pipe_dir / "transformer")
    fresh_copy(other, pipe_dir / "transformer_2")
    assert_same_parameters(load(pipe_dir).transformer, wan)
    assert_same_parameters(load(pipe_dir, component="transformer_2").transformer, other)


def test_load_pipeline_builds_full_pipeline(saved, tmp_path):
    pytest.importorskip("transformers")  # WanPipeline is a dummy object without it
    original, _ = saved["WanTransformer3DModel"]
    pipe_dir = write_pipeline(
        tmp_path / "pipe",
        ["diffusers", "WanTransformer3DModel"],
        scheduler=["diffusers", "UniPCMultistepScheduler"],
        vae=[None, None],
        text_encoder=[None, None],
        tokenizer=[None, None],
    )
    fresh_copy(original, pipe_dir / "transformer")
    diffusers.UniPCMultistepScheduler().save_pretrained(pipe_dir / "scheduler")

    loaded = load(pipe_dir)
    pipe = load_pipeline(loaded.pipeline_path, vae=None, text_encoder=None, tokenizer=None)
    assert type(pipe).__name__ == "WanPipeline"
    assert type(pipe.scheduler).__name__ == "UniPCMultistepScheduler"
    assert_same_parameters(pipe.transformer, original)

    reuse = load_pipeline(pipe_dir, transformer=loaded.transformer, vae=None, text_encoder=None, tokenizer=None)
    assert reuse.transformer is loaded.transformer


def test_load_pipeline_errors(tmp_path):
    (tmp_path / "plain").mkdir()
    with pytest.raises(ModelLoadError, match="no model_index.json"):
        load_pipeline(tmp_path / "plain")
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_pipeline(tmp_path / "missing")
    with pytest.raises(ModelLoadError, match="no network access"):
        load_pipeline("THUDM/CogVideoX-2b")
    broken = write_pipeline(tmp_path / "broken", ["diffusers", "WanTransformer3DModel"])
    with pytest.raises(ModelLoadError, match="Could not build the pipeline") as info:
        load_pipeline(broken)
    assert info.value.__cause__ is not None


def test_pipeline_without_transformer_component(tmp_path):
    pipe_dir = write_pipeline(
        tmp_path / "p", None, pipeline_class="StableDiffusionPipeline", unet=["diffusers", "UNet2DConditionModel"]
    )
    with pytest.raises(ModelLoadError, match="no 'transformer' component.*unet"):
        load(pipe_dir)


def test_pipeline_with_unsupported_transformer_class(tmp_path):
    pipe_dir = write_pipeline(tmp_path / "p", ["diffusers", "FluxTransformer2DModel"], pipeline_class="FluxPipeline")
    with pytest.raises(ModelLoadError) as info:
        load(pipe_dir)
    message = str(info.value)
    assert "FluxTransformer2DModel" in message
    for name in SUPPORTED_CLASSES:
        assert name in message


def test_pipeline_with_null_transformer(tmp_path):
    pipe_dir = write_pipeline(tmp_path / "p", [None, None])
    with pytest.raises(ModelLoadError, match=r"saved without a 'transformer'"):
        load(pipe_dir)


def test_pipeline_missing_transformer_subfolder(tmp_path):
    pipe_dir = write_pipeline(tmp_path / "p", ["diffusers", "WanTransformer3DModel"])
    with pytest.raises(ModelLoadError, match="transformer/ subfolder is missing"):
        load(pipe_dir)


def test_pipeline_class_mismatch(saved, tmp_path):
    ltx, _ = saved["LTXVideoTransformer3DModel"]
    pipe_dir = write_pipeline(tmp_path / "p", ["diffusers", "WanTransformer3DModel"])
    fresh_copy(ltx, pipe_dir / "transformer")
    with pytest.raises(ModelLoadError, match="inconsistent"):
        load(pipe_dir)


def test_pipeline_corrupt_model_index(tmp_path):
    (tmp_path / "p").mkdir()
    (tmp_path / "p" / "model_index.json").write_text('{"_class_name": "WanPipeline", ')
    with pytest.raises(ModelLoadError, match="model_index.json is not readable JSON"):
        load(tmp_path / "p")


# ---------------------------------------------------------------------------
# bundled names
# ---------------------------------------------------------------------------


def install_fake_bundled(monkeypatch, transformer: nn.Module) -> list[str]:
    calls: list[str] = []

    class TinyWorldModel:
        def __init__(self, t):
            self.transformer = t

    def load_bundled(name="tiny-world"):
        calls.append(name)
        return TinyWorldModel(transformer)

    module = types.ModuleType("workbench.models.bundled")
    module.load_bundled = load_bundled  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "workbench.models.bundled", module)
    return calls


def test_load_bundled(monkeypatch):
    assert BUNDLED_NAMES == ("tiny-world",)
    transformer = tiny_model("WanTransformer3DModel")
    calls = install_fake_bundled(monkeypatch, transformer)
    loaded = load("tiny-world")
    assert calls == ["tiny-world"]
    assert loaded.kind == "bundled"
    assert loaded.source == "tiny-world"
    assert loaded.transformer is transformer
    assert loaded.bundle.transformer is transformer
    assert loaded.pipeline_path is None
    assert loaded.adapter.class_name == "WanTransformer3DModel"


def test_load_bundled_casts_dtype(monkeypatch):
    transformer = tiny_model("WanTransformer3DModel")
    install_fake_bundled(monkeypatch, transformer)
    loaded = load("tiny-world", dtype=torch.bfloat16)
    assert loaded.transformer.proj_out.weight.dtype == torch.bfloat16


def test_load_bundled_unsupported_transformer(monkeypatch):
    install_fake_bundled(monkeypatch, nn.Linear(2, 2))
    with pytest.raises(ModelLoadError, match="Bundled model 'tiny-world'.*Supported classes"):
        load("tiny-world")


def test_load_bundled_module_missing(monkeypatch):
    monkeypatch.setitem(sys.modules, "workbench.models.bundled", None)  # makes the import fail
    with pytest.raises(ModelLoadError, match="workbench.models.bundled is missing"):
        load("tiny-world")


# ---------------------------------------------------------------------------
# errors
# ---------------------------------------------------------------------------


def test_model_load_error_is_value_error():
    assert issubclass(ModelLoadError, ValueError)


def test_unknown_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ModelLoadError) as info:
        load("tiny-universe")
    message = str(info.value)
    assert "Unknown model name 'tiny-universe'" in message
    assert "tiny-world" in message
    assert "local directory" in message


def test_path_does_not_exist(tmp_path):
    missing = tmp_path / "nowhere" / "model"
    with pytest.raises(ModelLoadError, match="Path does not exist") as info:
        load(missing)
    assert str(missing) in str(info.value)
    with pytest.raises(ModelLoadError, match="Path does not exist"):
        load("./not-here/either")


@pytest.mark.parametrize(
    "remote", ["THUDM/CogVideoX-2b", "Wan-AI/Wan2.1-T2V-1.3B-Diffusers", "https://huggingface.co/THUDM/CogVideoX-2b"]
)
def test_remote_id_is_refused(tmp_path, monkeypatch, remote):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ModelLoadError) as info:
        load(remote)
    message = str(info.value)
    assert "no network access" in message
    assert "download it" in message.lower() or "Download it" in message
    assert "local directory" in message


def test_remote_looking_local_dir_is_loaded(saved, tmp_path, monkeypatch):
    """An existing local directory wins over the remote-id heuristic."""
    original, _ = saved["CogVideoXTransformer3DModel"]
    monkeypatch.chdir(tmp_path)
    fresh_copy(original, tmp_path / "THUDM" / "CogVideoX-2b")
    loaded = load("THUDM/CogVideoX-2b")
    assert loaded.kind == "transformer"
    assert_same_parameters(original, loaded.transformer)


def test_directory_with_neither_file(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match="neither config.json .* nor model_index.json"):
        load(tmp_path / "empty")


def test_directory_hint_for_transformer_subfolder(saved, tmp_path):
    original, _ = saved["LTXVideoTransformer3DModel"]
    fresh_copy(original, tmp_path / "pipe" / "transformer")
    with pytest.raises(ModelLoadError, match="pass .*transformer"):
        load(tmp_path / "pipe")


def test_file_instead_of_directory(saved):
    _, directory = saved["WanTransformer3DModel"]
    with pytest.raises(ModelLoadError, match="is a file, not a directory.*Pass its folder instead"):
        load(directory / "config.json")


def test_unsupported_class_name(tmp_path):
    (tmp_path / "unet").mkdir()
    (tmp_path / "unet" / "config.json").write_text(json.dumps({"_class_name": "UNet2DConditionModel"}))
    with pytest.raises(ModelLoadError) as info:
        load(tmp_path / "unet")
    message = str(info.value)
    assert "unsupported class 'UNet2DConditionModel'" in message
    for name in SUPPORTED_CLASSES:
        assert name in message


def test_config_without_class_name(tmp_path):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text(json.dumps({"num_layers": 2}))
    with pytest.raises(ModelLoadError, match="no '_class_name'"):
        load(tmp_path / "m")


def test_corrupt_config_json(saved, tmp_path):
    original, _ = saved["WanTransformer3DModel"]
    directory = fresh_copy(original, tmp_path / "m")
    (directory / "config.json").write_text('{"_class_name": "WanTransformer3DModel", "num_la')
    with pytest.raises(ModelLoadError, match="config.json is not readable JSON.*re-save"):
        load(directory)


@pytest.mark.parametrize("damage", ["garbage", "truncated", "empty"])
def test_corrupt_safetensors(saved, tmp_path, damage):
    original, _ = saved["MochiTransformer3DModel"]
    directory = fresh_copy(original, tmp_path / "m")
    weights = directory / WEIGHTS
    data = weights.read_bytes()
    if damage == "garbage":
        weights.write_bytes(os.urandom(len(data)))
    elif damage == "truncated":
        weights.write_bytes(data[: len(data) // 2])
    else:
        weights.write_bytes(b"")
    with pytest.raises(ModelLoadError) as info:
        load(directory)
    message = str(info.value)
    assert str(weights) in message
    assert "corrupt or truncated" in message
    assert "Re-save" in message and "re-download" in message
    assert info.value.__cause__ is not None  # the underlying exception is kept


def test_corrupt_bin_weights(saved, tmp_path):
    original, _ = saved["LTXVideoTransformer3DModel"]
    directory = tmp_path / "m"
    original.save_pretrained(directory, safe_serialization=False)
    weights = directory / "diffusion_pytorch_model.bin"
    assert weights.is_file()
    weights.write_bytes(os.urandom(weights.stat().st_size))
    with pytest.raises(ModelLoadError) as info:
        load(directory)
    assert str(weights) in str(info.value) and "corrupt" in str(info.value)
    assert info.value.__cause__ is not None


def test_git_lfs_pointer_is_explained(saved, tmp_path):
    original, _ = saved["LTXVideoTransformer3DModel"]
    directory = fresh_copy(original, tmp_path / "m")
    (directory / WEIGHTS).write_text("version https://git-lfs.github.com/spec/v1\noid sha256:abc\nsize 123\n")
    with pytest.raises(ModelLoadError, match="git lfs pull"):
        load(directory)


def test_missing_weights_file(saved, tmp_path):
    original, _ = saved["LTXVideoTransformer3DModel"]
    directory = fresh_copy(original, tmp_path / "m")
    (directory / WEIGHTS).unlink()
    with pytest.raises(ModelLoadError, match="No weights file"):
        load(directory)


def test_incomplete_weights(saved, tmp_path):
    from safetensors.torch import save_file

    original, _ = saved["LTXVideoTransformer3DModel"]
    directory = fresh_copy(original, tmp_path / "m")
    state = {k: v.contiguous() for k, v in original.state_dict().items() if k != "proj_out.weight"}
    save_file(state, str(directory / WEIGHTS), metadata={"format": "pt"})
    with pytest.raises(ModelLoadError, match=r"lack 1 parameter\(s\).*proj_out.weight"):
        load(directory)


def test_bad_arguments(saved):
    _, directory = saved["WanTransformer3DModel"]
    with pytest.raises(ModelLoadError, match="dtype"):
        load(directory, dtype=torch.int8)
    with pytest.raises(ModelLoadError, match="dtype"):
        load(directory, dtype="float32")  # type: ignore[arg-type]
    with pytest.raises(ModelLoadError, match="Empty model name"):
        load("")
    with pytest.raises(ModelLoadError, match="Expected a model name"):
        load(42)  # type: ignore[arg-type]


def test_bin_weights_roundtrip(saved, tmp_path):
    original, _ = saved["HunyuanVideoTransformer3DModel"]
    original.save_pretrained(tmp_path / "m", safe_serialization=False)
    loaded = load(tmp_path / "m")
    assert_same_parameters(original, loaded.transformer)


def test_sharded_weights_roundtrip_and_corrupt_shard(saved, tmp_path):
    original, _ = saved["LatteTransformer3DModel"]
    directory = tmp_path / "m"
    original.save_pretrained(directory, max_shard_size="40KB")
    shards = sorted(directory.glob("diffusion_pytorch_model-*.safetensors"))
    assert len(shards) > 1 and (directory / "diffusion_pytorch_model.safetensors.index.json").is_file()
    assert_same_parameters(original, load(directory).transformer)

    shards[-1].write_bytes(shards[-1].read_bytes()[:100])
    with pytest.raises(ModelLoadError, match="corrupt or truncated") as info:
        load(directory)
    assert str(shards[-1]) in str(info.value)
    shards[0].unlink()
    with pytest.raises(ModelLoadError, match=f"missing: {shards[0].name}"):
        load(directory)


def test_config_does_not_match_weights(saved, tmp_path):
    original, _ = saved["WanTransformer3DModel"]
    directory = fresh_copy(original, tmp_path / "m")
    config = json.loads((directory / "config.json").read_text())
    config["ffn_dim"] = 48
    (directory / "config.json").write_text(json.dumps(config))
    match = "Could not load WanTransformer3DModel.*expected shape.*config.json matches"
    with pytest.raises(ModelLoadError, match=match):
        load(directory)
