"""Export / reload of quantized transformers: bit-exact codes, byte sizes, integrity errors, same videos."""
from __future__ import annotations

import copy
import json
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

from workbench.models.generator import GenerationSettings
from workbench.io.packed import (
    FORMAT_VERSION,
    PackedKernelLinear,
    PackedModelError,
    KernelChoice,
    PackedQuantLinear,
    applied_weight,
    kernel_for,
    load_packed,
    pack_codes,
    unpack_codes,
)
from workbench.quant import QuantConfig, QuantFormat, QuantSpec, at_timestep, calibrate_model, quantize_model
from workbench.io.export import export_model
from workbench.io.manifest import write_manifest
from workbench.kernels import Backend, W4A8Linear, W8A8Linear, fused_blocks, ops
from workbench.kernels.reference import rel_error
from workbench.quant.compensation import LoRABranch

DYN8 = QuantSpec("int8", "token", dynamic=True)
PROMPT = ["a red circle moving left"]


def LoRA(d_in: int, d_out: int, rank: int = 2) -> LoRABranch:
    """A LoRA output correction (an extra of the allow-list) with random, non-zero factors."""
    branch = LoRABranch(d_in, d_out, rank=rank)
    with torch.no_grad():
        branch.A.normal_(0, 0.1)
        branch.B.normal_(0, 0.1)
    return branch


def mlp() -> nn.Sequential:
    return nn.Sequential(nn.Linear(64, 96), nn.GELU(), nn.Linear(96, 64, bias=False))


def quantized_mlp(weight: QuantSpec, act: QuantSpec | None) -> nn.Sequential:
    torch.manual_seed(0)
    m = mlp()
    quantize_model(m, QuantConfig(weight=weight, act=act))
    return m


def weights_exact(reloaded: nn.Module, original: nn.Module, names) -> bool:
    return all(torch.equal(applied_weight(reloaded.get_submodule(n)), original.get_submodule(n).dequantized_weight())
               for n in names)


