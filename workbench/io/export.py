"""The packed format's writer: a quantized transformer as low-bit codes that `load_packed` turns into kernels.

    from workbench.io.export import export_model
    from workbench.io.packed import load_packed
    export_model(session.qtransformer, "out/w4a8", recipe=session.recipe)
    transformer = load_packed("out/w4a8", device="cuda")

The stored codes are the very codes the fake-quant model computes with (taken from each layer's weight
quantizer, not re-quantized), so the reloaded weights equal `QuantLinear.dequantized_weight()` bit for
bit. Smoothing and rotation are already folded into the codes (they quantize W' = (W * s) R); the
input side of the transform, x' = (x / s) R, is stored beside them because activations are quantized
in that basis. The on-disk layout is described in `workbench.io.packed`; `manifest.json` records the
recipe, the model class and config, per-layer formats, activation settings, each file's sha256 and
byte size, and the packed weight bytes against the FP32 / BF16 bytes of the same weights.
"""

from __future__ import annotations

import time
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import nn

from workbench.io.manifest import file_sha256, write_manifest
from workbench.io.outdir import check_output, staged_output
from workbench.io.packed import FORMAT_NAME, FORMAT_VERSION, MANIFEST_NAME, kernel_for, pack_codes
from workbench.quant import QuantLinear, quantized_linears
from workbench.quant.attention import QuantAttention
from workbench.quant.compensation import compensation_entry
from workbench.quant.context import _timestep_pre_hook
from workbench.quant.formats import dequantize, quantize
from workbench.io.plain import plain

DEFAULT_SHARD_BYTES = 2 * 2**30  # a new safetensors file starts past this many bytes


def export_model(
    qtransformer: nn.Module,
    out_dir: str | Path,
    recipe: dict[str, Any] | None = None,
    force: bool = False,
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
    sources: tuple = (),
) -> Path:
    """Write `qtransformer` (quantized with `workbench.quant`) to `out_dir`; returns the directory.

    recipe: plain data stored in the manifest (e.g. the recipe the model was quantized with).
    force: replace an earlier export in `out_dir` (only the files its manifest lists; anything else stays).
    sources: directories the caller reads (e.g. the run directory being exported): `out_dir` may not be one of
        them or inside one. The files are staged and moved into place at the end (`workbench.io.outdir`).
    Raises ValueError naming the layer when something cannot be stored exactly (a timestep-wise
    weight range, an uncalibrated static activation quantizer, an extra without `export_init`).
    """
    out = Path(out_dir)
    layers = quantized_linears(qtransformer)
    if not layers and not any(isinstance(m, QuantAttention) for m in qtransformer.modules()):
        raise ValueError(
            "the model has no quantized layers: quantize it first (workbench.quant.quantize_model or the "
            "apply_quantization stage), then export"
        )
    tensors: dict[str, torch.Tensor] = {}
    entries: dict[str, dict[str, Any]] = {}
    for name, q in layers.items():
        entry, layer_tensors = pack_layer(name, q)
        entries[name] = entry
        tensors.update(layer_tensors)
    prefixes = tuple(f"{n}." for n in layers)
    for key, value in qtransformer.state_dict().items():
        if not key.startswith(prefixes):
            tensors[key] = value
    attention = {}
    for name, m in qtransformer.named_modules():
        if isinstance(m, QuantAttention):
            for part, qz in m.quantizers().items():
                if qz.mode != "off" and not qz.calibrated:
                    raise ValueError(
                        f"attention {name}: static {part} quantizer has no range yet: calibrate "
                        "(workbench.quant.calibrate_model) before exporting"
                    )
            attention[name.removesuffix(".quant_attention")] = {"spec": m.spec.to_dict()}

    out = check_output(out, FORMAT_NAME, force=force, sources=sources)
    with staged_output(out, FORMAT_NAME) as tmp:
        files = _write_shards(tmp, tensors, max_shard_bytes)
        manifest = {
            "format": FORMAT_NAME,
            "version": FORMAT_VERSION,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "recipe": plain(recipe.to_dict() if hasattr(recipe, "to_dict") else recipe),
            "model": model_info(qtransformer),
            "timestep_hook": timestep_hook(qtransformer),
            "sizes": sizes(qtransformer, entries, files),
            "layers": entries,
            "attention": attention,
            "files": files,
        }
        write_manifest(tmp / MANIFEST_NAME, manifest)  # last, with its digest
    return out


