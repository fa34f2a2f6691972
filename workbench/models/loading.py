"""Load a supported video diffusion transformer from a bundled name or a local directory.

This workbench never touches the network: every load is local (``local_files_only=True``,
with ``HF_HUB_OFFLINE=1`` set while loading).  Accepted inputs of :func:`load`:

* a bundled name (``BUNDLED_NAMES``), built by ``workbench.models.bundled.load_bundled``;
* a local directory holding a diffusers transformer saved with ``save_pretrained``
  (``config.json`` whose ``_class_name`` is a supported class, plus its weights);
* a local directory holding a diffusers pipeline (``model_index.json``); its
  ``transformer`` component is loaded from the ``transformer/`` subfolder and the pipeline
  directory is kept in ``LoadedModel.pipeline_path`` for :func:`load_pipeline`.

Every failure raises :class:`ModelLoadError` naming the problem and the fix.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from .adapters import SUPPORTED_CLASSES, ArchAdapter, UnsupportedModelError, adapter_for

__all__ = [
    "BUNDLED_NAMES",
    "SUPPORTED_CLASSES",
    "LoadedModel",
    "ModelLoadError",
    "load",
    "load_generator",
    "load_pipeline",
]

logger = logging.getLogger(__name__)

BUNDLED_NAMES: tuple[str, ...] = ("tiny-world",)

CONFIG_NAME = "config.json"
MODEL_INDEX_NAME = "model_index.json"
WEIGHTS_STEM = "diffusion_pytorch_model"

LoadKind = Literal["bundled", "transformer", "pipeline"]


class ModelLoadError(ValueError):
    """A model could not be loaded; the message says why and what to do."""


@dataclass
class LoadedModel:
    """A loaded transformer and where it came from.

    Attributes:
        transformer: the diffusers transformer module (in eval mode).
        adapter: its :class:`~workbench.models.adapters.ArchAdapter`.
        kind: ``"bundled"``, ``"transformer"`` (a transformer directory) or ``"pipeline"``.
        source: the bundled name, or the resolved directory that was passed.
        pipeline_path: the pipeline directory when ``kind == "pipeline"`` (pass it to
            :func:`load_pipeline` to build the full pipeline), else None.
        bundle: the object returned by ``load_bundled`` when ``kind == "bundled"``, else None.
    """

    transformer: nn.Module
    adapter: ArchAdapter
    kind: LoadKind
    source: str
    pipeline_path: Path | None = None
    bundle: Any = None

    @property
    def class_name(self) -> str:
        return self.adapter.class_name


# ---------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------

_HUB_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")
_URL_RE = re.compile(r"^(?:https?|hf)://", re.IGNORECASE)

_DIR_HINT = (
    "a local directory holding either a diffusers transformer saved with save_pretrained() "
    f"({CONFIG_NAME} + {WEIGHTS_STEM}.safetensors) or a diffusers pipeline ({MODEL_INDEX_NAME} "
    "+ a transformer/ subfolder)"
)


@contextmanager
def hub_offline() -> Iterator[None]:
    """Hub offline mode while loading, restored afterwards: HF_HUB_OFFLINE=1 in the environment and in
    huggingface_hub's constant (read once at its import, so setting the variable alone may be too late).
    Every loader also passes ``local_files_only=True``: the workbench never reaches a model hub."""
    import huggingface_hub.constants as hub

    previous_env, previous_flag = os.environ.get("HF_HUB_OFFLINE"), hub.HF_HUB_OFFLINE
    os.environ["HF_HUB_OFFLINE"] = "1"
    hub.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        hub.HF_HUB_OFFLINE = previous_flag
        if previous_env is None:
            os.environ.pop("HF_HUB_OFFLINE", None)
        else:
            os.environ["HF_HUB_OFFLINE"] = previous_env


def _supported() -> str:
    return ", ".join(SUPPORTED_CLASSES)


def _no_network_error(text: str) -> ModelLoadError:
    local = text.rstrip("/").rsplit("/", 1)[-1] or "model"
    repo = _URL_RE.sub("", text)
    return ModelLoadError(
        f"{text!r} is not a local directory; it looks like a remote model id, but this workbench has "
        "no network access and never downloads models. Download it on a machine with internet "
        f"access (e.g. `huggingface-cli download {repo} --local-dir {local}`), copy the folder here "
        f"and pass that local directory. Bundled names: {', '.join(BUNDLED_NAMES)}."
    )


def _missing_path_error(text: str, path: Path) -> ModelLoadError:
    if _URL_RE.match(text) or (_HUB_ID_RE.match(text) and not text.startswith(".")):
        return _no_network_error(text)
    if "/" not in text and os.sep not in text and not text.startswith("~"):
        return ModelLoadError(
            f"Unknown model name {text!r}: it is neither a bundled model (bundled names: "
            f"{', '.join(BUNDLED_NAMES)}) nor an existing path. To load anything else pass {_DIR_HINT}."
        )
    return ModelLoadError(f"Path does not exist: {path}. Pass {_DIR_HINT}.")


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelLoadError(
            f"{path} is not readable JSON ({exc}). The file is corrupt or truncated: re-save the model "
            "with save_pretrained() or re-download it."
        ) from exc
    if not isinstance(data, dict):
        raise ModelLoadError(f"{path} should hold a JSON object, not {type(data).__name__}: re-save or re-download it.")
    return data


def _check_dtype(dtype: torch.dtype) -> None:
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ModelLoadError(
            f"dtype must be a floating torch.dtype such as torch.float32 or torch.bfloat16, got {dtype!r}"
        )


def _corrupt_error(file: Path, exc: BaseException) -> ModelLoadError:
    hint = ""
    try:
        with open(file, "rb") as fh:
            if fh.read(64).startswith(b"version https://git-lfs"):
                hint = " It is a git-lfs pointer, not the weights: run `git lfs pull` in its repository."
    except OSError:
        pass
    return ModelLoadError(
        f"Weights file {file} is corrupt or truncated ({type(exc).__name__}: {exc}).{hint} Re-save the "
        "model with save_pretrained() or re-download the file."
    )


def _validate_safetensors(file: Path) -> None:
    """Parse the header (cheap, memory-mapped); this also catches truncated files."""
    from safetensors import safe_open

    try:
        with safe_open(str(file), framework="pt") as handle:
            handle.keys()
    except Exception as exc:  # SafetensorError, OSError, ...
        raise _corrupt_error(file, exc) from exc


def _weights_files(directory: Path) -> list[Path]:
    """The weights files diffusers will read from ``directory`` (safetensors preferred);
    safetensors files are validated."""
    candidates = (
        (directory / f"{WEIGHTS_STEM}.safetensors", None),
        (directory / f"{WEIGHTS_STEM}.safetensors.index.json", "index"),
        (directory / f"{WEIGHTS_STEM}.bin", None),
        (directory / f"{WEIGHTS_STEM}.bin.index.json", "index"),
    )
    for path, kind in candidates:
        if not path.is_file():
            continue
        if kind is None:
            files = [path]
        else:
            weight_map = _read_json(path).get("weight_map")
            if not isinstance(weight_map, dict) or not weight_map:
                raise ModelLoadError(f"Shard index {path} has no weight_map: it is corrupt; re-save or re-download it.")
            files = [directory / name for name in sorted(set(weight_map.values()))]
            missing = [f.name for f in files if not f.is_file()]
            if missing:
                raise ModelLoadError(
                    f"Shard index {path} lists weight files that are missing: {', '.join(missing)}. "
                    "Re-download the complete model folder."
                )
        for file in files:
            if file.suffix == ".safetensors":
                _validate_safetensors(file)
        return files
    present = sorted(p.name for p in directory.glob(f"{WEIGHTS_STEM}*"))
    extra = f" Found only: {', '.join(present)} (variant weights are not supported)." if present else ""
    raise ModelLoadError(
        f"No weights file in {directory}: expected {WEIGHTS_STEM}.safetensors (or .bin, or a sharded "
        f"*.index.json).{extra} Re-save the model with save_pretrained() or re-download it."
    )


# ---------------------------------------------------------------------------
# loaders
# ---------------------------------------------------------------------------


def _load_transformer_dir(directory: Path, dtype: torch.dtype, expected_class: str | None = None) -> nn.Module:
    config_path = directory / CONFIG_NAME
    if not config_path.is_file():
        raise ModelLoadError(
            f"{directory} has no {CONFIG_NAME}: it is not a diffusers transformer folder. Re-save the "
            "transformer with save_pretrained() or re-download it."
        )
    class_name = _read_json(config_path).get("_class_name")
    if not class_name:
        raise ModelLoadError(
            f"{config_path} has no '_class_name': it was not written by diffusers' save_pretrained(). "
            f"Supported classes: {_supported()}."
        )
    if class_name not in SUPPORTED_CLASSES:
        raise ModelLoadError(
            f"{config_path} names the unsupported class {class_name!r}. Supported classes: {_supported()}."
        )
    if expected_class is not None and class_name != expected_class:
        raise ModelLoadError(
            f"{MODEL_INDEX_NAME} says the transformer is a {expected_class} but {config_path} says "
            f"{class_name}: the pipeline folder is inconsistent; re-save or re-download it."
        )
    files = _weights_files(directory)

    import diffusers

    cls = getattr(diffusers, class_name)
    with hub_offline():
        try:
            # disable_mmap: read the weights into ordinary (aligned) memory instead of leaving every
            # parameter backed by a memory map of the file; mmap-backed parameters sit at unaligned
            # addresses, which makes CPU kernels round differently from an in-memory copy.
            model, info = cls.from_pretrained(
                str(directory),
                local_files_only=True,
                torch_dtype=dtype,
                output_loading_info=True,
                disable_mmap=True,
            )
        except ModelLoadError:
            raise
        except Exception as exc:
            text = str(exc)
            bad = [f for f in files if str(f) in text]
            if bad or "Unable to load weights" in text or isinstance(exc, (EOFError, pickle.UnpicklingError)):
                raise _corrupt_error(bad[0] if bad else files[0], exc) from exc
            raise ModelLoadError(
                f"Could not load {class_name} from {directory}: {type(exc).__name__}: {text.rstrip('. ')}. Check that "
                f"{CONFIG_NAME} matches the weights (re-save with save_pretrained() or re-download)."
            ) from exc
    missing = info.get("missing_keys") or []
    if missing:
        shown = ", ".join(sorted(missing)[:8]) + (" ..." if len(missing) > 8 else "")
        raise ModelLoadError(
            f"The weights in {directory} lack {len(missing)} parameter(s) that {class_name} needs "
            f"({shown}): the weights file is incomplete or belongs to another config. Re-save the model "
            "with save_pretrained() or re-download it."
        )
    unexpected = info.get("unexpected_keys") or []
    if unexpected:
        logger.warning("%s: ignored %d unexpected weight(s), e.g. %s", directory, len(unexpected), unexpected[:4])
    return model.eval()


def _load_pipeline_transformer(directory: Path, dtype: torch.dtype, component: str) -> nn.Module:
    index = _read_json(directory / MODEL_INDEX_NAME)
    pipeline_class = index.get("_class_name", "<unknown pipeline>")
    entry = index.get(component)
    if entry is None:
        components = sorted(k for k, v in index.items() if not k.startswith("_") and isinstance(v, list))
        raise ModelLoadError(
            f"Pipeline {pipeline_class} in {directory} has no {component!r} component (components: "
            f"{', '.join(components) or 'none'}). Only transformer-based video pipelines are supported; "
            f"their transformer must be one of: {_supported()}."
        )
    if not (isinstance(entry, (list, tuple)) and len(entry) == 2):
        raise ModelLoadError(
            f"{directory / MODEL_INDEX_NAME}: entry {component!r} should be [library, class_name], got {entry!r}. "
            "Re-save or re-download the pipeline."
        )
    library, class_name = entry
    if class_name is None:
        raise ModelLoadError(
            f"Pipeline {pipeline_class} in {directory} was saved without a {component!r} "
            f"({component}: [null, null]); pass a pipeline folder that includes it."
        )
    if class_name not in SUPPORTED_CLASSES:
        raise ModelLoadError(
            f"Pipeline {pipeline_class} in {directory} has an unsupported {component} class "
            f"{library}.{class_name}. Supported classes: {_supported()}."
        )
    sub = directory / component
    if not sub.is_dir():
        raise ModelLoadError(
            f"{MODEL_INDEX_NAME} in {directory} names {component}={class_name} but the {component}/ "
            "subfolder is missing. Re-download the complete pipeline folder."
        )
    extra = [
        k for k, v in index.items() if k.startswith("transformer") and k != component and isinstance(v, list) and v[-1]
    ]
    if extra:
        logger.info(
            "%s also has %s; only %r was loaded (pass component=... to load another)", directory, extra, component
        )
    return _load_transformer_dir(sub, dtype, expected_class=class_name)


def _load_bundled(name: str, dtype: torch.dtype) -> LoadedModel:
    try:
        from workbench.models.bundled import load_bundled
    except ModuleNotFoundError as exc:
        if exc.name not in ("workbench.models.bundled", "workbench.models", "workbench"):
            raise
        raise ModelLoadError(
            f"Bundled model {name!r} is unavailable: the module workbench.models.bundled is missing ({exc}). "
            "Pass a local model directory instead."
        ) from exc
    bundle = load_bundled(name)
    transformer = getattr(bundle, "transformer", None)
    if not isinstance(transformer, nn.Module):
        raise ModelLoadError(
            f"load_bundled({name!r}) returned {type(bundle).__name__} without a .transformer module."
        )
    try:
        adapter = adapter_for(transformer)
    except UnsupportedModelError as exc:
        raise ModelLoadError(f"Bundled model {name!r}: {exc}") from exc
    param = next(transformer.parameters(), None)
    if param is not None and param.dtype != dtype:
        transformer.to(dtype=dtype)
    return LoadedModel(transformer=transformer.eval(), adapter=adapter, kind="bundled", source=name, bundle=bundle)


def load(
    path_or_name: str | os.PathLike[str],
    dtype: torch.dtype = torch.float32,
    *,
    component: str = "transformer",
) -> LoadedModel:
    """Load a supported video transformer, never touching the network.

    Args:
        path_or_name: a name in ``BUNDLED_NAMES``, a transformer directory (``config.json``) or a
            pipeline directory (``model_index.json``).
        dtype: parameter dtype (``torch_dtype`` for diffusers; bundled models are cast).
        component: pipeline component to load (``"transformer"``; e.g. ``"transformer_2"`` for
            the second expert of Wan 2.2 pipelines). Ignored for other layouts.

    Raises:
        ModelLoadError: unknown name, missing path, remote id, unsupported class, corrupt
            weights, ... The message names the problem and the fix.
    """
    _check_dtype(dtype)
    try:
        text = os.fspath(path_or_name)
    except TypeError:
        text = None
    if not isinstance(text, str):
        raise ModelLoadError(
            f"Expected a model name or a local directory path (str or Path), got {type(path_or_name).__name__}."
        )
    if text in BUNDLED_NAMES:
        return _load_bundled(text, dtype)
    if not text.strip():
        raise ModelLoadError(f"Empty model name. Pass a bundled name ({', '.join(BUNDLED_NAMES)}) or {_DIR_HINT}.")

    path = Path(text).expanduser()
    if not path.exists():
        raise _missing_path_error(text, path.absolute())
    path = path.resolve()
    if path.is_file():
        parent_hint = ""
        if path.name in (CONFIG_NAME, MODEL_INDEX_NAME) or path.name.startswith(WEIGHTS_STEM):
            parent_hint = f" Pass its folder instead: {path.parent}"
        raise ModelLoadError(f"{path} is a file, not a directory. Pass {_DIR_HINT}.{parent_hint}")

    if (path / MODEL_INDEX_NAME).is_file():
        transformer = _load_pipeline_transformer(path, dtype, component)
        kind: LoadKind = "pipeline"
        pipeline_path: Path | None = path
    elif (path / CONFIG_NAME).is_file():
        transformer = _load_transformer_dir(path, dtype)
        kind, pipeline_path = "transformer", None
    else:
        hint = ""
        if (path / "transformer" / CONFIG_NAME).is_file():
            hint = f" It has a transformer/ subfolder with {CONFIG_NAME}: pass {path / 'transformer'}."
        raise ModelLoadError(
            f"{path} holds neither {CONFIG_NAME} (a diffusers transformer) nor {MODEL_INDEX_NAME} "
            f"(a diffusers pipeline).{hint} Pass {_DIR_HINT}."
        )
    return LoadedModel(
        transformer=transformer,
        adapter=adapter_for(transformer),
        kind=kind,
        source=str(path),
        pipeline_path=pipeline_path,
    )


def load_pipeline(
    path: str | os.PathLike[str],
    dtype: torch.dtype | None = None,
    *,
    transformer: nn.Module | None = None,
    **components: Any,
) -> Any:
    """Build the full diffusers pipeline saved in the local directory ``path``.

    Calls ``DiffusionPipeline.from_pretrained(path, local_files_only=True)``.  Pass
    ``transformer=loaded.transformer`` (e.g. a quantized one) to use it in the pipeline; other
    keyword arguments are forwarded as pipeline components (``vae=None`` etc. to skip one).
    Note: for pipelines whose ``transformer`` argument is optional (Wan), diffusers 0.42 still
    reads the transformer from disk; it is then replaced by the module you passed.
    """
    text = os.fspath(path)
    directory = Path(text).expanduser()
    if not directory.exists():
        raise _missing_path_error(text, directory.absolute())
    if not directory.is_dir() or not (directory / MODEL_INDEX_NAME).is_file():
        raise ModelLoadError(
            f"{directory} is not a diffusers pipeline folder: it has no {MODEL_INDEX_NAME}. Pass the "
            "root folder of a pipeline saved with DiffusionPipeline.save_pretrained(), or use load() "
            "for a bare transformer folder."
        )
    kwargs: dict[str, Any] = dict(components)
    if dtype is not None:
        _check_dtype(dtype)
        kwargs["torch_dtype"] = dtype
    if transformer is not None:
        kwargs["transformer"] = transformer

    from diffusers import DiffusionPipeline

    with hub_offline():
        try:
            pipe = DiffusionPipeline.from_pretrained(str(directory.resolve()), local_files_only=True, **kwargs)
        except Exception as exc:
            raise ModelLoadError(
                f"Could not build the pipeline in {directory}: {type(exc).__name__}: {str(exc).rstrip('. ')}. "
                "Check that every "
                f"component listed in {MODEL_INDEX_NAME} is present locally (no downloads are possible)."
            ) from exc
    # diffusers 0.42 ignores a passed component whose __init__ argument defaults to None (e.g. the
    # `transformer` of WanPipeline) and loads it from disk anyway: put the caller's module back.
    for name, module in (("transformer", transformer), *components.items()):
        if isinstance(module, nn.Module) and getattr(pipe, name, None) is not module:
            pipe.register_modules(**{name: module})
    return pipe


def load_generator(
    path_or_name: str | os.PathLike[str],
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
):
    """A text-to-video `Generator` from a bundled name or a local diffusers pipeline folder (never the network).

    The bundled model loads in fp32 unless `dtype` says otherwise; a pipeline in `dtype` (default fp32 on
    the CPU, bf16 on CUDA). A folder holding only a transformer cannot generate: the error says to pass its
    pipeline folder. A CUDA device where there is none is an error naming the fix.
    """
    from workbench.models.video_pipeline import PipelineGenerator, parse_device

    if dtype is not None:
        _check_dtype(dtype)
    try:
        dev = parse_device(device)
    except ValueError as e:
        raise ModelLoadError(str(e)) from None
    text = os.fspath(path_or_name) if isinstance(path_or_name, (str, os.PathLike)) else None
    if not isinstance(text, str):
        raise ModelLoadError(f"Expected a model name or a local directory path, got {type(path_or_name).__name__}.")
    if text in BUNDLED_NAMES:
        from workbench.models.bundled import load_bundled

        return load_bundled(text).to(dev, dtype)
    path = Path(text).expanduser()
    if not path.exists():
        raise _missing_path_error(text, path.absolute())
    if path.is_dir() and (path / MODEL_INDEX_NAME).is_file():
        try:
            return PipelineGenerator.from_pretrained(path, dev, dtype or (torch.bfloat16 if dev.type == "cuda"
                                                                          else torch.float32))
        except ValueError as e:
            raise ModelLoadError(str(e)) from None
    if path.is_dir() and (path / CONFIG_NAME).is_file():
        raise ModelLoadError(
            f"{path} holds a diffusers transformer alone; generating videos needs its whole pipeline (text encoder, "
            f"VAE, scheduler): pass the pipeline folder, the one with {MODEL_INDEX_NAME}")
    raise ModelLoadError(f"{path} is not a video pipeline folder (no {MODEL_INDEX_NAME}); pass a folder saved with "
                         f"DiffusionPipeline.save_pretrained() or a bundled name ({', '.join(BUNDLED_NAMES)})")
