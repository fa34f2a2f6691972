"""The export stage: write the session's quantized transformer in the packed low-bit format (`workbench.io.export`)
and report what was stored (byte sizes, one row per layer: format, storage, kernel, bytes)."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Any

from workbench.io.export import DEFAULT_SHARD_BYTES, export_model
from workbench.io.packed import read_manifest
from workbench.stages.registry import stage
from workbench.stages.report import StageReport


@dataclass
class ExportSettings:
    """out_dir: where to write (must be empty unless force). force: overwrite a previous export there.
    max_shard_mb: size of one safetensors file before a new one starts."""

    out_dir: str = "export"
    force: bool = False
    max_shard_mb: float = DEFAULT_SHARD_BYTES / 2**20

    def __post_init__(self) -> None:
        if not self.out_dir:
            raise ValueError("out_dir must name a directory")
        if not self.max_shard_mb > 0:
            raise ValueError(f"max_shard_mb must be > 0, got {self.max_shard_mb}")


@stage(ExportSettings)
def export_quantized(session: Any, settings: ExportSettings | None = None) -> StageReport:
    """The export stage: `export_model(session.qtransformer, ...)` with the session's recipe; the report
    holds the byte sizes and one row per exported layer (format, storage, kernel, bytes)."""
    s = settings or ExportSettings()
    t0 = time.perf_counter()
    out = export_model(session.qtransformer, s.out_dir, session.recipe, s.force, int(s.max_shard_mb * 2**20))
    manifest = read_manifest(out)
    session.state["export_dir"] = str(out)
    rows = [
        {
            "layer": name,
            "shape": "x".join(map(str, e["shape"])),
            "weight": None if e["weight"] is None else e["weight"]["format"],
            "granularity": None if e["weight"] is None else e["weight"]["granularity"],
            "storage": None if e["weight"] is None else e["weight"]["storage"],
            "act": None if e["act"] is None else e["act"]["format"],
            "kernel": e["kernel"],
            "bytes": e["bytes"]["packed"],
            "fp32_bytes": e["bytes"]["fp32"],
        }
        for name, e in manifest["layers"].items()
    ]
    report = StageReport(
        name="export_quantized",
        settings=asdict(s),
        summary={k: v for k, v in manifest["sizes"].items() if isinstance(v, (int, float))},
        tables={"layers": rows, "files": [{k: f[k] for k in ("name", "bytes", "sha256")} for f in manifest["files"]]},
        notes=[f"exported to {out}"],
        seconds=time.perf_counter() - t0,
    )
    return session.add(report)


__all__ = ["ExportSettings", "export_quantized"]
