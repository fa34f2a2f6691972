"""Save a quantized session to a directory and load it back, with integrity checks.

    from workbench.io.rundir import save_quantized, load_quantized
    save_quantized(session, "out/vidit-q-w4a8")          # refuses a non-empty directory unless force=True
    model, qtransformer, manifest = load_quantized("out/vidit-q-w4a8")

Directory layout (format "workbench-run", version 2):

* `quantized_transformer.safetensors`: the whole state of the quantized transformer: every weight
  (full-precision values; quantization happens in the forward pass), biases, quantizer scales and
  zero points (per channel / per timestep bucket), smoothing scales and rotation matrices;
* `fp_weights.safetensors` (when a stage changed weights, e.g. Q-VDiT's folded estimate): the FP values of
  those tensors, so the FP model is rebuilt exactly (evaluation compares against it);
* `reports.json`: the stage reports (`StageReport.to_dict()`), in order;
* `model/` (only for a text-to-video model that is not a bundled one): its text encoder, scheduler and
  world settings, so generation works after loading;
* `manifest.json` (written last): format and version, recipe (name + full dict), model (name, source,
  transformer class and config), creation date, versions, the final QuantConfig (including
  mixed-precision rules), per-layer formats, the extras (by stable class name), the size and sha256 of
  every other file, and a digest over all of it (`workbench.io.manifest`).

Loading checks the digest and every file first, rebuilds the FP transformer from the saved class (one of
the supported diffusers classes), config and weights, re-applies the saved QuantConfig with
`quantize_model`, re-creates the output corrections (`extras`: LoRA / TQE / binary residual branches, from
the allow-list of `workbench.quant.compensation`), restores smoothing / rotation and loads the state
strictly. Any missing, truncated, corrupt, edited or mismatched file is an `ArtifactError` naming the file.
"""

from __future__ import annotations

import copy
import datetime as _dt
import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from workbench.io.manifest import (ManifestError, check_digest, file_entries, read_json_manifest, verify_files,
                                   write_manifest)
from workbench.io.plain import plain

CHECKPOINTS = "checkpoints"  # an unfinished run's resumable state inside its output directory

FORMAT_NAME = "workbench-run"
FORMAT_VERSION = 2
MANIFEST = "manifest.json"
STATE_FILE = "quantized_transformer.safetensors"
FP_FILE = "fp_weights.safetensors"  # FP tensors the quantized state does not hold as they were (trained weights)
REPORTS_FILE = "reports.json"
MODEL_DIR = "model"
MODEL_FILES = ("text_encoder.safetensors", "text_encoder.json", "scheduler.json", "world.json")
MAX_JSON_BYTES = 256 * 2**20  # reports.json of a large model stays far below this


class ArtifactError(ValueError):
    """A quantized-model directory that cannot be loaded; the message names the file and the fix."""


def _transformer_info(transformer: nn.Module) -> dict[str, Any]:
    config = getattr(transformer, "config", None)
    return {
        "class": type(transformer).__name__,
        "module": type(transformer).__module__,
        "config": plain(dict(config)) if config is not None else None,
    }


def fp_differences(fp: nn.Module, qstate: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The FP transformer's tensors that the quantized state lacks or holds with other values (weights that
    distillation trained or folded a correction into): with them the FP model is rebuilt exactly."""
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in fp.state_dict().items()
            if k not in qstate or qstate[k].shape != v.shape or not torch.equal(qstate[k], v.detach().cpu())}


def _model_info(session) -> tuple[dict[str, Any], list[tuple[str, Any]]]:  # noqa: ANN001
    """The manifest's `model` section and the extra model files to write (relative name, writer)."""
    from workbench.io.checkpoint import module_fingerprint
    from workbench.models.bundled import BUNDLED, TinyWorldModel
    from workbench.models.video_pipeline import PipelineGenerator

    name = session.model_name
    model = session.fp_model
    bundled = isinstance(model, TinyWorldModel) and name in BUNDLED
    pipeline = isinstance(model, PipelineGenerator)
    info = {
        "name": name,
        "kind": "text-to-video" if session.can_generate else "transformer",
        "source": "bundled" if bundled else "pipeline" if pipeline else "saved" if session.can_generate else "state",
        "transformer": _transformer_info(session.fp_transformer),
        "fingerprint": module_fingerprint(session.fp_transformer),
        "dtype": str(next(session.fp_transformer.parameters()).dtype).removeprefix("torch."),
    }
    files: list[tuple[str, Any]] = []
    if pipeline:
        if model.path is None:
            raise ValueError("the session's pipeline was built in memory: save it first (save_pretrained) and load "
                             "it with PipelineGenerator.from_pretrained, so the run can name its folder")
        info.update(path=str(model.path), pipeline=type(model.pipeline).__name__, family=model.family)
    elif session.can_generate and not bundled:
        from safetensors.torch import save_file

        model = session.fp_model
        te = {k: v.contiguous() for k, v in model.text_encoder.state_dict().items()}
        files = [
            (f"{MODEL_DIR}/text_encoder.safetensors", lambda p: save_file(te, str(p))),
            (f"{MODEL_DIR}/text_encoder.json", lambda p: p.write_text(json.dumps(model.text_encoder.config_dict(), indent=2))),
            (f"{MODEL_DIR}/scheduler.json", lambda p: p.write_text(json.dumps(plain(dict(model.scheduler_config)), indent=2))),
            (f"{MODEL_DIR}/world.json", lambda p: p.write_text(json.dumps(model.world.__dict__, indent=2))),
        ]
    return info, files


