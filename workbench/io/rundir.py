"""Save a quantized session to a directory and load it back, with integrity checks.

    from workbench.io.rundir import save_quantized, load_quantized
    save_quantized(session, "out/vidit-q-w4a8")          # refuses a non-empty directory unless force=True
    model, qtransformer, manifest = load_quantized("out/vidit-q-w4a8")

Directory layout (format version 1):

* `quantized_transformer.safetensors`: the whole state of the quantized transformer: every weight
  (full-precision values; quantization happens in the forward pass), biases, quantizer scales and
  zero points (per channel / per timestep bucket), smoothing scales and rotation matrices;
* `reports.json`: the stage reports (`StageReport.to_dict()`), in order;
* `model/` (only for a text-to-video model that is not a bundled one): its text encoder, scheduler and
  world settings, so generation works after loading;
* `manifest.json` (written last): format version, recipe (name + full dict), model (name, source,
  transformer class and config), creation date, versions, the final QuantConfig (including
  mixed-precision rules), per-layer formats, and the size and sha256 of every other file.

Loading rebuilds the FP transformer from the saved class, config and weights, re-applies the saved
QuantConfig with `quantize_model`, restores smoothing / rotation, re-creates the output corrections
(`extras`: LoRA / TQE / binary residual branches, by class and constructor arguments) and loads the
state strictly. Any
missing, truncated, corrupt or mismatched file is an error naming the file.
"""

from __future__ import annotations

import copy
import datetime as _dt
import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from workbench.io.manifest import file_sha256
from workbench.io.plain import plain

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
STATE_FILE = "quantized_transformer.safetensors"
REPORTS_FILE = "reports.json"
MODEL_DIR = "model"
MODEL_FILES = ("text_encoder.safetensors", "text_encoder.json", "scheduler.json", "world.json")


class ArtifactError(ValueError):
    """A quantized-model directory that cannot be loaded; the message names the file."""


def _transformer_info(transformer: nn.Module) -> dict[str, Any]:
    config = getattr(transformer, "config", None)
    return {
        "class": type(transformer).__name__,
        "module": type(transformer).__module__,
        "config": plain(dict(config)) if config is not None else None,
    }


def save_quantized(session, out_dir: str | Path, force: bool = False) -> Path:
    """Write the session's quantized transformer, reports and manifest to `out_dir` (module docstring).

    A non-empty `out_dir` is refused unless `force` (the CLI's --force); with force the files of a
    previous save are replaced and other files are left alone.
    """
    from safetensors.torch import save_file

    from workbench.models.bundled import BUNDLED
    from workbench.stages.ptq import layer_formats

    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out} exists and is not a directory; choose another output directory")
    if out.exists() and any(out.iterdir()) and not force:
        raise FileExistsError(f"{out} is not empty; choose an empty directory or pass --force to overwrite it")
    if session.quant_config is None:
        raise ValueError("nothing to save: the session holds no quantized model (run apply_quantization or a recipe first)")
    out.mkdir(parents=True, exist_ok=True)
    manifest_path = out / MANIFEST
    if manifest_path.exists():
        manifest_path.unlink()  # a half-written directory never carries a stale manifest

    qt = session.qtransformer
    state = {k: v.detach().to("cpu").contiguous().clone() for k, v in qt.state_dict().items()}
    save_file(state, str(out / STATE_FILE), metadata={"format_version": str(FORMAT_VERSION)})
    reports = [r.to_dict() for r in session.reports]
    (out / REPORTS_FILE).write_text(json.dumps(reports, indent=1, allow_nan=False))
    files = [STATE_FILE, REPORTS_FILE]

    model = session.fp_model
    name = session.model_name
    bundled = session.can_generate and name in BUNDLED
    if session.can_generate and not bundled:
        from safetensors.torch import save_file as _save

        d = out / MODEL_DIR
        d.mkdir(exist_ok=True)
        _save({k: v.contiguous() for k, v in model.text_encoder.state_dict().items()}, str(d / "text_encoder.safetensors"))
        (d / "text_encoder.json").write_text(json.dumps(model.text_encoder.config_dict(), indent=2))
        (d / "scheduler.json").write_text(json.dumps(plain(dict(model.scheduler_config)), indent=2))
        (d / "world.json").write_text(json.dumps(model.world.__dict__, indent=2))
        files += [f"{MODEL_DIR}/{f}" for f in MODEL_FILES]

    import diffusers

    import workbench

    manifest = {
        "format_version": FORMAT_VERSION,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "recipe": session.recipe or {"name": None, "recipe": None},
        "seed": session.seed,
        "model": {
            "name": name,
            "kind": "text-to-video" if session.can_generate else "transformer",
            "source": "bundled" if bundled else ("saved" if session.can_generate else "state"),
            "transformer": _transformer_info(session.fp_transformer),
        },
        "quant_config": session.quant_config.to_dict(),
        "layers": layer_formats(qt),
        "extras": extras_manifest(qt),
        "versions": {"workbench": workbench.__version__, "torch": torch.__version__, "diffusers": diffusers.__version__},
        "files": {f: {"sha256": file_sha256(out / f), "bytes": (out / f).stat().st_size} for f in files},
    }
    manifest_path.write_text(json.dumps(manifest, indent=1, allow_nan=False))
    return out


# ----------------------------------------------------------------------------------------------------
# loading


