"""`plain`: any value as JSON-ready plain data, the form reports, manifests and checkpoints are written in."""

from __future__ import annotations

import math
from dataclasses import asdict, is_dataclass
from typing import Any

import torch


def plain(value: Any) -> Any:
    """`value` turned into JSON-ready plain data (tensors -> lists, tuples -> lists, dataclasses -> dicts).

    Non-finite floats become None, so a report never writes NaN into JSON.
    """
    if is_dataclass(value) and not isinstance(value, type):
        return plain(asdict(value))
    if isinstance(value, torch.Tensor):
        return plain(value.detach().cpu().tolist())
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return value
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if hasattr(value, "item"):  # numpy scalars
        return plain(value.item())
    return str(value)


__all__ = ["plain"]
