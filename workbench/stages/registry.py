"""One registration for stages: `@stage(Settings, figures=...)` where the stage function is defined.

    @stage(RangeSettings, figures=ranges_figures)
    def calibrate_ranges(session, settings=None) -> StageReport: ...

`STAGES` (name -> `StageInfo`) is what the recipe validator, the recipe runner and `StageReport.figures()`
read: the function, its settings dataclass (which checks its own values in `__post_init__`) and its figures.
"""

from __future__ import annotations

from dataclasses import dataclass, is_dataclass
from typing import Any, Callable

STAGES: dict[str, "StageInfo"] = {}


@dataclass(frozen=True)
class StageInfo:
    """A registered stage: `fn(session, settings) -> StageReport`, its settings class, its figures."""

    name: str
    fn: Callable[..., Any]
    settings: type
    figures: Callable[[Any], list] | None = None


def stage(settings: type, figures: Callable[[Any], list] | None = None) -> Callable[[Callable], Callable]:
    """Register the decorated function as a stage named after it (see module docstring)."""
    if not is_dataclass(settings):
        raise TypeError(f"stage settings must be a dataclass, got {settings!r}")

    def deco(fn: Callable) -> Callable:
        name = fn.__name__
        if name in STAGES and STAGES[name].fn is not fn:
            raise ValueError(f"a stage called {name!r} is already registered ({STAGES[name].fn.__module__})")
        STAGES[name] = StageInfo(name, fn, settings, figures)
        return fn

    return deco


__all__ = ["STAGES", "StageInfo", "stage"]