# ---------------------------------------------------------------------------------------------------
# what gets stored


@torch.no_grad()
def pack_layer(name: str, q: QuantLinear) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Manifest entry and tensors of one QuantLinear (layout in `workbench.io.packed`).

    A quantizer in mode "off" counts as absent (the layer exports what it currently computes).
    """
    out_f, in_f = q.out_features, q.in_features
    dtype = q.weight.dtype
    tensors: dict[str, torch.Tensor] = {}
    wq, iq = q.weight_quantizer, q.input_quantizer
    wq = None if wq is None or wq.mode == "off" else wq
    iq = None if iq is None or iq.mode == "off" else iq
    for qz, side in ((wq, "weight"), (iq, "activation")):
        if qz is not None and qz.mode == "observe":
            raise ValueError(f"layer {name}: the {side} quantizer is observing (mid-calibration): finish calibrating first")

    weight_entry = None
    packed_bytes = 0
    if wq is None:
        tensors[f"{name}.weight"] = q.weight.detach()
    else:
        spec = wq.spec
        if spec.timestep_wise:
            raise ValueError(
                f"layer {name}: timestep-wise weight ranges cannot be exported (one code set per layer): "
                "use a static weight spec"
            )
        w = q.effective_weight().detach()
        v = wq.grouped(w)
        scale, zero = wq.params_for(v)
        scale, zero = scale.detach().float(), zero.detach().float()
        codes = quantize(v, scale, zero, spec.format)
        if not torch.equal(dequantize(codes, scale, zero, spec.format, w.dtype).reshape(w.shape), wq(w)):
            raise ValueError(f"layer {name}: codes do not reproduce the fake-quant weight; please report this")
        codes = codes.reshape(out_f, in_f)
        stored, storage = pack_codes(codes, spec.format)
        tensors[f"{name}.weight_codes"] = stored
        tensors[f"{name}.weight_scale"] = scale.reshape(-1).clone()
        packed_bytes = _nbytes(stored) + _nbytes(tensors[f"{name}.weight_scale"])
        if not spec.format.symmetric:
            z = zero.reshape(-1)
            if not torch.equal(z, z.round()) or z.min() < 0 or z.max() > 255:
                raise ValueError(f"layer {name}: zero points are not integers in 0..255; cannot pack them")
            tensors[f"{name}.weight_zero"] = z.to(torch.uint8)
            packed_bytes += _nbytes(tensors[f"{name}.weight_zero"])
        weight_entry = {
            "format": str(spec.format),
            "granularity": spec.granularity,
            "group_size": spec.group_size if spec.granularity == "group" else None,
            "storage": storage,
            "spec": spec.to_dict(),
        }

    act_entry = None
    if iq is not None:
        a = iq.spec
        if not a.dynamic:
            if not iq.calibrated:
                raise ValueError(
                    f"layer {name}: static activation quantizer has no range yet: calibrate "
                    "(workbench.quant.calibrate_model) before exporting, or use dynamic activations"
                )
            for key, t in iq.state_dict().items():
                tensors[f"{name}.input_quantizer.{key}"] = t.detach()
        act_entry = {
            "format": str(a.format),
            "granularity": a.granularity,
            "dynamic": a.dynamic,
            "timestep_wise": a.timestep_wise,
            "observer": None if a.dynamic and a.observer == "minmax" else a.observer,
            "spec": a.to_dict(),
        }

    if q.bias is not None:
        tensors[f"{name}.bias"] = q.bias.detach()
    if q.smooth is not None:
        tensors[f"{name}.smooth"] = q.smooth.detach()
    if q.rotation is not None:
        tensors[f"{name}.rotation"] = q.rotation.detach()
    extras = {}
    for key, extra in q.extras.items():
        extras[key] = compensation_entry(name, key, extra)
        for pname, t in extra.state_dict().items():
            tensors[f"{name}.extras.{key}.{pname}"] = t.detach()

    kernel = None
    if weight_entry is not None:
        kernel = kernel_for(wq.spec.format, wq.spec.granularity,
                            wq.spec.group_size if wq.spec.granularity == "group" else None, in_f,
                            None if iq is None else iq.spec)
    fp_bytes = out_f * in_f * dtype.itemsize
    entry = {
        "shape": [out_f, in_f],
        "dtype": str(dtype).removeprefix("torch."),
        "bias": q.bias is not None,
        "weight": weight_entry,
        "act": act_entry,
        "smooth": q.smooth is not None,
        "rotation": q.rotation is not None,
        "extras": extras,
        "kernel": None if kernel is None else kernel.name,
        "bytes": {
            "packed": packed_bytes if weight_entry else fp_bytes,
            "fp32": out_f * in_f * 4,
            "bf16": out_f * in_f * 2,
            "source": fp_bytes,
            "other": sum(_nbytes(t) for k, t in tensors.items()
                         if not k.endswith((".weight_codes", ".weight_scale", ".weight_zero", ".weight"))),
        },
    }
    return entry, tensors


def model_info(model: nn.Module) -> dict[str, Any]:
    """Class and (for diffusers models) config of the model, enough to rebuild its skeleton."""
    info: dict[str, Any] = {"class": type(model).__name__, "module": type(model).__module__,
                            "library": None, "config": None}
    config = getattr(model, "config", None)
    if type(model).__module__.startswith("diffusers.") and config is not None:
        import diffusers

        info["library"] = "diffusers"
        info["diffusers_version"] = diffusers.__version__
        info["config"] = plain({k: v for k, v in dict(config).items() if not k.startswith("_")})
    return info


def timestep_hook(model: nn.Module) -> dict[str, Any] | None:
    """The timestep hook `quantize_model` installed (argument name and max timestep), or None."""
    for hook in model._forward_pre_hooks.values():
        if isinstance(hook, partial) and hook.func is _timestep_pre_hook:
            return {"arg": hook.keywords["arg"], "max_timestep": float(hook.keywords["max_timestep"])}
    return None


def sizes(model: nn.Module, entries: dict[str, dict[str, Any]], files: list[dict[str, Any]]) -> dict[str, Any]:
    """Packed weight bytes of the quantized linears against the same weights in FP32 / BF16 / their own
    dtype, plus the whole export against the model's FP parameters."""
    quant = [e for e in entries.values() if e["weight"] is not None]
    packed = sum(e["bytes"]["packed"] for e in quant)
    fp32 = sum(e["bytes"]["fp32"] for e in quant)
    bf16 = sum(e["bytes"]["bf16"] for e in quant)
    params = {id(p): p for p in model.parameters()}
    fp_model = sum(p.numel() * p.element_size() for p in params.values())
    file_bytes = sum(f["bytes"] for f in files)
    return {
        "quantized_linears": len(quant),
        "packed_weight_bytes": packed,
        "fp32_weight_bytes": fp32,
        "bf16_weight_bytes": bf16,
        "source_weight_bytes": sum(e["bytes"]["source"] for e in quant),
        "ratio_vs_fp32": packed / fp32 if fp32 else None,
        "ratio_vs_bf16": packed / bf16 if bf16 else None,
        "file_bytes": file_bytes,
        "fp_model_bytes": fp_model,
        "file_ratio_vs_fp_model": file_bytes / fp_model if fp_model else None,
    }


# ---------------------------------------------------------------------------------------------------
# files


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _write_shards(out: Path, tensors: dict[str, torch.Tensor], max_bytes: int) -> list[dict[str, Any]]:
    """Split tensors into files of at most max_bytes (a bigger tensor gets a file of its own)."""
    from safetensors.torch import save_file

    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for key, t in tensors.items():
        n = _nbytes(t)
        if shards[-1] and size + n > max_bytes:
            shards.append({})
            size = 0
        shards[-1][key] = t
        size += n
    files = []
    for i, shard in enumerate(shards):
        fname = "model.safetensors" if len(shards) == 1 else f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        path = out / fname
        # clone: safetensors refuses tensors sharing storage (tied weights, views of one buffer)
        save_file({k: v.detach().cpu().contiguous().clone() for k, v in shard.items()}, str(path),
                  metadata={"format": "pt", "producer": FORMAT_NAME})
        path.chmod(0o644)  # safetensors writes 0600; an export is meant to be shared
        files.append({"name": fname, "bytes": path.stat().st_size, "sha256": file_sha256(path), "tensors": len(shard)})
    return files


__all__ = ["DEFAULT_SHARD_BYTES", "export_model", "model_info", "pack_layer", "sizes", "timestep_hook"]
