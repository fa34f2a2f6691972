"""Packed low-bit models on disk (the `workbench-packed` format) and `load_packed`, their loader.

    from workbench.io.packed import load_packed
    transformer = load_packed("out/vidit-w4a8", device="cuda")      # kernels where formats allow
    videos = model.generate_many(prompts, seeds, transformer=transformer)

An export directory (written by `workbench.io.export.export_model`) holds safetensors file(s) and
`manifest.json`. For each quantized linear layer it stores the *codes* the fake-quant model computes
with, not weights quantized again, so a reloaded layer applies bit for bit the weight that
`QuantLinear.dequantized_weight()` describes:

    <layer>.weight_codes   int8 / uint8 codes; 4-bit codes two per byte (low nibble first, the kernels'
                           layout); 2, 3, 5, 6, 7-bit codes as a bit stream; fp8 codes as float8 bytes
    <layer>.weight_scale   fp32: one per tensor (1,), per output channel (out,) or per group (out, in/g)
    <layer>.weight_zero    uint8 zero points, same shape (asymmetric formats only)
    <layer>.weight         the full-precision weight, for layers whose weights are not quantized
    <layer>.bias           as is
    <layer>.smooth, <layer>.rotation   the input transform x' = (x / s) R the codes live in
    <layer>.input_quantizer.*          static activation ranges (per timestep bucket if timestep-wise)
    <layer>.extras.<k>.*               output corrections (LoRA ...) in their own dtype
Everything else (norms, embeddings, layers kept in full precision, attention quantizer ranges) is the
model's own state dict, stored as is.

`load_packed` rebuilds the diffusers transformer from the stored config and puts a runnable module in
each quantized layer: a kernel module of `workbench.kernels` where the layer's formats match a kernel
exactly (`kernel_for`, running on the `workbench.kernels.Backend` asked for), else a fake-quant
`PackedQuantLinear` computing from the same codes, so every recipe reloads and runs. Wan / CogVideoX blocks whose
linears all became kernel linears of one code format get the fused residual + LayerNorm + AdaLN + quantization
forward (`workbench.kernels.fused_blocks`; fuse_blocks=False keeps diffusers' own). Extras are rebuilt only
from the allow-list of `workbench.quant.compensation`: nothing named in the manifest is imported.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from workbench.io.manifest import ManifestError, check_digest, read_json_manifest, safe_name
from workbench.io.manifest import verify_files as check_files
from workbench.kernels import Backend, FP8Linear, W4A8Linear, W8A8Linear, reference as kref
from workbench.kernels.fused_blocks import fuse_block_norms
from workbench.quant import QuantFormat, QuantLinear, QuantSpec, attention_from_dict, install_timestep_hook, spec_from_dict
from workbench.quant.compensation import UnknownClassError, build_compensation
from workbench.quant.attention import wrap_attention
from workbench.quant.formats import code_dtype, dequantize, qrange
from workbench.quant.quantizer import Quantizer

FORMAT_NAME = "workbench-packed"
FORMAT_VERSION = 2
REEXPORT = "re-export it (workbench export RUN_DIR --out DIR)"
MANIFEST_NAME = "manifest.json"
KERNEL_GROUP_SIZES = (256, 128, 64, 32)  # group sizes the W4A8 Triton kernel runs, largest first
# ... and, for one range per channel (or tensor), its unpack + int8 GEMM path (K a multiple of 16, as the GEMM needs)
W4A8_PER_CHANNEL_MULTIPLE = 16


class PackedModelError(ValueError):
    """An export directory that cannot be loaded; the message names the file or layer and the fix."""


# ---------------------------------------------------------------------------------------------------
# codes <-> bytes


def storage_for(fmt: QuantFormat, in_features: int) -> str:
    """How codes of `fmt` are laid out on disk.

    "int8" / "uint8": one code per byte. "int4x2" / "uint4x2": two 4-bit codes per byte, low nibble
    first (the W4A8 kernel's layout; needs an even in_features). "bits<b>": the codes minus the
    smallest code, b bits each, as one little-endian bit stream over the row-major (out, in) matrix.
    "fp8_e4m3" / "fp8_e5m2": float8 bytes.
    """
    if fmt.is_fp8:
        return fmt.kind
    if fmt.bits == 8:
        return "int8" if fmt.symmetric else "uint8"
    if fmt.bits == 4 and in_features % 2 == 0:
        return "int4x2" if fmt.symmetric else "uint4x2"
    return f"bits{fmt.bits}"


def pack_codes(codes: torch.Tensor, fmt: QuantFormat) -> tuple[torch.Tensor, str]:
    """(stored tensor, storage name) for codes (out, in) of `fmt` (see `storage_for`)."""
    storage = storage_for(fmt, codes.shape[-1])
    if storage in ("int8", "uint8") or storage.startswith("fp8"):
        return codes.contiguous(), storage
    if storage == "int4x2":
        return kref.pack_int4(codes), storage
    if storage == "uint4x2":
        u = codes.to(torch.uint8)
        return u[..., 0::2] | (u[..., 1::2] << 4), storage
    return _pack_bits(codes, fmt), storage


def unpack_codes(stored: torch.Tensor, storage: str, fmt: QuantFormat, shape: tuple[int, int]) -> torch.Tensor:
    """Inverse of `pack_codes`: codes of shape (out, in) in `code_dtype(fmt)`.

    A stored tensor of the wrong size or dtype raises PackedModelError (the caller adds the layer name).
    """
    out, inp = shape
    expected = expected_storage(storage, fmt, shape)
    if tuple(stored.shape) != expected[0] or stored.dtype != expected[1]:
        raise PackedModelError(
            f"stored codes are {stored.dtype} {list(stored.shape)} but {storage} codes of a {list(shape)} "
            f"weight are {expected[1]} {list(expected[0])}"
        )
    if storage in ("int8", "uint8") or storage.startswith("fp8"):
        return stored
    if storage == "int4x2":
        return kref.unpack_int4(stored)
    if storage == "uint4x2":
        return torch.stack([stored & 0xF, stored >> 4], dim=-1).reshape(out, inp)
    return _unpack_bits(stored, fmt, out * inp).reshape(out, inp)


def expected_storage(storage: str, fmt: QuantFormat, shape: tuple[int, int]) -> tuple[tuple[int, ...], torch.dtype]:
    """Shape and dtype of the stored codes of a weight of `shape` (raises on an unknown storage name)."""
    out, inp = shape
    if storage != storage_for(fmt, inp):
        raise PackedModelError(f"storage {storage!r} does not fit format {fmt} with {inp} input features")
    if storage in ("int8", "uint8") or storage.startswith("fp8"):
        return (out, inp), code_dtype(fmt)
    if storage in ("int4x2", "uint4x2"):
        return (out, inp // 2), torch.uint8
    return (-(-out * inp * fmt.bits // 8),), torch.uint8


def _pack_bits(codes: torch.Tensor, fmt: QuantFormat) -> torch.Tensor:
    bits = fmt.bits
    u = (codes.to(torch.int16) - int(qrange(fmt)[0])).reshape(-1)
    stream = ((u[:, None] >> torch.arange(bits, dtype=torch.int16)) & 1).to(torch.uint8).reshape(-1)
    stream = F.pad(stream, (0, -stream.numel() % 8))
    return (stream.reshape(-1, 8).to(torch.int16) << torch.arange(8, dtype=torch.int16)).sum(1).to(torch.uint8)


def _unpack_bits(stored: torch.Tensor, fmt: QuantFormat, n: int) -> torch.Tensor:
    bits = fmt.bits
    stream = ((stored.to(torch.int16)[:, None] >> torch.arange(8, dtype=torch.int16)) & 1).reshape(-1)
    u = (stream[: n * bits].reshape(n, bits) << torch.arange(bits, dtype=torch.int16)).sum(1)
    return (u + int(qrange(fmt)[0])).to(code_dtype(fmt))


# ---------------------------------------------------------------------------------------------------
# one layer's quantized weight


@dataclass
class PackedWeight:
    """A quantized weight as codes plus ranges, in the basis the codes were made in (W' = (W * s) R).

    codes: (out, in) in `code_dtype(format)`; scale, zero: fp32, broadcastable against the codes as the
    weight quantizer sees them (grouped (out, in/g, g) for "group", else (out, in)).
    """

    codes: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor
    format: QuantFormat
    granularity: str
    group_size: int | None

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.codes.shape)  # type: ignore[return-value]

    @property
    def groups(self) -> int:
        """Ranges per output channel (1 unless granularity is "group")."""
        return self.shape[1] // self.group_size if self.granularity == "group" else 1

    def grouped(self, t: torch.Tensor) -> torch.Tensor:
        return t.unflatten(-1, (-1, self.group_size)) if self.granularity == "group" else t

    def dequantize(self, dtype: torch.dtype) -> torch.Tensor:
        """fq(W') exactly as the weight quantizer computed it: (codes - zero) * scale, cast to dtype."""
        return dequantize(self.grouped(self.codes), self.scale, self.zero, self.format, dtype).reshape(self.shape)

    @staticmethod
    def range_shape(granularity: str, shape: tuple[int, int], group_size: int | None) -> tuple[int, ...]:
        """Broadcast shape of scale / zero for a weight of `shape` (what the weight quantizer produces)."""
        out, inp = shape
        if granularity == "tensor":
            return ()
        if granularity == "group":
            return (out, inp // int(group_size or 1), 1)
        return (out, 1)  # "channel", and "token" (one range per row of a 2-d weight)

    def group_scales(self, group: int) -> torch.Tensor:
        """Scales as (out, in / group) for a group size that divides this weight's range size."""
        out, inp = self.shape
        per_range = inp // self.groups
        s = self.scale.reshape(-1, 1).expand(out, self.groups) if self.scale.dim() == 0 else \
            self.scale.reshape(out, self.groups)
        return s.repeat_interleave(per_range // group, dim=1).contiguous()


@dataclass(frozen=True)
class KernelChoice:
    """Which kernel module computes a layer exactly: its class name, the W4A8 group size, and whether the
    activations are asymmetric (uint8 with a zero point per token: the W8A8 kernel's zero-point epilogue)."""

    name: str
    group: int | None = None
    asym_act: bool = False


INT8_SYM = QuantFormat("int", 8, True)
UINT8_ASYM = QuantFormat("int", 8, False)


def kernel_for(
    weight_format: QuantFormat | None,
    granularity: str | None,
    group_size: int | None,
    in_features: int,
    act: QuantSpec | None,
) -> KernelChoice | None:
    """The kernel that computes exactly this layer's quantization, or None.

    The kernels quantize activations per token, dynamically, min-max, so the layer's activation spec must be
    exactly that: symmetric int8 (all kernels) or asymmetric uint8 (the W8A8 kernel, whose epilogue removes
    the zero point: x W^T = s (q - z) W^T = s (q W^T - z sum_k W)). Weights must be symmetric with one range
    per tensor, channel or (W4A8) group of a size the kernel runs:
      W4A8Linear: int2..int4 weights (their codes fit int4 exactly) x symmetric int8 activations; one range per
                  channel / tensor runs its per-channel path (group = in_features: unpacked to int8, the int8 GEMM);
      W8A8Linear: int2..int8 weights per tensor / channel x int8 or uint8 activations (where W4A8 does not);
      FP8Linear:  fp8_e4m3 weights per tensor / channel x fp8_e4m3 activations.
    Anything else (asymmetric weights, static or 6-bit activations, fp8_e5m2, weight-only ...) has no kernel.
    """
    if weight_format is None or act is None:
        return None
    if not (act.dynamic and act.granularity == "token" and act.observer == "minmax"):
        return None
    if weight_format.is_fp8:
        if (weight_format.kind == "fp8_e4m3" and act.format.kind == "fp8_e4m3"
                and granularity in ("tensor", "channel", "token")):
            return KernelChoice("FP8Linear")
        return None
    if not weight_format.symmetric or act.format not in (INT8_SYM, UINT8_ASYM):
        return None
    asym = act.format == UINT8_ASYM
    if weight_format.bits <= 4 and not asym:
        if granularity != "group" and in_features % W4A8_PER_CHANNEL_MULTIPLE == 0:
            return KernelChoice("W4A8Linear", in_features)  # one scale per channel: unpack + the int8 GEMM
        per_range = group_size if granularity == "group" else in_features
        group = next((g for g in KERNEL_GROUP_SIZES if per_range and per_range % g == 0), None)
        if group is not None and in_features % 2 == 0:
            return KernelChoice("W4A8Linear", group)
    if granularity in ("tensor", "channel", "token"):
        return KernelChoice("W8A8Linear", asym_act=asym)
    return None


# ---------------------------------------------------------------------------------------------------
# runnable modules


KERNEL_CLASSES: dict[str, type[nn.Module]] = {"W8A8Linear": W8A8Linear, "FP8Linear": FP8Linear, "W4A8Linear": W4A8Linear}


def kernel_module(choice: KernelChoice, pw: PackedWeight, bias: torch.Tensor | None, dtype: torch.dtype,
                  backend: Backend | str = Backend.AUTO) -> nn.Module:
    """The kernel module `choice` names, holding exactly the codes and scales of `pw` (no re-quantization)."""
    cls = KERNEL_CLASSES[choice.name]
    out, inp = pw.shape
    if choice.name == "W4A8Linear":
        mod = cls(inp, out, bias is not None, group_size=int(choice.group), out_dtype=dtype, backend=backend)
        mod.weight_packed = kref.pack_int4(pw.codes.to(torch.int8))
        mod.weight_scales = pw.group_scales(int(choice.group))
    else:
        scale = pw.scale.float().reshape(-1).expand(out).contiguous() if pw.scale.numel() == 1 else pw.scale.reshape(out)
        if choice.name == "W8A8Linear":
            mod = cls(inp, out, bias is not None, out_dtype=dtype, backend=backend, asym_act=choice.asym_act)
            mod.set_weight(pw.codes.to(torch.int8), scale)
        else:
            mod = cls(inp, out, bias is not None, out_dtype=dtype, backend=backend)
            mod.weight_fp8 = pw.codes.contiguous()
            mod.weight_scale = scale.float().contiguous()
    mod.set_bias(bias)
    return mod


def kernel_weight(kernel: nn.Module) -> torch.Tensor:
    """The fp32 weight (out, in) a kernel module multiplies with: codes * scales."""
    if isinstance(kernel, W4A8Linear):
        codes = kref.unpack_int4(kernel.weight_packed).float()
        ng = kernel.weight_scales.shape[1]
        return (codes.unflatten(-1, (ng, -1)) * kernel.weight_scales.float()[..., None]).reshape(codes.shape)
    codes = kernel.weight_q if isinstance(kernel, W8A8Linear) else kernel.weight_fp8
    return codes.float() * kernel.weight_scale.float()[:, None]


class PackedKernelLinear(nn.Module):
    """A kernel linear with the layer's input transform x' = (x / s) R before it and its extras after it,
    for layers whose codes were made after channel balancing / rotation or that carry corrections."""

    def __init__(self, kernel: nn.Module, smooth: torch.Tensor | None = None, rotation: torch.Tensor | None = None,
                 extras: dict[str, nn.Module] | None = None) -> None:
        super().__init__()
        self.kernel = kernel
        self.in_features, self.out_features = kernel.in_features, kernel.out_features
        self.register_buffer("smooth", smooth)
        self.register_buffer("rotation", rotation)
        self.extras = nn.ModuleDict(extras or {})

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xt = x
        if self.smooth is not None:
            xt = xt / self.smooth.to(xt.dtype)
        if self.rotation is not None:
            xt = xt @ self.rotation.to(xt.dtype)
        y = self.kernel(xt)
        if len(self.extras):
            y_q = y
            for extra in self.extras.values():
                y = y + extra(x, y_q)
        return y


class PackedQuantLinear(QuantLinear):
    """A fake-quant QuantLinear whose quantized weight comes from stored codes, not from a weight.

    `weight` holds the dequantized weight in the input's basis (what the layer effectively applies), so
    everything that reads a QuantLinear keeps working; the codes are fixed: re-specifying the layer or
    changing its smoothing / rotation is refused (quantize the FP model again and re-export instead).
    """

    def __init__(self, packed: PackedWeight, weight_spec: QuantSpec, act_spec: QuantSpec | None,
                 bias: torch.Tensor | None, dtype: torch.dtype, smooth: torch.Tensor | None = None,
                 rotation: torch.Tensor | None = None) -> None:
        applied = _input_basis(packed.dequantize(dtype), smooth, rotation, dtype)
        super().__init__(nn.Parameter(applied, requires_grad=False),
                         None if bias is None else nn.Parameter(bias, requires_grad=False), None, act_spec)
        self.register_buffer("weight_codes", packed.codes)
        self.register_buffer("weight_scale", packed.scale.float())
        self.register_buffer("weight_zero", packed.zero.float())
        self.smooth, self.rotation = smooth, rotation
        self.packed_format, self.packed_granularity, self.packed_group_size = (
            packed.format, packed.granularity, packed.group_size)
        self.weight_quantizer = wq = Quantizer(weight_spec, is_weight=True)
        wq._set(packed.scale, packed.zero)
        self._frozen = True

    def packed(self) -> PackedWeight:
        return PackedWeight(self.weight_codes, self.weight_scale, self.weight_zero, self.packed_format,
                            self.packed_granularity, self.packed_group_size)

    def _compute_weight(self) -> torch.Tensor:
        wq = self.weight_quantizer
        if wq is None or wq.mode == "off":
            return self.effective_weight()
        return self.packed().dequantize(self.weight.dtype)

    def recalibrate_weight(self) -> None:
        """No-op: the weight range is fixed by the stored codes."""

    def set_specs(self, weight_spec: QuantSpec | None, act_spec: QuantSpec | None) -> None:
        if getattr(self, "_frozen", False):
            raise RuntimeError(
                "a packed layer's weight codes are fixed and cannot be re-specified: quantize the "
                "full-precision model again and re-export"
            )
        super().set_specs(weight_spec, act_spec)

    def _after_transform_change(self) -> None:
        raise RuntimeError(
            "a packed layer's codes were made with its stored smoothing / rotation, which cannot change: "
            "quantize the full-precision model again and re-export"
        )


def _input_basis(fq: torch.Tensor, smooth: torch.Tensor | None, rotation: torch.Tensor | None,
                 dtype: torch.dtype) -> torch.Tensor:
    """fq(W') R^T / s in `dtype`, computed exactly as QuantLinear.dequantized_weight() does."""
    w = fq.to(dtype).float()
    if rotation is not None:
        w = w @ rotation.T
    if smooth is not None:
        w = w / smooth
    return w.to(dtype)


def applied_weight(module: nn.Module) -> torch.Tensor:
    """The weight (out, in) a reloaded layer applies to its original input (QuantLinear, kernel module or
    PackedKernelLinear); equal, bit for bit, to the exported layer's `dequantized_weight()`."""
    if isinstance(module, QuantLinear):
        return module.dequantized_weight()
    smooth = rotation = None
    kernel = module
    if isinstance(module, PackedKernelLinear):
        kernel, smooth, rotation = module.kernel, module.smooth, module.rotation
    if not isinstance(kernel, (W8A8Linear, FP8Linear, W4A8Linear)):
        raise TypeError(f"{type(module).__name__} is not a packed layer")
    return _input_basis(kernel_weight(kernel), smooth, rotation, kernel.out_dtype)


# ---------------------------------------------------------------------------------------------------
# manifest and files


def _corrupt(name: str, why: str) -> PackedModelError:
    return PackedModelError(f"file {name} is corrupt or was modified ({why}): re-export")


def read_manifest(directory: str | Path, verify: bool = False) -> dict[str, Any]:
    """The validated manifest of an export directory: format, version, digest (an edit anywhere is an error
    naming the field), required fields and file names inside the directory; `verify` also checks every
    listed file's size and sha256."""
    d = Path(directory)
    path = d / MANIFEST_NAME
    if not path.is_file():
        what = "does not exist" if not d.exists() else f"has no {MANIFEST_NAME}"
        raise PackedModelError(f"{d} {what}: not a {FORMAT_NAME} export (write one with export_model)")
    try:
        manifest = read_json_manifest(path)
    except ManifestError as e:
        raise PackedModelError(f"{e}: {REEXPORT}") from None
    if manifest.get("format") != FORMAT_NAME:
        raise PackedModelError(f"{path} has format {manifest.get('format')!r}, not {FORMAT_NAME!r}: not a workbench export")
    version = manifest.get("version")
    if not isinstance(version, int) or version < 1:
        raise PackedModelError(f"{path} has an unknown version {version!r}: re-export with this workbench")
    if version > FORMAT_VERSION:
        raise PackedModelError(
            f"{path} is {FORMAT_NAME} version {version}, but this workbench reads up to version "
            f"{FORMAT_VERSION}: upgrade workbench or re-export with this one")
    if version < FORMAT_VERSION:
        raise PackedModelError(
            f"{path} is {FORMAT_NAME} version {version} (workbench 0.1: no digest, extras named by import path); "
            f"this workbench reads version {FORMAT_VERSION}: re-export it with `workbench export RUN_DIR --out {d} --force`")
    try:
        check_digest(manifest, path, REEXPORT)
    except ManifestError as e:
        raise PackedModelError(str(e)) from None
    for key in ("model", "layers", "files"):
        if key not in manifest:
            raise PackedModelError(f"{path} lacks {key!r}: the export is incomplete or was modified: re-export")
    if not isinstance(manifest["files"], list) or not all(isinstance(f, dict) for f in manifest["files"]):
        raise PackedModelError(f"{path}: 'files' must be a list of {{name, bytes, sha256}}: re-export")
    try:
        for f in manifest["files"]:
            safe_name(f.get("name"), path, REEXPORT)
    except ManifestError as e:
        raise PackedModelError(str(e)) from None
    if verify:
        verify_files(d, manifest)
    return manifest


def verify_files(directory: str | Path, manifest: dict[str, Any]) -> None:
    """Every file the manifest lists is inside the directory with its recorded byte size and sha256."""
    try:
        check_files(Path(directory), {f["name"]: f for f in manifest["files"]}, MANIFEST_NAME, REEXPORT)
    except ManifestError as e:
        raise PackedModelError(str(e)) from None


def read_tensors(directory: str | Path, manifest: dict[str, Any]) -> dict[str, torch.Tensor]:
    """All tensors of the export's safetensors files, by name."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    tensors: dict[str, torch.Tensor] = {}
    for f in manifest["files"]:
        try:
            part = load_file(str(Path(directory) / f["name"]))
        except (SafetensorError, OSError, ValueError) as e:
            raise _corrupt(f["name"], f"unreadable safetensors: {e}") from None
        dup = set(part) & set(tensors)
        if dup:
            raise _corrupt(f["name"], f"tensor {sorted(dup)[0]!r} appears in two files")
        # fresh (aligned) copies: tensors backed by the file's buffer can sit at unaligned addresses, which
        # makes CPU kernels round differently from the in-memory model (assign=True keeps what we pass)
        tensors.update({k: v.clone() for k, v in part.items()})
    return tensors


def dtype_from_name(name: str) -> torch.dtype:
    dtype = getattr(torch, str(name), None)
    if not isinstance(dtype, torch.dtype):
        raise PackedModelError(f"unknown dtype {name!r} in {MANIFEST_NAME}: re-export")
    return dtype


# ---------------------------------------------------------------------------------------------------
# loading


def build_model(manifest: dict[str, Any], model: nn.Module | None = None) -> nn.Module:
    """The model skeleton: `model` when given, else the diffusers class rebuilt from the stored config."""
    info = manifest["model"]
    if model is not None:
        if type(model).__name__ != info.get("class"):
            raise PackedModelError(
                f"the export holds a {info.get('class')}, but model= is a {type(model).__name__}: pass a "
                f"{info.get('class')} with the exported architecture"
            )
        return model
    if info.get("library") != "diffusers" or info.get("config") is None:
        raise PackedModelError(
            f"the exported model ({info.get('class')}) is not a diffusers model, so it cannot be rebuilt from "
            f"a config: pass model=<a {info.get('class')} with the exported architecture> to load_packed"
        )
    import diffusers

    from workbench.models.adapters import SUPPORTED_CLASSES

    cls = getattr(diffusers, str(info["class"]), None) if info.get("class") in SUPPORTED_CLASSES else None
    if cls is None:
        raise PackedModelError(
            f"the export holds a {str(info.get('class'))[:80]!r}, not one of the transformer classes this workbench "
            f"rebuilds ({', '.join(SUPPORTED_CLASSES)}; diffusers {diffusers.__version__}, the export was written "
            f"with {info.get('diffusers_version')}): re-export, or pass model=<the transformer> to load_packed"
        )
    try:
        return cls.from_config(info["config"])
    except Exception as e:  # noqa: BLE001 - re-raised with the class and the fix named
        raise PackedModelError(
            f"could not build {info['class']} from the stored config ({type(e).__name__}: {e}); the manifest "
            "may have been modified, or diffusers differs from the one the export was written with"
        ) from e


def _take(tensors: dict[str, torch.Tensor], used: set[str], key: str, layer: str, required: bool = True) -> Any:
    if key not in tensors:
        if required:
            raise PackedModelError(f"layer {layer}: tensor {key!r} is missing from the export files: re-export")
        return None
    used.add(key)
    return tensors[key]


def _packed_weight(name: str, entry: dict[str, Any], tensors: dict[str, torch.Tensor], used: set[str]) -> PackedWeight:
    w = entry["weight"]
    shape = tuple(entry["shape"])
    try:
        fmt = QuantFormat.parse(w["format"])
    except ValueError as e:
        raise PackedModelError(f"layer {name}: unknown weight format {w.get('format')!r} ({e}): re-export") from None
    gran, group = w["granularity"], w.get("group_size")
    if gran not in ("tensor", "channel", "token", "group") or (gran == "group" and (not group or shape[1] % group)):
        raise PackedModelError(f"layer {name}: unusable weight granularity {gran!r} (group size {group}): re-export")
    try:
        codes = unpack_codes(_take(tensors, used, f"{name}.weight_codes", name), w["storage"], fmt, shape)
    except PackedModelError as e:
        raise PackedModelError(f"layer {name}: {e}: re-export") from None
    rshape = PackedWeight.range_shape(gran, shape, group)
    scale = _take(tensors, used, f"{name}.weight_scale", name).float()
    zero = _take(tensors, used, f"{name}.weight_zero", name, required=not fmt.symmetric)
    numel = int(torch.Size(rshape).numel())
    for what, t in (("weight_scale", scale), ("weight_zero", zero)):
        if t is not None and t.numel() != numel:
            raise PackedModelError(f"layer {name}: {what} has {t.numel()} values, expected {numel}: re-export")
    scale = scale.reshape(rshape)
    zero = torch.zeros_like(scale) if zero is None else zero.float().reshape(rshape)
    return PackedWeight(codes, scale, zero, fmt, gran, group if gran == "group" else None)


def _extras(name: str, entry: dict[str, Any], tensors: dict[str, torch.Tensor], used: set[str]) -> dict[str, nn.Module]:
    out = {}
    for key, spec in (entry.get("extras") or {}).items():
        try:
            module = build_compensation(name, key, spec)
        except UnknownClassError as e:
            raise PackedModelError(str(e)) from None
        prefix = f"{name}.extras.{key}."
        state = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
        used.update(prefix + k for k in state)
        try:
            module.load_state_dict(state, strict=True, assign=True)
        except RuntimeError as e:
            raise PackedModelError(
                f"layer {name}: extra {key!r} does not match its stored tensors ({e}): re-export") from None
        out[key] = module
    return out


def build_layer(name: str, entry: dict[str, Any], tensors: dict[str, torch.Tensor], used: set[str],
                backend: Backend | str = Backend.AUTO, fake_quant: bool = False) -> nn.Module:
    """The runnable module of one manifest layer (kernel module, PackedKernelLinear or a QuantLinear)."""
    dtype = dtype_from_name(entry["dtype"])
    bias = _take(tensors, used, f"{name}.bias", name, required=bool(entry.get("bias")))
    smooth = _take(tensors, used, f"{name}.smooth", name, required=bool(entry.get("smooth")))
    rotation = _take(tensors, used, f"{name}.rotation", name, required=bool(entry.get("rotation")))
    act = entry.get("act")
    try:
        act_spec = None if act is None else spec_from_dict(act["spec"], where=f"layer {name} act")
        weight = entry.get("weight")
        weight_spec = None if weight is None else spec_from_dict(weight["spec"], where=f"layer {name} weight")
    except ValueError as e:
        raise PackedModelError(f"{e}: re-export") from None
    extras = _extras(name, entry, tensors, used)

    if weight_spec is None:
        fp_weight = _take(tensors, used, f"{name}.weight", name)
        module: nn.Module = QuantLinear(nn.Parameter(fp_weight, requires_grad=False),
                                        None if bias is None else nn.Parameter(bias, requires_grad=False), None, act_spec)
        module.smooth, module.rotation = smooth, rotation
    else:
        pw = _packed_weight(name, entry, tensors, used)
        kernel = None if fake_quant else kernel_for(pw.format, pw.granularity, pw.group_size, pw.shape[1], act_spec)
        if kernel is not None:
            module = kernel_module(kernel, pw, bias, dtype, backend)
            if smooth is not None or rotation is not None or extras:
                module = PackedKernelLinear(module, smooth, rotation, extras)
            return module
        module = PackedQuantLinear(pw, weight_spec, act_spec, bias, dtype, smooth, rotation)
    for key, extra in extras.items():
        module.extras[key] = extra
    iq = module.input_quantizer
    if iq is not None and not act_spec.dynamic:
        prefix = f"{name}.input_quantizer."
        state = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
        used.update(prefix + k for k in state)
        try:
            iq.load_state_dict(state, strict=True)
        except RuntimeError as e:
            raise PackedModelError(f"layer {name}: stored activation ranges do not fit ({e}): re-export") from None
        if not iq.calibrated:
            raise PackedModelError(f"layer {name}: static activation quantizer has no stored range: re-export")
    return module


def load_packed(
    directory: str | Path,
    device: str | torch.device = "cpu",
    backend: Backend | str = Backend.AUTO,
    *,
    fake_quant: bool = False,
    model: nn.Module | None = None,
    verify: bool = True,
    fuse_blocks: bool = True,
) -> nn.Module:
    """Rebuild an exported quantized transformer, ready to run (eval mode, on `device`).

    Layers a kernel computes exactly (`kernel_for`) become kernel modules running on `backend`
    (`Backend.AUTO`: Triton on a supported GPU, the pure-torch reference elsewhere with one warning;
    `Backend.REFERENCE`: the kernels' exact math on any device); the rest are fake-quant
    `PackedQuantLinear`s. fake_quant=True makes every layer a PackedQuantLinear (the in-memory fake-quant
    model's math, from the same codes).
    model: a skeleton to load into, for models that are not diffusers classes (default: rebuilt from
        the stored diffusers config).
    verify: check every file's size and sha256 against the manifest first.
    fuse_blocks: give each Wan / CogVideoX block whose linears all became kernel linears of one code format (and
        whose attention is diffusers' own) the fused residual + LayerNorm + AdaLN + quantization forward
        (`workbench.kernels.fused_blocks.fuse_block_norms`: the same math, ~3% of a forward on an H200); ignored with
        fake_quant. `net.fused_blocks` says how many blocks got it (0 when none or not asked).
    """
    backend = Backend.parse(backend)
    d = Path(directory)
    manifest = read_manifest(d)
    if verify:
        verify_files(d, manifest)
    tensors = read_tensors(d, manifest)
    net = build_model(manifest, model)

    for name, info in (manifest.get("attention") or {}).items():
        try:
            wrap_attention(net.get_submodule(name), attention_from_dict(info["spec"], f"attention {name}"))
        except AttributeError:
            raise PackedModelError(
                f"attention module {name} from the manifest is not in the rebuilt model: re-export") from None
    used: set[str] = set()
    had_params = [n for n, m in net.named_modules() if next(m.parameters(), None) is not None]
    for name, entry in manifest["layers"].items():
        try:
            current = net.get_submodule(name)
        except AttributeError:
            raise PackedModelError(
                f"layer {name} from the manifest does not exist in the {manifest['model'].get('class')} "
                "built from the stored config: the manifest or config was modified: re-export"
            ) from None
        have = tuple(getattr(current, "weight", torch.empty(0)).shape)
        if have != tuple(entry["shape"]):
            raise PackedModelError(
                f"layer {name}: the manifest gives shape {list(entry['shape'])} but the model built from the "
                f"config has {list(have)}: the manifest was modified or belongs to another model: re-export"
            )
        net.set_submodule(name, build_layer(name, entry, tensors, used, backend, fake_quant))
    # A container left without parameters (bias-free kernel layers only) would break diffusers' dtype
    # probes (`next(module.parameters())`): its kernel layers fall back to fake quant, which has a weight.
    emptied = [f"{n}." for n in had_params
               if n not in manifest["layers"] and next(net.get_submodule(n).parameters(), None) is None]
    for name, entry in manifest["layers"].items():
        if emptied and f"{name}.".startswith(tuple(emptied)) and not isinstance(net.get_submodule(name), QuantLinear):
            net.set_submodule(name, build_layer(name, entry, tensors, used, backend, fake_quant=True))

    rest = {k: v for k, v in tensors.items() if k not in used}
    missing, unexpected = net.load_state_dict(rest, strict=False, assign=True)
    layer_prefixes = tuple(f"{n}." for n in manifest["layers"])
    missing = [k for k in missing if not k.startswith(layer_prefixes)]
    if missing or unexpected:
        what = f"lacks {missing[0]!r}" if missing else f"has {unexpected[0]!r}, which the model does not"
        raise PackedModelError(f"the export {what} ({len(missing)} missing, {len(unexpected)} unexpected): re-export")
    hook = manifest.get("timestep_hook")
    if hook:
        install_timestep_hook(net, hook["arg"], float(hook["max_timestep"]))
    # the fused forwards hold no tensors of their own (they read the block's), so fusing before .to() is safe
    net.fused_blocks = fuse_block_norms(net) if fuse_blocks and not fake_quant else 0
    return net.to(device).eval()


__all__ = [
    "FORMAT_NAME", "FORMAT_VERSION", "KERNEL_CLASSES", "KernelChoice", "MANIFEST_NAME", "PackedKernelLinear", "PackedModelError",
    "PackedQuantLinear", "PackedWeight", "applied_weight", "build_layer", "build_model", "expected_storage",
    "kernel_for", "kernel_module", "kernel_weight", "load_packed", "pack_codes", "read_manifest", "read_tensors",
    "storage_for", "unpack_codes", "verify_files",
]