def read_manifest(directory: str | Path) -> dict[str, Any]:
    """The validated manifest of a quantized-model directory (every listed file checked by sha256)."""
    d = Path(directory)
    if not d.is_dir():
        raise FileNotFoundError(f"{d} is not a directory; pass a directory written by save_quantized")
    path = d / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: {d} was not written by save_quantized (or the save did not finish)")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ArtifactError(f"{path} is corrupt or truncated (not valid JSON: {e})") from None
    if not isinstance(manifest, dict):
        raise ArtifactError(f"{path} is corrupt: expected a JSON object")
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        raise ArtifactError(f"{path} has format_version {version!r}; this workbench reads version {FORMAT_VERSION}")
    for key in ("model", "quant_config", "files", "recipe"):
        if key not in manifest:
            raise ArtifactError(f"{path} is corrupt: field {key!r} is missing")
    if STATE_FILE not in manifest["files"]:
        raise ArtifactError(f"{path} does not list {STATE_FILE}")
    for name, meta in manifest["files"].items():
        f = d / name
        if not f.is_file():
            raise ArtifactError(f"{f} is missing (listed in {MANIFEST})")
        size = f.stat().st_size
        if size != meta.get("bytes"):
            raise ArtifactError(f"{f} is truncated or corrupt: {size} bytes, the manifest says {meta.get('bytes')}")
        digest = file_sha256(f)
        if digest != meta.get("sha256"):
            raise ArtifactError(f"{f} is corrupt or was modified: its sha256 does not match {MANIFEST}")
    return manifest


def _fp_transformer(info: dict[str, Any], state: dict[str, torch.Tensor]) -> nn.Module:
    """The FP transformer rebuilt from its class, config and the FP weights held in the saved state."""
    import diffusers

    cls = getattr(diffusers, info["class"], None)
    if cls is None or info.get("config") is None:
        raise ArtifactError(f"cannot rebuild transformer class {info['class']!r} (not a diffusers class with a config)")
    config = {k: v for k, v in info["config"].items() if not k.startswith("_")}
    for k, v in config.items():
        if isinstance(v, list):
            config[k] = tuple(v)
    transformer = cls.from_config(config)
    own = transformer.state_dict()
    missing = [k for k in own if k not in state]
    if missing:
        raise ArtifactError(f"{STATE_FILE} lacks weights of the transformer, e.g. {missing[0]!r}")
    transformer.load_state_dict({k: state[k] for k in own}, strict=True)
    return transformer.eval()


def _text_to_video(manifest: dict[str, Any], d: Path, transformer: nn.Module):
    from safetensors.torch import load_file

    from workbench.models.bundled import TinyWorldModel, load_bundled
    from workbench.models.text_encoder import TextEncoder, TextEncoderConfig
    from workbench.world.render import WorldConfig

    m = manifest["model"]
    if m["source"] == "bundled":
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

    for layer, entries in extras.items():
        module = model.get_submodule(layer)
        for key, spec in entries.items():
            try:
                module.extras[key] = build_compensation(layer, key, spec)
            except UnknownClassError as e:
                raise ArtifactError(f"{MANIFEST}: {e}") from None


def load_quantized(directory: str | Path) -> tuple[Any, nn.Module, dict[str, Any]]:
    """(model, qtransformer, manifest) from a directory written by `save_quantized`.

    model: the FP model (a TinyWorldModel for text-to-video sessions, else the FP transformer);
    qtransformer: the quantized transformer, ready for `model.generate_many(..., transformer=qtransformer)`.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from workbench.quant import QuantConfig, QuantLinear, quantize_model

    d = Path(directory)
    manifest = read_manifest(d)
    try:
        state = load_file(str(d / STATE_FILE))
    except (SafetensorError, OSError, ValueError) as e:
        raise ArtifactError(f"{d / STATE_FILE} is corrupt or truncated: {e}") from None
    fp = _fp_transformer(manifest["model"]["transformer"], state)
    try:
        config = QuantConfig.from_dict(manifest["quant_config"])
    except (ValueError, TypeError) as e:
        raise ArtifactError(f"{d / MANIFEST}: invalid quant_config: {e}") from None
    qt = copy.deepcopy(fp)
    for p in qt.parameters():
        p.requires_grad_(False)
    quantize_model(qt, config)
    for key, value in state.items():
        for attr, setter in (("smooth", "set_smooth"), ("rotation", "set_rotation")):
            if key.endswith("." + attr):
                module = qt.get_submodule(key[: -len(attr) - 1])
                if not isinstance(module, QuantLinear):
                    raise ArtifactError(f"{STATE_FILE}: {key} belongs to no quantized linear of the rebuilt model")
                getattr(module, setter)(value)
    rebuild_extras(qt, manifest.get("extras") or {})
    result = qt.load_state_dict(state, strict=False)
    if result.missing_keys or result.unexpected_keys:
        what = result.missing_keys[:1] or result.unexpected_keys[:1]
        raise ArtifactError(
            f"{d / STATE_FILE} does not match the model rebuilt from {MANIFEST} (e.g. {what[0]!r}: "
            f"{len(result.missing_keys)} missing, {len(result.unexpected_keys)} unexpected keys)"
        )
    qt.eval()
    model = _text_to_video(manifest, d, fp) if manifest["model"]["kind"] == "text-to-video" else fp
    return model, qt, manifest


def load_reports(directory: str | Path) -> list:
    """The stage reports saved with a quantized model (figures can be drawn again from them)."""
    from workbench.stages.report import StageReport

    d = Path(directory)
    read_manifest(d)
    return [StageReport.from_dict(r) for r in json.loads((d / REPORTS_FILE).read_text())]


__all__ = ["ArtifactError", "FORMAT_VERSION", "load_quantized", "load_reports", "read_manifest", "save_quantized"]
