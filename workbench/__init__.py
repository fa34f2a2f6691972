"""Workbench for quantizing video diffusion transformers.

    import workbench as wb
    model = wb.load_bundled()                              # or wb.load_generator("path/to/pipeline")
    session = wb.run_recipe(model, "vidit-q-w8a8")         # a Session: quantized copy + stage reports
    c = wb.compare(model, wb.RecipeCache(model), "W4A8", "a red circle moving left")

The names below are imported on first use, so `import workbench` stays cheap.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.2.0"

_EXPORTS = {
    "load": "workbench.models",
    "load_generator": "workbench.models",
    "GenerationSettings": "workbench.models",
    "load_bundled": "workbench.models",
    "Session": "workbench.session",
    "run_recipe": "workbench.recipes",
    "load_recipe": "workbench.recipes",
    "QuantConfig": "workbench.quant",
    "quantize_model": "workbench.quant",
    "compare": "workbench.eval.compare",
    "RecipeCache": "workbench.eval.compare",
    "EvalSettings": "workbench.eval.prompt_set",
    "save_quantized": "workbench.io.rundir",
    "load_quantized": "workbench.io.rundir",
    "export_model": "workbench.io.export",
    "load_packed": "workbench.io.packed",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'workbench' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
