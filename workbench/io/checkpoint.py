"""Checkpoints as safetensors + JSON (distillation state, session snapshots): nothing in them is ever executed
when read.

A checkpoint is two files next to each other: `<name>.json` (the fingerprint of the run, the position,
every plain value, and the names of the tensors) and `<name>.safetensors` (the tensors). Reading checks
the fingerprint in the JSON first and opens the tensors only when it matches; the JSON records the
sha256 of the tensor file, so a tensor file from another save is refused. Both are written to temporary
names and renamed into place, the JSON last, so an interrupted save leaves the previous checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch

from workbench.io.manifest import file_sha256

TENSOR = "__tensor__"
FORMAT = "workbench-checkpoint"
VERSION = 1


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message names the file and what to do."""


def fingerprint(blob: dict[str, Any]) -> str:
    """A short hash of plain data (what must match for a checkpoint to be resumed)."""
    text = json.dumps(blob, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def code_fingerprint() -> str:
    """A short hash of the workbench's own code and recipes (the .py and .yaml files of the package), so
    results and checkpoints made by other code are never taken for this code's."""
    root = Path(__file__).resolve().parents[1]
    h = hashlib.sha256()
    for f in sorted(p for p in root.rglob("*") if p.suffix in (".py", ".yaml") and "__pycache__" not in p.parts):
        h.update(str(f.relative_to(root)).encode())
        h.update(f.read_bytes())
    return h.hexdigest()[:16]


def module_fingerprint(module: torch.nn.Module) -> str:
    """A short hash of a module's class, parameter names, shapes, dtypes and a sample of every tensor's values
    (cheap for a 14B model, different for a different checkpoint)."""
    h = hashlib.sha256(type(module).__name__.encode())
    for name, t in module.state_dict().items():
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        flat = t.detach().reshape(-1)
        step = max(1, flat.numel() // 64)
        h.update(flat[::step][:64].float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def _split(x: Any, tensors: dict[str, torch.Tensor], path: str) -> Any:
    """x with every tensor replaced by {TENSOR: key} (tensors collected by key)."""
    if isinstance(x, torch.Tensor):
        tensors[path] = x.detach().cpu().contiguous().clone()
        return {TENSOR: path}
    if isinstance(x, dict):
        for k in x:
            if not isinstance(k, (str, int)):
                raise TypeError(f"checkpoint keys must be str or int, got {type(k).__name__} at {path}")
        return {"__dict__": [[k, _split(v, tensors, f"{path}.{k}")] for k, v in x.items()]}
    if isinstance(x, (list, tuple)):
        return {"__list__": [_split(v, tensors, f"{path}.{i}") for i, v in enumerate(x)],
                "tuple": isinstance(x, tuple)}
    if x is None or isinstance(x, (bool, int, float, str)):
        return x
    raise TypeError(f"cannot store a {type(x).__name__} in a checkpoint (at {path})")


def _join(x: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(x, dict) and TENSOR in x:
        key = x[TENSOR]
        if key not in tensors:
            raise CheckpointError(f"tensor {key!r} named in the checkpoint is missing from its tensor file")
        return tensors[key]
    if isinstance(x, dict) and "__dict__" in x:
        return {k: _join(v, tensors) for k, v in x["__dict__"]}
    if isinstance(x, dict) and "__list__" in x:
        items = [_join(v, tensors) for v in x["__list__"]]
        return tuple(items) if x.get("tuple") else items
    return x


def save_checkpoint(path: Path, fp: str, state: dict[str, Any]) -> None:
    """Write `state` (nested dicts / lists of tensors and plain values) under fingerprint `fp` at `path`
    (`path` without suffix: `<path>.json` + `<path>.safetensors`)."""
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, torch.Tensor] = {}
    skeleton = _split(state, tensors, "state")
    st, js = path.with_suffix(".safetensors"), path.with_suffix(".json")
    tmp_st, tmp_js = path.with_suffix(".safetensors.tmp"), path.with_suffix(".json.tmp")
    save_file(tensors, str(tmp_st))
    meta = {"format": FORMAT, "version": VERSION, "fingerprint": fp, "tensors_sha256": file_sha256(tmp_st),
            "state": skeleton}
    tmp_js.write_text(json.dumps(meta, allow_nan=True))
    os.replace(tmp_st, st)
    os.replace(tmp_js, js)


def load_checkpoint(path: Path, fp: str) -> dict[str, Any] | None:
    """The state saved at `path` under fingerprint `fp`, or None when there is none.

    A checkpoint of another run (other settings, data or blocks) or a damaged one is an error naming the
    file and the fix; its tensors are read only after the fingerprint and the tensor file's hash match."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    js, st = path.with_suffix(".json"), path.with_suffix(".safetensors")
    if not js.is_file():
        return None
    try:
        meta = json.loads(js.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"checkpoint {js} cannot be read ({type(e).__name__}); delete it (and {st.name}) "
                              "or rerun with --restart to start over") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT or meta.get("version") != VERSION:
        raise CheckpointError(f"{js} is not a workbench checkpoint of version {VERSION}; delete it "
                              "or rerun with --restart to start over")
    if meta.get("fingerprint") != fp:
        raise CheckpointError(
            f"checkpoint {js} was written by a run with other settings, data or code; use another checkpoint "
            "directory, rerun with --restart (resume=False) to start over, or delete the file")
    if not st.is_file() or file_sha256(st) != meta.get("tensors_sha256"):
        raise CheckpointError(f"checkpoint tensors {st} are missing or do not belong to {js.name}; delete both "
                              "or rerun with --restart to start over")
    try:
        tensors = load_file(str(st))
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"checkpoint tensors {st} are corrupt ({e}); delete it or rerun with --restart") from None
    return _join(meta.get("state"), tensors)


def remove_checkpoint(path: Path) -> None:
    """Delete the checkpoint files at `path` (what this module wrote, nothing else)."""
    for suffix in (".json", ".safetensors", ".json.tmp", ".safetensors.tmp"):
        f = path.with_suffix(suffix)
        if f.is_file():
            f.unlink()


def pack(x: Any) -> tuple[Any, dict[str, torch.Tensor]]:
    """(JSON-ready skeleton, tensors) of nested dicts / lists / tuples of tensors and plain values."""
    tensors: dict[str, torch.Tensor] = {}
    return _split(x, tensors, "x"), tensors


def unpack(skeleton: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """Inverse of `pack`."""
    return _join(skeleton, tensors)


__all__ = ["CheckpointError", "code_fingerprint", "fingerprint", "module_fingerprint", "load_checkpoint", "pack", "remove_checkpoint", "save_checkpoint",
           "unpack"]
