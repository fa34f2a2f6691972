"""Distributed checkpoints (`torch.distributed.checkpoint`, DCP) of a training loop: model and optimizer tensors
written by all ranks together, read back on any number of ranks, or by one process without a process group.

    save_tensors(directory, model_state, module, optimizer)       # collective: every rank calls it
    load_model(directory, module)                                 # fills module's tensors in place
    load_optimizer(directory, module, optimizer)                  # after the optimizer exists (sharded or not)

A DCP directory holds `.metadata` and one `__<rank>_0.distcp` file per saving rank; tensors are stored by their
global shape, so a sharded parameter saved by 4 ranks loads into a plain tensor (1 process) or into 2 shards.
Only tensors go into it (model under "model", optimizer under "optim"); the loop's plain state (position,
curves, generator) stays in `workbench.io.checkpoint` files, which never execute anything when read.

Optimizer state is keyed by parameter names relative to the trained module (`get_optimizer_state_dict`), so
the state saved from an FSDP2-sharded block copy loads into the same block trained by one process.

Reading never executes anything from the files: DCP pickles its `.metadata`, so it is read by an unpickler that
only builds DCP's own metadata classes, torch sizes, dtypes and layouts and paths (`_SafeReader`); a file naming
anything else is refused. Tensor data is raw bytes and the few non-tensor values (optimizer hyperparameters) are
read by DCP with `torch.load(weights_only=True)`.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any, Iterable

import torch
from torch import nn

from workbench.distributed.group import active
from workbench.io.checkpoint import CheckpointError

METADATA = ".metadata"
_METADATA_MODULES = ("torch.distributed.checkpoint.metadata",)
_METADATA_GLOBALS = {("torch.distributed.checkpoint.filesystem", "_StorageInfo"), ("torch", "Size"),
                     ("torch.serialization", "_get_layout"), ("pathlib", "PosixPath"), ("pathlib", "PurePosixPath"),
                     ("pathlib", "WindowsPath"), ("pathlib", "PureWindowsPath"), ("collections", "OrderedDict")}


class _MetadataUnpickler(pickle.Unpickler):
    """Builds DCP metadata and nothing else (allow-list above, plus torch dtypes)."""

    def find_class(self, module: str, name: str) -> Any:
        dtype = module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)
        if module in _METADATA_MODULES or (module, name) in _METADATA_GLOBALS or dtype:
            return super().find_class(module, name)
        raise CheckpointError(f"the distributed checkpoint's metadata names {module}.{name}, which DCP metadata "
                              "never holds; the folder is not a workbench checkpoint: delete it or rerun with "
                              "--restart")


def _safe_reader(directory: Path):  # noqa: ANN202
    """A DCP FileSystemReader whose `.metadata` is read by `_MetadataUnpickler`."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import StorageMeta

    class _SafeReader(FileSystemReader):
        refused: CheckpointError | None = None  # DCP wraps errors: the refusal is kept here to re-raise

        def read_metadata(self, *args: Any, **kwargs: Any):  # noqa: ANN202
            path = self._get_metadata_path(kwargs.get("rank"))
            with self.fs.create_stream(path, "rb") as f:
                try:
                    metadata = _MetadataUnpickler(f).load()
                except CheckpointError as e:
                    self.refused = e
                    raise
            if getattr(metadata, "storage_meta", None) is None:
                metadata.storage_meta = StorageMeta()
            metadata.storage_meta.load_id = self.load_id
            return metadata

    return _SafeReader(str(directory))


def _dcp_call(fn_name: str, state: dict[str, Any], directory: Path) -> None:
    """dcp.save / dcp.load of `state` at `directory` (loads through `_safe_reader`); without a process group in
    this one process (DCP's warning that it assumes so is expected here and silenced)."""
    import warnings

    import torch.distributed.checkpoint as dcp

    reader = _safe_reader(directory) if fn_name == "load" else None
    extra = {"storage_reader": reader} if reader is not None else {}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*assuming the intent is to .* in a single process")
        try:
            getattr(dcp, fn_name)(state, checkpoint_id=str(directory), no_dist=not active(), **extra)
        except (KeyboardInterrupt, SystemExit):
            raise
        except BaseException as e:  # DCP's CheckpointException is a BaseException
            if reader is None:
                raise
            if reader.refused is not None:
                raise CheckpointError(f"{directory}: {reader.refused}") from None
            last = [ln for ln in str(e).strip().splitlines() if ln.strip()][-1:] or [type(e).__name__]
            raise CheckpointError(f"distributed checkpoint {directory} cannot be read into this run ({last[0].strip()});"
                                  " it was written by another run or is damaged: rerun with --restart") from e


def is_dcp_dir(directory: Path) -> bool:
    return (Path(directory) / METADATA).is_file()


def model_tensors(module: nn.Module, prefix: str = "") -> dict[str, torch.Tensor]:
    """The module's state (parameters and persistent buffers; DTensor shards where it is sharded) under
    `prefix`, without empty tensors (ranges not set yet carry no data)."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    state = get_model_state_dict(module)
    return {prefix + k: v for k, v in state.items() if isinstance(v, torch.Tensor) and v.numel()}


def save_tensors(directory: Path, model: dict[str, torch.Tensor], module: nn.Module | None = None,
                 optimizer: torch.optim.Optimizer | None = None) -> None:
    """Write `model` tensors (and the optimizer state of `module`'s `optimizer`) to the DCP `directory`;
    collective under a process group."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    state: dict[str, Any] = {"model": model}
    if optimizer is not None:
        state["optim"] = get_optimizer_state_dict(module, optimizer)
    Path(directory).mkdir(parents=True, exist_ok=True)
    _dcp_call("save", state, directory)


@torch.no_grad()
def load_model(directory: Path, module: nn.Module, keys: Iterable[str] | None = None) -> None:
    """Fill the tensors `keys` of `module`'s state (None: every non-empty one) from the DCP `directory` (saved
    under "model" with the same names); a tensor the checkpoint lacks or holds in another shape is an error."""
    full = module.state_dict()
    names = [k for k, v in full.items() if v.numel()] if keys is None else list(keys)
    unknown = [k for k in names if k not in full]
    if unknown:
        raise CheckpointError(f"distributed checkpoint {directory} holds {unknown[0]!r}, which this "
                              f"{type(module).__name__} does not have: rerun with --restart")
    state = {k: full[k] for k in names}
    _dcp_call("load", {"model": state}, directory)
    module.load_state_dict(state, strict=False)


def load_optimizer(directory: Path, module: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Restore `optimizer` (over `module`'s parameters, sharded or not) from the DCP `directory`."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

    template = get_optimizer_state_dict(module, optimizer)  # initialises empty state to the right shapes
    state = {"optim": template}
    _dcp_call("load", state, directory)
    set_optimizer_state_dict(module, optimizer, state["optim"])


def remove_dcp_dir(directory: Path) -> None:
    """Delete a DCP directory this module wrote (only its `.metadata` and `*.distcp` files, then the folder)."""
    directory = Path(directory)
    if not directory.is_dir():
        return
    for f in directory.iterdir():
        if f.is_file() and (f.name == METADATA or f.suffix == ".distcp" or f.name.endswith(".tmp")):
            f.unlink()
    if not any(directory.iterdir()):  # anything else a user put there stays, and so does the folder
        directory.rmdir()


__all__ = ["is_dcp_dir", "load_model", "load_optimizer", "model_tensors", "remove_dcp_dir", "save_tensors"]
