"""`StageReport`: what a stage did, as plain data (numbers, tables, arrays) plus plotly figures.

A report never holds tensors or modules: `summary` maps names to plain numbers, `tables` map a table
name to a list of rows (dicts of str / int / float / bool / None), `arrays` map a name to nested lists
of numbers (or a dict of such lists). `to_dict()` is therefore JSON-ready, and `StageReport.from_dict`
reads it back, figures included (they are drawn from the data by `workbench.viz`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from workbench.io.plain import plain


@dataclass
class StageReport:
    """The result of one stage: settings used, summary numbers, tables, arrays; figures on demand.

    name: the stage function's name (e.g. "analyze_error_sources"); `figures()` looks its drawing up
    in `workbench.viz` by this name.
    """

    name: str
    settings: dict[str, Any] = field(default_factory=dict)
    summary: dict[str, float] = field(default_factory=dict)
    tables: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    arrays: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def figures(self) -> list:
        """Plotly figures of this report (drawn from its data by workbench.viz)."""
        from workbench.viz import figures_for

        return figures_for(self)

    def table(self, name: str) -> list[dict[str, Any]]:
        """One table by name; a missing one is an error naming the tables there are."""
        if name not in self.tables:
            raise KeyError(f"report {self.name!r} has no table {name!r}; tables: {sorted(self.tables)}")
        return self.tables[name]

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready plain data (see module docstring)."""
        return {
            "name": self.name,
            "settings": plain(self.settings),
            "summary": plain(self.summary),
            "tables": plain(self.tables),
            "arrays": plain(self.arrays),
            "notes": list(self.notes),
            "seconds": float(self.seconds),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> StageReport:
        """Inverse of `to_dict` (reports saved next to a quantized model)."""
        unknown = set(d) - {"name", "settings", "summary", "tables", "arrays", "notes", "seconds"}
        if unknown:
            raise ValueError(f"unknown field {sorted(unknown)[0]!r} in a stage report")
        return cls(
            name=d["name"],
            settings=d.get("settings", {}),
            summary=d.get("summary", {}),
            tables=d.get("tables", {}),
            arrays=d.get("arrays", {}),
            notes=list(d.get("notes", [])),
            seconds=float(d.get("seconds", 0.0)),
        )

    def __repr__(self) -> str:
        tables = ", ".join(f"{k}[{len(v)}]" for k, v in self.tables.items())
        summary = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in list(self.summary.items())[:6])
        return f"StageReport({self.name}: {summary}; tables: {tables})"
