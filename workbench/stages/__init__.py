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
from workbench.stages.distill import DistillDivergedError, DistillSettings, distill
from workbench.stages.mpq import MPQSettings, mpq_distill
from workbench.stages.qvdit import QVDiTSettings, qvdit_distill
from workbench.stages.s2q import SalientSelectionSettings, SparseTokenSettings, select_salient_calibration, sparse_token_distill

STAGES = {
    "collect_calibration": (collect_calibration, CalibrationSettings),
    "analyze_error_sources": (analyze_error_sources, AnalysisSettings),
    "apply_quantization": (apply_quantization, PTQSettings),
    "assign_mixed_precision": (assign_mixed_precision, MixedPrecisionSettings),
    "calibrate_ranges": (calibrate_ranges, RangeSettings),
    "distill": (distill, DistillSettings),
    "select_salient_calibration": (select_salient_calibration, SalientSelectionSettings),
    "sparse_token_distill": (sparse_token_distill, SparseTokenSettings),
    "qvdit_distill": (qvdit_distill, QVDiTSettings),
    "mpq_distill": (mpq_distill, MPQSettings),
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
    "DistillDivergedError",
    "DistillSettings",
    "MPQSettings",
    "QVDiTSettings",
    "SalientSelectionSettings",
    "SparseTokenSettings",
    "distill",
    "mpq_distill",
    "qvdit_distill",
    "select_salient_calibration",
    "sparse_token_distill",
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