# ---- codes -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["int2", "int3", "int4", "uint4", "int5", "uint6", "int7", "int8", "uint8"])
@pytest.mark.parametrize("cols", [64, 7])
def test_pack_unpack_every_code(fmt, cols):
    f = QuantFormat.parse(fmt)
    lo, hi = (-(2 ** (f.bits - 1)), 2 ** (f.bits - 1) - 1) if f.symmetric else (0, 2**f.bits - 1)
    codes = torch.randint(lo, hi + 1, (5, cols)).to(torch.int8 if f.symmetric else torch.uint8)
    codes[0, :2] = torch.tensor([lo, hi])
    stored, storage = pack_codes(codes, f)
    assert stored.numel() <= -(-codes.numel() * f.bits // 8) + 5  # about bits/8 bytes per code
    assert torch.equal(unpack_codes(stored, storage, f, (5, cols)), codes)


def test_kernel_choice():
    k = kernel_for
    U8 = QuantSpec("uint8", "token", dynamic=True)
    assert k(QuantFormat.parse("int8"), "channel", None, 128, DYN8) == KernelChoice("W8A8Linear")
    assert k(QuantFormat.parse("int4"), "channel", None, 512, DYN8) == KernelChoice("W4A8Linear", 512)
    assert k(QuantFormat.parse("int4"), "tensor", None, 512, DYN8) == KernelChoice("W4A8Linear", 512)
    # K = 40: neither the per-channel path (K a multiple of 16) nor a group size fits; int4 codes fit the W8A8 kernel
    assert k(QuantFormat.parse("int4"), "channel", None, 40, DYN8) == KernelChoice("W8A8Linear")
    assert k(QuantFormat.parse("int3"), "group", 64, 128, DYN8) == KernelChoice("W4A8Linear", 64)
    assert k(QuantFormat.parse("fp8"), "channel", None, 128, QuantSpec("fp8", "token", dynamic=True)) == \
        KernelChoice("FP8Linear")
    assert k(QuantFormat.parse("uint4"), "group", 64, 128, DYN8) is None  # weight zero points: no kernel
    assert k(QuantFormat.parse("int4"), "channel", None, 128, QuantSpec("int6", "token", dynamic=True)) is None
    # asymmetric uint8 activations (ViDiT-Q's): the W8A8 kernel with its zero-point epilogue, int4 weights too
    assert k(QuantFormat.parse("int8"), "channel", None, 128, U8) == KernelChoice("W8A8Linear", asym_act=True)
    assert k(QuantFormat.parse("int4"), "channel", None, 512, U8) == KernelChoice("W8A8Linear", asym_act=True)
    assert k(QuantFormat.parse("int4"), "group", 64, 128, U8) is None  # group scales need the W4A8 kernel
    assert k(QuantFormat.parse("int8"), "channel", None, 128, U8.with_(observer="mse")) is None
    assert k(QuantFormat.parse("int8"), "channel", None, 128, None) is None  # weight-only


# ---- round trips on small models --------------------------------------------------------------------


@pytest.mark.parametrize("case, weight, act, kernel", [
    ("int8-channel", QuantSpec("int8", "channel"), DYN8, W8A8Linear),
    ("int8-channel-uint8-act", QuantSpec("int8", "channel"), QuantSpec("uint8", "token", dynamic=True), W8A8Linear),
    ("int4-channel-uint8-act", QuantSpec("int4", "channel"), QuantSpec("uint8", "token", dynamic=True), W8A8Linear),
    ("int4-group-asym", QuantSpec("uint4", "group", group_size=32), DYN8, PackedQuantLinear),
    ("int4-group", QuantSpec("int4", "group", group_size=32), DYN8, W4A8Linear),
    ("int3-a6", QuantSpec("int3", "channel", observer="mse"), QuantSpec("int6", "token", dynamic=True), PackedQuantLinear),
    ("fp8", QuantSpec("fp8", "channel"), QuantSpec("fp8", "token", dynamic=True), None),
])
def test_round_trip_bit_exact(tmp_path, case, weight, act, kernel):
    m = quantized_mlp(weight, act)
    export_model(m, tmp_path, recipe={"name": case})
    x = torch.randn(2, 5, 64)
    with torch.no_grad():
        want = m(x)
        for fake in (False, True):
            r = load_packed(tmp_path, backend="reference", fake_quant=fake, model=mlp())
            assert weights_exact(r, m, ["0", "2"]), fake
            if fake:
                assert isinstance(r[0], PackedQuantLinear)
                assert torch.equal(r(x), want)
            else:
                if kernel is not None:
                    assert isinstance(r[0], kernel)
                    assert kernel is PackedQuantLinear or r[0].backend is Backend.REFERENCE
                torch.testing.assert_close(r(x), want, rtol=1e-3, atol=1e-3)
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["recipe"] == {"name": case}
    layer = manifest["layers"]["0"]
    assert layer["shape"] == [96, 64] and layer["weight"]["format"] == str(weight.format)
    assert layer["act"]["format"] == str(act.format) and layer["act"]["dynamic"]


def test_transforms_extras_static_timestep_ranges_and_shards(tmp_path):
    """Smoothing, rotation, LoRA extras and static timestep-wise activation ranges all survive."""
    torch.manual_seed(1)
    m = mlp()
    act = QuantSpec("uint8", "tensor", timestep_wise=True, timestep_buckets=4)
    quantize_model(m, QuantConfig(weight=QuantSpec("int4", "group", group_size=32), act=act))
    xs = [torch.randn(4, 64) for _ in range(3)]

    def run():
        for t, x in zip((100, 500, 900), xs):
            with at_timestep(t):
                m(x)

    m[0].set_smooth(torch.rand(64) + 0.5)
    m[2].set_rotation(torch.linalg.qr(torch.randn(96, 96))[0])
    calibrate_model(m, run)
    m[0].extras["lora"] = LoRA(64, 96)
    export_model(m, tmp_path, max_shard_bytes=8_000)
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert len(manifest["files"]) > 1
    r = load_packed(tmp_path, fake_quant=True, model=mlp())
    assert weights_exact(r, m, ["0", "2"])
    with torch.no_grad():
        for t, x in zip((100, 900), xs):
            with at_timestep(t):
                assert torch.equal(r(x), m(x))
    assert isinstance(r[0].extras["lora"], LoRABranch)
    with pytest.raises(RuntimeError, match="re-export"):
        r[0].set_smooth(None)


def test_kernel_layer_keeps_transform_and_extras(tmp_path):
    m = quantized_mlp(QuantSpec("int8", "channel"), DYN8)
    m[0].set_smooth(torch.rand(64) + 0.5)
    m[0].extras["lora"] = LoRA(64, 96)
    export_model(m, tmp_path)
    r = load_packed(tmp_path, backend="reference", model=mlp())
    assert isinstance(r[0], PackedKernelLinear) and isinstance(r[0].kernel, W8A8Linear)
    assert r[0].kernel.backend is Backend.REFERENCE
    assert weights_exact(r, m, ["0", "2"])
    x = torch.randn(3, 64)
    with torch.no_grad():
        torch.testing.assert_close(r(x), m(x), rtol=1e-3, atol=1e-3)


def test_auto_backend_and_parameterless_containers(tmp_path):
    """auto: kernel modules (reference path on CPU, one warning); a container that kernel layers would
    leave without parameters (diffusers probes `next(module.parameters())`) keeps fake-quant layers."""
    torch.manual_seed(0)

    def model():
        return nn.Sequential(nn.Sequential(nn.Linear(64, 64, bias=False)), nn.Linear(64, 32))

    m = model()
    quantize_model(m, QuantConfig.wxay(8, 8))
    export_model(m, tmp_path)
    r = load_packed(tmp_path, model=model())
    assert isinstance(r[0][0], PackedQuantLinear) and isinstance(r[1], W8A8Linear) and r[1].backend is Backend.AUTO
    assert isinstance(r[1].bias, nn.Parameter) and next(r[0].parameters(), None) is not None
    x = torch.randn(3, 64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # "using the slow pure-torch reference path"
        with torch.no_grad():
            torch.testing.assert_close(r(x), m(x), rtol=1e-3, atol=1e-3)


def test_export_stage_report(tmp_path):
    from workbench.session import Session
    from workbench.stages.export import ExportSettings, export_quantized

    session = Session.start(mlp())
    quantize_model(session.qtransformer, QuantConfig.wxay(4, 8))
    session.recipe = {"name": "w4a8", "recipe": {"quant": {"weight": "int4"}}}
    report = export_quantized(session, ExportSettings(out_dir=str(tmp_path / "out")))
    assert session.reports[-1] is report and session.state["export_dir"] == str(tmp_path / "out")
    assert report.summary["ratio_vs_fp32"] < 0.2 and len(report.table("layers")) == 2
    assert report.table("layers")[0]["kernel"] == "W4A8Linear"
    assert json.loads((tmp_path / "out" / "manifest.json").read_text())["recipe"]["name"] == "w4a8"
    report.to_dict()  # plain data


# ---- refusals and integrity --------------------------------------------------------------------------


def test_refuses_what_cannot_be_stored(tmp_path):
    with pytest.raises(ValueError, match="no quantized layers"):
        export_model(mlp(), tmp_path / "a")
    m = quantized_mlp(QuantSpec("int8", "channel"), QuantSpec("uint8", "tensor"))
    with pytest.raises(ValueError, match="calibrate"):
        export_model(m, tmp_path / "b")
    m = quantized_mlp(QuantSpec("int8", "channel"), DYN8)
    m[0].extras["plain"] = nn.Identity()
    with pytest.raises(ValueError, match="not a registered Compensation.*@register_compensation"):
        export_model(m, tmp_path / "c")


@pytest.fixture(scope="module")
def small_export(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("small")
    export_model(quantized_mlp(QuantSpec("int4", "group", group_size=32), DYN8), d)
    return d


def _copy(src: Path, dst: Path) -> Path:
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


def test_refuses_non_empty_dir_unless_force(small_export, tmp_path):
    d = _copy(small_export, tmp_path / "x")
    m = quantized_mlp(QuantSpec("int8", "channel"), DYN8)
    with pytest.raises(FileExistsError, match="--force"):
        export_model(m, d)
    export_model(m, d, force=True)
    assert isinstance(load_packed(d, backend="reference", model=mlp())[0], W8A8Linear)


def test_corrupt_byte_is_caught(small_export, tmp_path):
    d = _copy(small_export, tmp_path / "x")
    f = d / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0xFF
    f.write_bytes(bytes(data))
    with pytest.raises(PackedModelError, match="model.safetensors is corrupt or was modified.*re-export"):
        load_packed(d, model=mlp())


def test_truncated_file_is_caught(small_export, tmp_path):
    d = _copy(small_export, tmp_path / "x")
    f = d / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-100])
    with pytest.raises(PackedModelError, match=r"model.safetensors is truncated or corrupt \(\d+ bytes, manifest.json says \d+\).*re-export"):
        load_packed(d, model=mlp())
    # without the manifest check the safetensors reader itself refuses, with the same advice
    with pytest.raises(PackedModelError, match="corrupt or was modified.*re-export"):
        load_packed(d, model=mlp(), verify=False)


def test_manifest_problems(small_export, tmp_path):
    d = _copy(small_export, tmp_path / "x")
    path = d / "manifest.json"
    original = json.loads(path.read_text())

    def write(change, digest=True):
        """An edited manifest; with `digest` its digest is recomputed (a crafted file, not a careless edit)."""
        m = copy.deepcopy(original)
        change(m)
        if digest:
            write_manifest(path, m)
        else:
            path.write_text(json.dumps(m))

    write(lambda m: m["layers"]["0"]["weight"].__setitem__("format", "int2"), digest=False)
    with pytest.raises(PackedModelError, match=r"was modified after it was written \(changed: layers\).*re-export"):
        load_packed(d, model=mlp())
    write(lambda m: m.__setitem__("version", 1), digest=False)
    with pytest.raises(PackedModelError, match="version 1 .*workbench export RUN_DIR --out .* --force"):
        load_packed(d, model=mlp())
    write(lambda m: m["layers"]["0"].__setitem__("shape", [96, 32]))
    with pytest.raises(PackedModelError, match=r"layer 0: the manifest gives shape \[96, 32\].*has \[96, 64\]"):
        load_packed(d, model=mlp())
    write(lambda m: m.__setitem__("version", FORMAT_VERSION + 1))
    with pytest.raises(PackedModelError, match="upgrade workbench"):
        load_packed(d, model=mlp())
    write(lambda m: m.__setitem__("format", "something-else"))
    with pytest.raises(PackedModelError, match="not a workbench export"):
        load_packed(d, model=mlp())
    write(lambda m: m["layers"]["0"]["weight"].__setitem__("format", "int9"))
    with pytest.raises(PackedModelError, match="layer 0: unknown weight format 'int9'"):
        load_packed(d, model=mlp())
    write(lambda m: m["files"].append({"name": "gone.safetensors", "bytes": 1, "sha256": "0"}))
    with pytest.raises(PackedModelError, match="gone.safetensors .* missing"):
        load_packed(d, model=mlp())
    write(lambda m: None)
    write(lambda m: m["files"].append({"name": "../outside.bin", "bytes": 1, "sha256": "0"}))
    with pytest.raises(PackedModelError, match="outside its directory"):
        load_packed(d, model=mlp())
    write(lambda m: None)
    with pytest.raises(PackedModelError, match="not a diffusers model.*model="):
        load_packed(d)
    with pytest.raises(PackedModelError, match="has no manifest.json"):
        load_packed(tmp_path)


# ---- the bundled model -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def bundled():
    from workbench.models import load_bundled

    return load_bundled()


def _export_bundled(bundled, w_bits: int, out: Path, **config):
    q = copy.deepcopy(bundled.transformer)
    layers = quantize_model(q, QuantConfig.wxay(w_bits, 8, **config))
    export_model(q, out, recipe={"name": f"w{w_bits}a8"})
    return q, layers, json.loads((out / "manifest.json").read_text())


def test_bundled_w8a8_round_trip(bundled, tmp_path):
    """W8A8 with quantized attention too: kernels for every linear, attention quantizers rewrapped."""
    q, layers, manifest = _export_bundled(bundled, 8, tmp_path, attention_bits=8)
    assert {e["kernel"] for e in manifest["layers"].values()} == {"W8A8Linear"}
    assert manifest["model"]["class"] == "WanTransformer3DModel" and len(manifest["attention"]) == 12
    sizes = manifest["sizes"]
    assert sizes["ratio_vs_fp32"] <= 0.26 and sizes["ratio_vs_bf16"] <= 0.52
    r = load_packed(tmp_path, backend="reference")
    assert type(r).__name__ == "WanTransformer3DModel"
    assert type(r.blocks[0].attn1.processor).__name__ == "QuantAttnProcessor"
    # Wan's fused forward calls attn1 / attn2, whose QuantAttnProcessor still quantizes the attention: fused too
    assert r.fused_blocks == len(r.blocks) and all(_fused(b) for b in r.blocks)
    assert all(isinstance(r.get_submodule(n), W8A8Linear) and r.get_submodule(n).backend is Backend.REFERENCE
               for n in layers)
    assert weights_exact(r, q, layers)
    fake = load_packed(tmp_path, fake_quant=True, verify=False)
    assert fake.fused_blocks == 0
    g = torch.Generator().manual_seed(0)
    args = (torch.randn(1, bundled.transformer.config.in_channels, 8, 32, 32, generator=g), torch.tensor([500.0]),
            torch.randn(1, 8, 64, generator=g))
    with torch.no_grad():
        assert torch.equal(fake(*args, return_dict=False)[0], q(*args, return_dict=False)[0])
    # every fused block agrees with diffusers' forward under the same quantized attention (were the attention left
    # unquantized, a block would differ by the 8-bit attention's error, ~1e-2)
    plain = load_packed(tmp_path, backend="reference", fuse_blocks=False, verify=False)
    errs, _, calls = _fused_vs_plain(r, plain, "blocks", *args, return_dict=False)
    assert calls == 3 * len(r.blocks) and max(errs) < 1e-3, errs


def test_bundled_w4a8_bytes_and_videos(bundled, tmp_path):
    q, layers, manifest = _export_bundled(bundled, 4, tmp_path)
    sizes = manifest["sizes"]
    assert {e["kernel"] for e in manifest["layers"].values()} == {"W4A8Linear"}
    assert sizes["ratio_vs_bf16"] <= 0.3 and sizes["ratio_vs_fp32"] <= 0.15
    assert sizes["packed_weight_bytes"] <= 0.3 * sizes["bf16_weight_bytes"]
    assert sizes["file_bytes"] < 0.2 * sizes["fp_model_bytes"]
    ref = load_packed(tmp_path, backend="reference")
    fake = load_packed(tmp_path, fake_quant=True, verify=False)
    assert weights_exact(ref, q, layers) and weights_exact(fake, q, layers)
    assert ref.fused_blocks == len(ref.blocks) and fake.fused_blocks == 0  # the comparison below runs fused

    # the fake-quant reload computes exactly what the in-memory model computes: same videos
    videos = [bundled.generate(PROMPT, [3], GenerationSettings(steps=2), transformer=t) for t in (q, fake)]
    torch.testing.assert_close(videos[1], videos[0], rtol=0, atol=1e-6)
    # the kernels' reference rounds activations its own way (x * (127/absmax)) and sums in another order;
    # a 1-ulp difference flips a few codes and re-quantization spreads it (the in-memory model itself
    # moves as much when its matmuls merely accumulate in float64), so compare with the quantization error
    g = torch.Generator().manual_seed(0)
    args = (torch.randn(1, bundled.transformer.config.in_channels, 8, 32, 32, generator=g), torch.tensor([500.0]),
            torch.randn(1, 8, 64, generator=g))
    with torch.no_grad():
        want, got, full = (t(*args, return_dict=False)[0] for t in (q, ref, bundled.transformer))
    kernel_err, quant_err = (got - want).abs().mean(), (want - full).abs().mean()
    assert kernel_err < 0.2 * quant_err, (float(kernel_err), float(quant_err))


def test_bundled_attention_kernel_plan_round_trip(bundled, tmp_path):
    """Attention through the quantized attention kernel, per module (fp8 P.V, fp16 P.V for block 0's self-attention,
    block 1's cross-attention kept in full precision): the manifest records the plan, the loaded model runs it."""
    from workbench.kernels import ops
    from workbench.quant import AttentionSpec, quant_disabled

    q = copy.deepcopy(bundled.transformer)
    cfg = QuantConfig(attention=AttentionSpec.kernel_only("fp8", min_tokens=0), keep_fp=["blocks.1.attn2"],
                      attention_layers={"blocks.0.attn1": AttentionSpec.kernel_only("fp16", min_tokens=0)})
    quantize_model(q, cfg)
    export_model(q, tmp_path, recipe={"name": "w8a8-attention-kernel"})
    att = json.loads((tmp_path / "manifest.json").read_text())["attention"]
    assert att["blocks.0.attn1"]["spec"]["kernel"] == "fp16" and att["blocks.0.attn2"]["spec"]["kernel"] == "fp8"
    assert "blocks.1.attn2" not in att and len(att) == 11
    r = load_packed(tmp_path, backend="reference")
    assert r.get_submodule("blocks.0.attn1").quant_attention.spec == AttentionSpec.kernel_only("fp16", 0)
    g = torch.Generator().manual_seed(0)
    args = (torch.randn(1, bundled.transformer.config.in_channels, 8, 32, 32, generator=g), torch.tensor([500.0]),
            torch.randn(1, 8, 64, generator=g))
    fake = load_packed(tmp_path, fake_quant=True, verify=False)
    with torch.no_grad():
        calls = ops.CALLS["quant_attention"]
        r(*args, return_dict=False)
        assert ops.CALLS["quant_attention"] - calls == 11
        out = fake(*args, return_dict=False)[0]
        assert torch.equal(out, q(*args, return_dict=False)[0])
        with quant_disabled(fake):
            fake(*args, return_dict=False)
        assert ops.CALLS["quant_attention"] - calls == 33   # r, fake and q once each; none switched off
        ref = bundled.transformer(*args, return_dict=False)[0]
        assert 0 < float((out - ref).norm() / ref.norm()) < 0.2


# ---- fused block forwards (kernels/fused_blocks.py) on load -----------------------------------------


def _fused(block: nn.Module) -> bool:
    return "forward" in block.__dict__ or hasattr(block, fused_blocks.FUSED_ATTR)


def _fused_vs_plain(fused: nn.Module, plain: nn.Module, blocks: str, *args, **kwargs) -> tuple[list[float], float, int]:
    """(each fused block's rel. error vs the plain one on the plain model's input to that block, the whole
    model's rel. error, `residual_norm_quant` calls of the fused forward)."""
    inputs: list = []
    hooks = [b.register_forward_pre_hook(lambda m, a, k: inputs.append((a, k)), with_kwargs=True)
             for b in getattr(plain, blocks)]
    with torch.no_grad():
        start = ops.CALLS["residual_norm_quant"]
        out = fused(*args, **kwargs)[0]
        calls = ops.CALLS["residual_norm_quant"] - start
        want = plain(*args, **kwargs)[0]
        for h in hooks:
            h.remove()
        errs = []
        for f, p, (a, k) in zip(getattr(fused, blocks), getattr(plain, blocks), inputs):
            fo, po = f(*a, **k), p(*a, **k)
            fo, po = (fo[0], po[0]) if isinstance(fo, tuple) else (fo, po)
            errs.append(rel_error(fo, po))
    return errs, rel_error(out, want), calls


def test_bundled_load_fuses_block_norms(bundled, tmp_path):
    """W8A8 without quantized attention: every Wan block gets the fused residual + LayerNorm + AdaLN +
    quantization forward (three `residual_norm_quant` calls a block); fuse_blocks=False and fake_quant keep
    diffusers' forward.

    Not bit-identical in fp32: the reference producer computes LayerNorm as mean / rsqrt in fp32 and applies
    norm2's affine after it, diffusers' F.layer_norm in one kernel, so per-token scales differ in the last ulp
    (a block's output by ~1e-7) and now and then an int8 code sitting on a rounding boundary flips (~5e-4 of
    that block's output). Through six blocks of re-quantization the flips compound to ~0.8% of the output,
    as much as the kernels already differ from the in-memory fake-quant model. (bf16 Wan: usually bit-identical,
    tests/kernels/test_fused_blocks.py.)"""
    _export_bundled(bundled, 8, tmp_path)
    fused = load_packed(tmp_path, backend="reference")
    plain = load_packed(tmp_path, backend="reference", fuse_blocks=False, verify=False)
    n = len(fused.blocks)
    assert fused.fused_blocks == n == 6
    assert all(b.forward.__func__ is fused_blocks._wan_forward and getattr(b, fused_blocks.FUSED_ATTR) is False
               for b in fused.blocks)  # int8 codes
    assert plain.fused_blocks == 0 and not any(_fused(b) for b in plain.blocks)
    assert all(b.forward.__func__ is type(b).forward for b in plain.blocks)
    assert load_packed(tmp_path, fake_quant=True, verify=False).fused_blocks == 0

    g = torch.Generator().manual_seed(0)
    args = (torch.randn(1, bundled.transformer.config.in_channels, 8, 32, 32, generator=g), torch.tensor([500.0]),
            torch.randn(1, 8, 64, generator=g))
    errs, model_err, calls = _fused_vs_plain(fused, plain, "blocks", *args, return_dict=False)
    assert calls == 3 * n
    assert max(errs) < 1e-3 and sorted(errs)[n // 2] < 1e-6, errs  # ulp-level but for a flipped code
    assert model_err < 0.02, model_err


def test_cogvideox_load_fuses_block_norms(tmp_path):
    """A tiny CogVideoX (the bench's dry-run case, fp32) exported W8A8 reloads with fused blocks (two
    `residual_norm_quant` calls a block) that agree with diffusers' forward to fp32 rounding (see above)."""
    from workbench.bench import e2e

    case = next(c for c in e2e.cases(dry=True) if c.cls == "CogVideoXTransformer3DModel")
    q = e2e.build(case, torch.device("cpu"), torch.float32)
    quantize_model(q, QuantConfig.wxay(8, 8))
    export_model(q, tmp_path)
    fused = load_packed(tmp_path, backend="reference")
    plain = load_packed(tmp_path, backend="reference", fuse_blocks=False, verify=False)
    n = case.config["num_layers"]
    assert fused.fused_blocks == n and plain.fused_blocks == 0
    assert all(_fused(b) for b in fused.transformer_blocks) and not any(_fused(b) for b in plain.transformer_blocks)
    errs, model_err, calls = _fused_vs_plain(fused, plain, "transformer_blocks",
                                             **e2e.inputs(case, torch.device("cpu"), torch.float32))
    assert calls == 2 * n
    assert max(errs) < 1e-3 and model_err < 1e-3, (errs, model_err)
    # with quantized attention the blocks keep diffusers' forward: CogVideoX's fused forward inlines the attention
    # and would bypass the QuantAttnProcessor
    q = e2e.build(case, torch.device("cpu"), torch.float32)
    quantize_model(q, QuantConfig.wxay(8, 8, attention_bits=8))
    export_model(q, tmp_path / "qattn")
    r = load_packed(tmp_path / "qattn", backend="reference")
    assert type(r.transformer_blocks[0].attn1.processor).__name__ == "QuantAttnProcessor"
    assert r.fused_blocks == 0 and not any(_fused(b) for b in r.transformer_blocks)
