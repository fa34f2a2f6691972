"""Checkpoints of the distillation loop: what `run_distillation` writes every `checkpoint_every` iterations and
when a unit ends, and how a rerun resumes from it. Which kind is read is decided by what is on disk.

* One process: `<name>.json` + `<name>.safetensors` (`workbench.io.checkpoint`) hold everything: the quantized
  model, the optimizer, the batch generator, the curves, the loss terms' state, the position.
* Several ranks (torchrun): the tensors go to a distributed checkpoint `<name>-dcp-u<unit>-i<iter>/` written by
  all ranks together (`workbench.distributed.checkpoints`): the parameters the loop trained so far (the block
  being trained taken from its FSDP2 shards; nothing else in the model changes during distillation, and the
  rest is restored from the session snapshot taken before the stage, so a 14B model's checkpoint holds its
  scales and branches, not 28 GB of frozen weights) and the optimizer, keyed by parameter name. `<name>.json` +
  `.safetensors`, written by rank 0 last, hold the rest and name that folder. A new folder per save, the JSON
  switched to it, then the old one removed: an interrupted save leaves the previous checkpoint whole.

A distributed checkpoint resumes on any number of ranks, or in one process without torchrun (tensors are stored
by global shape and resharded when read). A one-process checkpoint resumes in one process only; under torchrun it
is refused with the fix (resume it without torchrun, or restart).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from workbench import distributed
from workbench.io.checkpoint import CheckpointError, load_checkpoint, save_checkpoint

OptimizerRestore = Callable[[nn.Module, torch.optim.Optimizer], None]
DCP_TAG = "-dcp-"


@dataclass
class Resume:
    """Where a checkpoint stopped and what the loop needs to go on (the model was already restored)."""

    unit: int
    iteration: int
    generator: torch.Tensor
    results: list[dict[str, Any]]
    terms: list[Any]
    optimizer: OptimizerRestore | None  # fills a fresh optimizer over the unit's module (sharded or not)
    where: str
    trained_keys: list[str]  # model tensors the loop trained so far (saved by distributed checkpoints)


@dataclass
class LoopCheckpoint:
    """The checkpoint files of one distillation loop at `path` (no suffix) under fingerprint `fp`."""

    path: Path
    fp: str

    def load(self, model: nn.Module) -> Resume | None:
        """Restore `model` from the checkpoint and return the loop's position, or None when there is none."""
        state = load_checkpoint(self.path, self.fp)
        if state is None:
            return None
        if "dcp" in state:
            from workbench.distributed.checkpoints import is_dcp_dir, load_model, load_optimizer

            folder = self.path.parent / str(state["dcp"])
            if not is_dcp_dir(folder):
                raise CheckpointError(f"checkpoint {self.path}.json names the distributed checkpoint {folder}, which "
                                      "is missing or incomplete; rerun with --restart to start over")
            keys = list(state["model_keys"])
            load_model(folder, model, keys)
            restore = (lambda m, o: load_optimizer(folder, m, o)) if state["optimizer"] else None
        else:
            if distributed.active():
                raise CheckpointError(
                    f"checkpoint {self.path}.json was written by a run without torchrun (one process); resume it "
                    "the same way (the command without torchrun / --nproc), or pass --restart to start over on "
                    f"{distributed.world()} ranks")
            model.load_state_dict(state["model"], strict=True)
            opt_state = state["optimizer"]
            restore = (lambda m, o: o.load_state_dict(opt_state)) if opt_state is not None else None
            keys = []
        where = f"{self.path} (unit {state['unit']}, iteration {state['iteration']})"
        return Resume(int(state["unit"]), int(state["iteration"]), state["generator"], state["results"],
                      list(state.get("terms", [])), restore, where, keys)

    def save(self, model: nn.Module, unit: int, iteration: int, loop_state: dict[str, Any],
             optimizer: torch.optim.Optimizer | None = None, trained: nn.Module | None = None,
             prefix: str = "", trained_keys: set[str] = frozenset()) -> None:
        """Write the checkpoint (collective under a process group). `loop_state`: generator, results, terms.
        `trained`: the module being trained (its optimizer's parameters), `prefix` its name inside `model` (a
        sharded block copy's values replace the original block's). `trained_keys`: names in `model` of every
        parameter trained so far (what a distributed checkpoint stores of the model)."""
        position = {"unit": unit, "iteration": iteration}
        if not distributed.active():
            save_checkpoint(self.path, self.fp, {
                **position, "model": model.state_dict(),
                "optimizer": None if optimizer is None else optimizer.state_dict(), **loop_state})
            return
        from workbench.distributed.checkpoints import model_tensors, remove_dcp_dir, save_tensors

        name = f"{self.path.name}{DCP_TAG}u{unit:03d}-i{iteration:06d}"
        state = model.state_dict()
        tensors = {k: state[k] for k in sorted(trained_keys)}
        if trained is not None and trained is not model:
            tensors.update({k: v for k, v in model_tensors(trained, prefix).items() if k in trained_keys})
        save_tensors(self.path.parent / name, tensors, trained if optimizer is not None else None, optimizer)
        if distributed.is_main():
            save_checkpoint(self.path, self.fp, {**position, "dcp": name, "optimizer": optimizer is not None,
                                                 "model_keys": sorted(trained_keys), **loop_state})
            for old in self.path.parent.glob(f"{self.path.name}{DCP_TAG}*"):
                if old.name != name:
                    remove_dcp_dir(old)


def remove_loop_checkpoints(folder: Path) -> None:
    """Delete the distributed checkpoint folders a loop wrote in `folder` (its JSON files go with the rest)."""
    from workbench.distributed.checkpoints import remove_dcp_dir

    for d in Path(folder).glob(f"*{DCP_TAG}u*-i*"):
        if d.is_dir():
            remove_dcp_dir(d)


__all__ = ["LoopCheckpoint", "OptimizerRestore", "Resume", "remove_loop_checkpoints"]
