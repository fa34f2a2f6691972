"""Quantization stages: plain functions `stage(session, settings) -> StageReport`.

    from workbench.stages import collect_calibration, analyze_error_sources, apply_quantization, \
        assign_mixed_precision, calibrate_ranges

Each stage reads and updates a `workbench.session.Session`, never prints or plots, and returns a
`StageReport` (also appended to `session.reports`). `STAGES` maps the names used in recipes to
(function, settings dataclass).
"""

from __future__ import annotations

from workbench.stages.analysis import AnalysisSettings, analyze_error_sources
from workbench.stages.calibration import (
    CalibrationCache,
    CalibrationEntry,
    CalibrationSettings,
    calibration_from_inputs,
    calibration_prompts,
    collect_calibration,
    collect_layer_inputs,
)
from workbench.stages.mixed_precision import MixedPrecisionSettings, assign_mixed_precision
from workbench.stages.ptq import PTQSettings, apply_quantization, layer_formats, weight_budget
from workbench.stages.ranges import RangeSettings, calibrate_ranges
from workbench.stages.report import StageReport

STAGES = {
    "collect_calibration": (collect_calibration, CalibrationSettings),
    "analyze_error_sources": (analyze_error_sources, AnalysisSettings),
    "apply_quantization": (apply_quantization, PTQSettings),
    "assign_mixed_precision": (assign_mixed_precision, MixedPrecisionSettings),
    "calibrate_ranges": (calibrate_ranges, RangeSettings),
}

__all__ = [
    "STAGES",
    "AnalysisSettings",
    "CalibrationCache",
    "CalibrationEntry",
    "CalibrationSettings",
    "MixedPrecisionSettings",
    "PTQSettings",
    "RangeSettings",
    "StageReport",
    "analyze_error_sources",
    "apply_quantization",
    "assign_mixed_precision",
    "calibrate_ranges",
    "calibration_from_inputs",
    "calibration_prompts",
    "collect_calibration",
    "collect_layer_inputs",
    "layer_formats",
    "weight_budget",
]