def save_quantized(session, out_dir: str | Path, force: bool = False, sources: tuple = ()) -> Path:
    """Write the session's quantized transformer, reports and manifest to `out_dir` (module docstring).

    `out_dir` must be new or empty; with `force` it may hold an earlier run directory, whose files (those its
    manifest lists) are replaced while anything else there stays. The files are written to a staging
    directory and moved in at the end, so an interrupted save leaves the old directory or none.
    """
    from safetensors.torch import save_file

    from workbench.io.outdir import check_output, staged_output
    from workbench.stages.ptq import layer_formats

    if session.quant_config is None:
        raise ValueError("nothing to save: the session holds no quantized model (run apply_quantization or a recipe first)")
    out = check_output(out_dir, FORMAT_NAME, force=force, sources=sources, own=(CHECKPOINTS,))
    qt = session.qtransformer
    model_info, model_files = _model_info(session)
    with staged_output(out, FORMAT_NAME) as tmp:
        state = {k: v.detach().to("cpu").contiguous().clone() for k, v in qt.state_dict().items()}
        save_file(state, str(tmp / STATE_FILE), metadata={"format": FORMAT_NAME, "format_version": str(FORMAT_VERSION)})
        reports = [r.to_dict() for r in session.reports]
        (tmp / REPORTS_FILE).write_text(json.dumps(reports, indent=1, allow_nan=False))
        names = [STATE_FILE, REPORTS_FILE]
        fp_only = fp_differences(session.fp_transformer, state)
        if fp_only:
            save_file(fp_only, str(tmp / FP_FILE), metadata={"format": FORMAT_NAME})
            names.append(FP_FILE)
        for rel, write in model_files:
            (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
            write(tmp / rel)
            names.append(rel)

        import diffusers

        import workbench

        manifest = {
            "format": FORMAT_NAME,
            "format_version": FORMAT_VERSION,
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "recipe": plain(session.recipe or {"name": None, "recipe": None}),
            "seed": session.seed,
            "model": model_info,
            "quant_config": session.quant_config.to_dict(),
            "layers": layer_formats(qt),
            "extras": extras_manifest(qt),
            "versions": {"workbench": workbench.__version__, "torch": torch.__version__,
                         "diffusers": diffusers.__version__},
            "files": file_entries(tmp, names),
        }
        write_manifest(tmp / MANIFEST, manifest)
    return out


# ----------------------------------------------------------------------------------------------------
# loading


def read_manifest(directory: str | Path) -> dict[str, Any]:
    """The validated manifest of a run directory: format and version, digest (any edit is an error naming
    the field), every listed file inside the directory with its size and sha256."""
    d = Path(directory)
    if not d.is_dir():
        raise FileNotFoundError(f"{d} is not a directory; pass a directory written by `workbench quantize`")
    path = d / MANIFEST
    if not path.is_file():
        hint = (" It holds an unfinished run's checkpoints: rerun the same `workbench quantize` command to resume."
                if (d / CHECKPOINTS).is_dir() else "")
        raise FileNotFoundError(f"{path} is missing: {d} was not written by `workbench quantize` (or the run did "
                                f"not finish).{hint}")
    try:
        manifest = read_json_manifest(path)
    except ManifestError as e:
        raise ArtifactError(str(e)) from None
    version = manifest.get("format_version")
    if manifest.get("format") != FORMAT_NAME:
        if version == 1 and "format" not in manifest:
            raise ArtifactError(
                f"{path} is a run directory of format version 1 (workbench 0.1), which had no digest and named "
                "classes by import path; this workbench reads version 2 only. Re-create it: `workbench quantize "
                f"--recipe {(manifest.get('recipe') or {}).get('name') or 'NAME'} --seed {manifest.get('seed', 0)} "
                f"--out {d} --force`")
        raise ArtifactError(f"{path} is not a workbench run directory (format {manifest.get('format')!r}); pass a "
                            "directory written by `workbench quantize`")
    if version != FORMAT_VERSION:
        raise ArtifactError(f"{path} has format_version {version!r}; this workbench reads version {FORMAT_VERSION}: "
                            "upgrade the workbench, or re-create the directory with this one")
    try:
        check_digest(manifest, path)
        for key in ("model", "quant_config", "files", "recipe"):
            if key not in manifest:
                raise ArtifactError(f"{path} is corrupt: field {key!r} is missing")
        if not isinstance(manifest["files"], dict) or STATE_FILE not in manifest["files"]:
            raise ArtifactError(f"{path} does not list {STATE_FILE}")
        verify_files(d, manifest["files"], MANIFEST)
    except ManifestError as e:
        raise ArtifactError(str(e)) from None
    return manifest


def _fp_transformer(info: dict[str, Any], state: dict[str, torch.Tensor]) -> nn.Module:
    """The FP transformer rebuilt from its class, config and the FP weights held in the saved state."""
    import diffusers

    from workbench.models.adapters import SUPPORTED_CLASSES

    if not isinstance(info, dict) or info.get("class") not in SUPPORTED_CLASSES or not isinstance(info.get("config"), dict):
        shown = str(info.get("class") if isinstance(info, dict) else info)[:80]
        raise ArtifactError(f"{MANIFEST}: the transformer class {shown!r} is not one this workbench rebuilds "
                            f"({', '.join(SUPPORTED_CLASSES)}); the directory was not written by this workbench")
    cls = getattr(diffusers, info["class"])
    config = {k: v for k, v in info["config"].items() if not k.startswith("_")}
    for k, v in config.items():
        if isinstance(v, list):
            config[k] = tuple(v)
    try:
        transformer = cls.from_config(config)
    except Exception as e:  # noqa: BLE001 - a config this diffusers cannot build: named, with the fix
        raise ArtifactError(f"{MANIFEST}: cannot build {info['class']} from the stored config ({type(e).__name__}: "
                            f"{e}); install the diffusers version that wrote it") from None
    own = transformer.state_dict()
    missing = [k for k in own if k not in state]
    if missing:
        raise ArtifactError(f"{STATE_FILE} lacks weights of the transformer, e.g. {missing[0]!r}")
    transformer.load_state_dict({k: state[k] for k in own}, strict=True)
    return transformer.eval()


def _text_to_video(manifest: dict[str, Any], d: Path, transformer: nn.Module):
    from safetensors.torch import load_file

    from workbench.models.bundled import BUNDLED, TinyWorldModel, load_bundled
    from workbench.models.text_encoder import TextEncoder, TextEncoderConfig
    from workbench.world.render import WorldConfig

    m = manifest["model"]
    if m["source"] == "bundled":
        if m.get("name") not in BUNDLED:
            raise ArtifactError(f"{MANIFEST} names the bundled model {str(m.get('name'))[:40]!r}, which this workbench "
                                f"does not ship ({', '.join(BUNDLED)})")
        model = load_bundled(m["name"])
        model.transformer = transformer
        return model
    md = d / MODEL_DIR
    try:
        te = TextEncoder(TextEncoderConfig(**json.loads((md / "text_encoder.json").read_text())))
        te.load_state_dict(load_file(str(md / "text_encoder.safetensors")))
        sched = json.loads((md / "scheduler.json").read_text())
        world = WorldConfig(**json.loads((md / "world.json").read_text()))
    except Exception as e:  # noqa: BLE001 - re-raised naming the directory
        raise ArtifactError(f"could not read the model files in {md}: {type(e).__name__}: {e}") from None
    return TinyWorldModel(transformer, te.eval(), sched, world, m["name"])


def extras_manifest(model: nn.Module) -> dict[str, dict[str, dict[str, Any]]]:
    """{layer: {key: {"class": "module:qualname", "init": kwargs}}} of every QuantLinear extra (LoRA, TQE,
    binary residual branches), so loading can rebuild them before the state is loaded strictly."""
    from workbench.quant import QuantLinear
    from workbench.quant.compensation import compensation_entry

    return {name: {key: compensation_entry(name, key, extra) for key, extra in m.extras.items()}
            for name, m in model.named_modules() if isinstance(m, QuantLinear) and len(m.extras)}


def rebuild_extras(model: nn.Module, extras: dict[str, dict[str, dict[str, Any]]]) -> None:
    """Re-create the extras recorded by `extras_manifest` (their values come with the saved state); classes
    come only from the allow-list of `workbench.quant.compensation`, nothing named in the file is imported."""
    from workbench.quant.compensation import UnknownClassError, build_compensation

    from workbench.quant import QuantLinear

    if not isinstance(extras, dict):
        raise ArtifactError(f"{MANIFEST}: 'extras' must map layers to their extras")
    for layer, entries in extras.items():
        try:
            module = model.get_submodule(layer)
        except AttributeError:
            module = None
        if not isinstance(module, QuantLinear) or not isinstance(entries, dict):
            raise ArtifactError(f"{MANIFEST}: extras are listed for {str(layer)[:80]!r}, which is no quantized layer "
                                "of the rebuilt model; the manifest was modified")
        for key, spec in entries.items():
            try:
                module.extras[key] = build_compensation(layer, key, spec)
            except UnknownClassError as e:
                raise ArtifactError(f"{MANIFEST}: {e}") from None


def rebuild_quantized(fp: nn.Module, config, extras: dict[str, Any], state: dict[str, torch.Tensor],  # noqa: ANN001
                      where: str = STATE_FILE) -> nn.Module:
    """A quantized copy of `fp` rebuilt from its QuantConfig, extras and saved state: quantize, re-create the
    extras, restore the layers' smoothing / rotation (which also re-derives their weight ranges), then load the
    whole state strictly. Any mismatch is an ArtifactError naming `where`."""
    from workbench.quant import QuantLinear, quantize_model

    qt = copy.deepcopy(fp)
    for p in qt.parameters():
        p.requires_grad_(False)
    quantize_model(qt, config)
    rebuild_extras(qt, extras)
    for key, value in state.items():
        for attr, setter in (("smooth", "set_smooth"), ("rotation", "set_rotation")):
            if not key.endswith("." + attr):
                continue
            try:
                module = qt.get_submodule(key[: -len(attr) - 1])
            except AttributeError:
                module = None
            if isinstance(module, QuantLinear):
                getattr(module, setter)(value)
            elif module is None or not any(isinstance(m, QuantLinear) and module in m.extras.values()
                                           for m in qt.modules()):
                raise ArtifactError(f"{where}: {key} belongs to no quantized layer of the rebuilt model (the file "
                                    "and the manifest do not match)")
    result = qt.load_state_dict(state, strict=False)
    if result.missing_keys or result.unexpected_keys:
        what = result.missing_keys[:1] or result.unexpected_keys[:1]
        raise ArtifactError(
            f"{where} does not match the model rebuilt from {MANIFEST} (e.g. {what[0]!r}: "
            f"{len(result.missing_keys)} missing, {len(result.unexpected_keys)} unexpected keys)")
    return qt.eval()


def load_quantized(directory: str | Path, model: str | Path | None = None, device: str | torch.device = "cpu",
                   dtype: torch.dtype | None = None) -> tuple[Any, nn.Module, dict[str, Any]]:
    """(model, qtransformer, manifest) from a directory written by `save_quantized`.

    model: the FP model: a Generator for text-to-video runs (the bundled model, the saved tiny model, or the
    pipeline the run was made from: from the folder the manifest names, or `model` when given; its
    transformer must be the one that was quantized), else the FP transformer;
    qtransformer: the quantized transformer, ready for `model.generate(..., transformer=qtransformer)`.
    device / dtype: where to put both (dtype default: the dtype the run was made in, fp32 on the CPU).
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from workbench.quant import QuantConfig

    d = Path(directory)
    manifest = read_manifest(d)
    try:
        state = load_file(str(d / STATE_FILE))
    except (SafetensorError, OSError, ValueError) as e:
        raise ArtifactError(f"{d / STATE_FILE} is corrupt or truncated: {e}") from None
    try:
        config = QuantConfig.from_dict(manifest["quant_config"])
    except (ValueError, TypeError) as e:
        raise ArtifactError(f"{d / MANIFEST}: invalid quant_config: {e}") from None
    m = manifest["model"]
    if m.get("source") == "pipeline" or model is not None:
        gen = _pipeline_of(manifest, model, device, dtype)
        qt = rebuild_quantized(gen.transformer, config, manifest.get("extras") or {}, state, where=str(d / STATE_FILE))
        return gen, qt, manifest
    fp_state = dict(state)
    if FP_FILE in manifest["files"]:
        try:
            fp_state.update(load_file(str(d / FP_FILE)))
        except (SafetensorError, OSError, ValueError) as e:
            raise ArtifactError(f"{d / FP_FILE} is corrupt or truncated: {e}") from None
    fp = _fp_transformer(m["transformer"], fp_state)
    if dtype is not None:
        fp.to(dtype=dtype)
    qt = rebuild_quantized(fp, config, manifest.get("extras") or {}, state, where=str(d / STATE_FILE))
    result = _text_to_video(manifest, d, fp) if m["kind"] == "text-to-video" else fp
    if device != "cpu":
        from workbench.models.video_pipeline import parse_device

        dev = parse_device(device)
        qt.to(dev)
        result = result.to(dev) if hasattr(result, "to") else result
    return result, qt, manifest


def _pipeline_of(manifest: dict[str, Any], model: str | Path | None, device, dtype):  # noqa: ANN001, ANN202
    """The FP generator of a run: the pipeline folder the manifest names (or `model`), checked to hold the
    transformer that was quantized."""
    from workbench.io.checkpoint import module_fingerprint
    from workbench.models.loading import load_generator

    m = manifest["model"]
    path = model if model is not None else m.get("path")
    if path is None:
        raise ArtifactError(f"the run's model is {m.get('name')!r} ({m.get('source')}), not a pipeline: leave --model unset")
    if model is None and not Path(path).is_dir():
        raise ArtifactError(f"the run was made from the pipeline at {path}, which is not there: pass --model DIR "
                            "(the same pipeline, copied elsewhere)")
    dtype = dtype or getattr(torch, str(m.get("dtype", "float32")), torch.float32)
    if torch.device(device).type == "cpu" and dtype == torch.bfloat16:
        dtype = torch.float32  # bf16 on the CPU is slow and rounds differently; the run's values load into fp32
    gen = load_generator(path, device, dtype)
    fp = gen.transformer
    info = m.get("transformer") or {}
    if type(fp).__name__ != info.get("class") or plain(dict(getattr(fp, "config", {}) or {})) != info.get("config"):
        raise ArtifactError(f"the pipeline at {path} holds a {type(fp).__name__} with another config than the one this "
                            f"run quantized ({info.get('class')}): pass --model with the pipeline the run was made from")
    same_dtype = str(next(fp.parameters()).dtype).removeprefix("torch.") == m.get("dtype")
    if same_dtype and m.get("fingerprint") and module_fingerprint(fp) != m["fingerprint"]:  # (values hash per dtype)
        raise ArtifactError(f"the transformer weights at {path} are not the ones this run quantized (fingerprint "
                            "differs): pass --model with the pipeline the run was made from")
    return gen


def load_reports(directory: str | Path) -> list:
    """The stage reports saved with a quantized model (figures can be drawn again from them)."""
    from workbench.stages.report import StageReport

    d = Path(directory)
    read_manifest(d)  # the reports file is listed there, so its hash was checked
    try:
        return [StageReport.from_dict(r) for r in json.loads((d / REPORTS_FILE).read_text(encoding="utf-8"))]
    except (ValueError, TypeError, KeyError) as e:
        raise ArtifactError(f"{d / REPORTS_FILE} holds no stage reports this workbench reads ({e})") from None


__all__ = ["ArtifactError", "CHECKPOINTS", "FORMAT_NAME", "FORMAT_VERSION", "load_quantized", "load_reports",
           "read_manifest", "rebuild_quantized", "save_quantized"]
