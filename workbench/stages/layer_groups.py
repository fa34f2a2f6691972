"""Small helpers shared by the stages: layer groups, switching quantizers of some layers, error measures."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
from torch import nn

from workbench.quant import quantizers

GROUPINGS = ("block", "role", "layer", "block_all")


def rel_mse(a: torch.Tensor, ref: torch.Tensor) -> float:
    """||a - ref||^2 / ||ref||^2 (0 when both are zero)."""
    num = (a.float() - ref.float()).pow(2).sum()
    den = ref.float().pow(2).sum()
    return float(num / den) if float(den) > 0 else float(num)


def block_of(name: str, block_names: list[str]) -> str | None:
    """The transformer block (qualified name) holding module `name`, or None."""
    for b in block_names:
        if name == b or name.startswith(b + "."):
            return b
    return None


def layer_groups(transformer: nn.Module, layers: list[str], grouping: str = "block") -> dict[str, list[str]]:
    """Group linear layer names for sensitivity analysis.

    block: per transformer block and role group (self attention, cross attention, FFN, ...), named
        "<block>.<role group>" (e.g. "blocks.0.attn", "blocks.0.cross", "blocks.0.ff");
    role: one role across all blocks (e.g. "attn.q"); layer: every layer alone; block_all: whole blocks.
    Layers outside the blocks are grouped by role. Attention modules join the group of their projections.
    """
    from workbench.models.adapters import adapter_for, attention_modules, layer_role, named_transformer_blocks, role_group

    if grouping not in GROUPINGS:
        raise ValueError(f"unknown grouping {grouping!r}; choose one of {list(GROUPINGS)}")
    adapter = adapter_for(transformer)
    blocks = [n for n, _ in named_transformer_blocks(transformer, adapter)]
    groups: dict[str, list[str]] = {}
    for name in layers:
        role = layer_role(name, adapter)
        block = block_of(name, blocks)
        if grouping == "layer":
            key = name
        elif grouping == "role" or block is None:
            key = role
        elif grouping == "block_all":
            key = block
        else:
            key = f"{block}.{role_group(role)}"
        groups.setdefault(key, []).append(name)
    for att in attention_modules(transformer, adapter=adapter):
        for key, names in groups.items():
            if any(n.startswith(att + ".") for n in names) and grouping != "layer":
                names.append(att)
                break
    return groups


@contextmanager
def only_quantized(model: nn.Module, modules: list[str]) -> Iterator[None]:
    """Inside the block, only quantizers inside the named modules quantize; every other one is off."""
    qs = quantizers(model)
    before = {n: q.mode for n, q in qs.items()}
    prefixes = tuple(m + "." for m in modules)
    for n, q in qs.items():
        q.mode = "quantize" if n.startswith(prefixes) else "off"
    try:
        yield
    finally:
        for n, q in qs.items():
            q.mode = before[n]
