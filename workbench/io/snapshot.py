"""Session snapshots: the state of a recipe run after a stage, so an interrupted run resumes where it stopped.

    save_snapshot(session, path, fp, stage_index)       # after every stage of a resumable run
    session = restore_snapshot(model, path, fp)         # a fresh Session equal to the saved one

A snapshot is one checkpoint (`workbench.io.checkpoint`: safetensors + JSON, never executed): the quantized
transformer's state with its QuantConfig and extras (rebuilt as `workbench.io.rundir` rebuilds a saved
model), the calibration cache, the stage reports, the session's stage-to-stage values and the recipe.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from workbench.io.checkpoint import load_checkpoint, save_checkpoint
from workbench.io.plain import plain

CACHE = "__calibration_cache__"


def _encode(value: Any) -> Any:
    from workbench.stages.calibration import CalibrationCache

    if isinstance(value, CalibrationCache):
        return {CACHE: value.to_tree()}
    if isinstance(value, dict):
        return {k: _encode(v) for k, v in value.items()}
    return value


def _decode(value: Any) -> Any:
    from workbench.stages.calibration import CalibrationCache

    if isinstance(value, dict) and CACHE in value:
        return CalibrationCache.from_tree(value[CACHE])
    if isinstance(value, dict):
        return {k: _decode(v) for k, v in value.items()}
    return value


def save_snapshot(session, path: Path, fp: str, stage_index: int) -> None:  # noqa: ANN001
    """Write the session as it is after stage `stage_index` (0-based) under run fingerprint `fp`."""
    from workbench.io.rundir import extras_manifest

    q = session.qtransformer
    save_checkpoint(path, fp, {
        "stage_index": stage_index,
        "seed": session.seed,
        "recipe": plain(session.recipe),
        "quant_config": None if session.quant_config is None else session.quant_config.to_dict(),
        "extras": extras_manifest(q) if session.quant_config is not None else {},
        "qstate": q.state_dict() if session.quant_config is not None else None,
        "calibration": None if session.calibration is None else session.calibration.to_tree(),
        "reports": [r.to_dict() for r in session.reports],
        "state": _encode(dict(session.state)),
    })


def restore_snapshot(model: Any, path: Path, fp: str, progress: bool = False):  # noqa: ANN201
    """(session, stage_index) restored from the snapshot at `path` on `model`, or None when there is none."""
    from workbench.io.rundir import rebuild_quantized
    from workbench.quant import QuantConfig
    from workbench.session import Session
    from workbench.stages.calibration import CalibrationCache
    from workbench.stages.report import StageReport

    saved = load_checkpoint(path, fp)
    if saved is None:
        return None
    session = Session.start(model, seed=int(saved["seed"]), progress=progress)
    session.recipe = saved["recipe"]
    if saved["quant_config"] is not None:
        config = QuantConfig.from_dict(saved["quant_config"])
        session.qtransformer = rebuild_quantized(session.fp_transformer, config, saved["extras"], saved["qstate"],
                                                 where=str(path))
        session.quant_config = config
    if saved["calibration"] is not None:
        session.calibration = CalibrationCache.from_tree(saved["calibration"])
    session.reports = [StageReport.from_dict(r) for r in saved["reports"]]
    session.state = _decode(saved["state"])
    return session, int(saved["stage_index"])


__all__ = ["restore_snapshot", "save_snapshot"]
