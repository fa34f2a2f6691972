"""FSDP2 (`fully_shard`) for the unit a rank trains: a sharded copy of a module, and its values copied back.

    student = shard_copy(block, device, trainable={"attn1.to_q.weight_quantizer.scale", ...})
    ...train student (its trainable parameters are DTensor shards; every rank holds 1/N of each)...
    copy_back(student, block, trainable)      # the original block gets the full trained values, on every rank

The original module is never sharded: a copy is, so the session's models stay plain modules that save, load
and generate as before, and a failed training leaves the original untouched.

Why a copy is built this way (each point a pitfall of FSDP2):
* trainable parameters must exist before `fully_shard` (a parameter created later is never synchronised), so the
  caller creates them (learnable quantizer scales, compensation branches) on the original first;
* initial values are not broadcast by `fully_shard`, so every rank must copy the same original (they do: all
  ranks run the same stages, and `workbench.distributed.check_same` verifies it after every stage);
* all trainable parameters of one FSDP group must share a dtype, so when they do not (bf16 weights trained next
  to fp32 scales) every module owning trainable parameters becomes its own group;
* a root module keeps its unsharded parameters after forward unless told otherwise: the frozen teacher is
  sharded with `reshard_after_forward=True`, and the student is resharded before its values are read.
"""

from __future__ import annotations

import copy
from typing import Iterable

import torch
from torch import nn

from workbench.distributed.group import DistributedError, world

_MESHES: dict[str, object] = {}


def mesh(device_type: str):  # noqa: ANN201
    """The 1-D device mesh over all ranks for `device_type` ("cpu" with gloo, "cuda" with NCCL)."""
    from torch.distributed.device_mesh import init_device_mesh

    key = f"{device_type}:{world()}"
    if key not in _MESHES:
        _MESHES[key] = init_device_mesh(device_type, (world(),))
    return _MESHES[key]


def forget_meshes() -> None:
    """Drop the cached meshes (their process group is going away; `group.shutdown` calls this)."""
    _MESHES.clear()


def _depth(name: str) -> int:
    return name.count(".") + 1 if name else 0


def _groups(module: nn.Module) -> list[nn.Module]:
    """Submodules to shard as their own FSDP groups, innermost first: the children that hold parameters and,
    when the trainable parameters mix dtypes, every module that owns trainable parameters directly."""
    trainable = [p for p in module.parameters() if p.requires_grad]
    chosen: dict[int, tuple[int, nn.Module]] = {}
    if len({p.dtype for p in trainable}) > 1:
        for name, m in module.named_modules():
            own = [p for p in m.parameters(recurse=False) if p.requires_grad]
            if m is not module and own:
                dtypes = {p.dtype for p in own}
                if len(dtypes) > 1:
                    raise DistributedError(
                        f"{name} ({type(m).__name__}) owns trainable parameters of several dtypes "
                        f"({', '.join(sorted(map(str, dtypes)))}); FSDP2 trains one dtype per module: keep a "
                        "module's trainable parameters in one dtype")
                chosen[id(m)] = (_depth(name), m)
    for name, child in module.named_children():
        if any(True for _ in child.parameters()):
            chosen.setdefault(id(child), (_depth(name), child))
    return [m for _, m in sorted(chosen.values(), key=lambda dm: -dm[0])]


def shard_copy(module: nn.Module, device: torch.device, trainable: Iterable[str] = (),
               reshard_after_forward: bool | None = None) -> nn.Module:
    """A copy of `module` on `device`, sharded over all ranks with FSDP2; parameters named in `trainable`
    require grad, all others are frozen. `reshard_after_forward=True` for a module only run forward (a frozen
    teacher), so its full parameters exist only while it runs."""
    from torch.distributed.fsdp import fully_shard

    names = set(trainable)
    own = dict(module.named_parameters())
    missing = names - set(own)
    if missing:
        raise ValueError(f"no parameter {sorted(missing)[0]!r} in {type(module).__name__} to train")
    dup = copy.deepcopy(module).to(device)
    for name, p in dup.named_parameters():
        p.requires_grad_(name in names)
    m = mesh(device.type)
    for group in _groups(dup):
        fully_shard(group, mesh=m)
    fully_shard(dup, mesh=m, reshard_after_forward=reshard_after_forward)
    return dup


def reshard(module: nn.Module) -> None:
    """Free the unsharded parameters every FSDP group of `module` may still hold."""
    from torch.distributed.fsdp import FSDPModule

    for m in module.modules():
        if isinstance(m, FSDPModule):
            m.reshard()


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """The whole value of a (possibly sharded) tensor: a collective for a DTensor, so every rank calls it."""
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


@torch.no_grad()
def copy_back(sharded: nn.Module, original: nn.Module, names: Iterable[str]) -> None:
    """Write the full values of parameters `names` of the sharded copy into `original` (every rank, same order)."""
    reshard(sharded)
    src, dst = dict(sharded.named_parameters()), dict(original.named_parameters())
    for name in sorted(names):
        value = full_tensor(src[name].detach())
        dst[name].copy_(value.to(dst[name].device, dst[name].dtype))


__all__ = ["copy_back", "forget_meshes", "full_tensor", "mesh", "reshard", "shard_copy"]
