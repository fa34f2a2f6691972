"""Quantization stages: plain functions `stage(session, settings) -> StageReport`, each declared where it is
defined with `@stage(Settings, figures=...)` (`workbench.stages.registry`).

    from workbench.stages import collect_calibration, analyze_error_sources, apply_quantization, \
        assign_mixed_precision, calibrate_ranges

Each stage reads and updates a `workbench.session.Session`, never prints or plots, and returns a
`StageReport` (also appended to `session.reports`). `STAGES` maps the names used in recipes to a
`StageInfo` (function, settings dataclass, figures); importing this package registers every stage.
"""

from __future__ import annotations

from workbench.stages.analysis import AnalysisSettings, analyze_error_sources
from workbench.stages.attention_kernels import AttentionKernelSettings, choose_attention_kernels
from workbench.stages.calibration import (
    CalibrationCache,
    CalibrationEntry,
    CalibrationSettings,
    calibration_from_inputs,
    calibration_prompts,
    collect_calibration,
    collect_layer_inputs,
)
from workbench.stages.distill import DistillDivergedError, DistillSettings, distill
from workbench.stages.export import ExportSettings, export_quantized
from workbench.stages.mixed_precision import MixedPrecisionSettings, assign_mixed_precision
from workbench.stages.mpq import MPQSettings, mpq_distill
from workbench.stages.ptq import PTQSettings, apply_quantization, layer_formats, weight_budget
from workbench.stages.qvdit import QVDiTSettings, qvdit_distill
from workbench.stages.ranges import RangeSettings, calibrate_ranges
from workbench.stages.registry import STAGES, StageInfo, stage
from workbench.stages.report import StageReport
from workbench.stages.s2q import SalientSelectionSettings, SparseTokenSettings, select_salient_calibration, sparse_token_distill

__all__ = [
    "STAGES",
    "AnalysisSettings",
    "AttentionKernelSettings",
    "CalibrationCache",
    "CalibrationEntry",
    "CalibrationSettings",
    "DistillDivergedError",
    "DistillSettings",
    "ExportSettings",
    "MPQSettings",
    "MixedPrecisionSettings",
    "PTQSettings",
    "QVDiTSettings",
    "RangeSettings",
    "SalientSelectionSettings",
    "SparseTokenSettings",
    "StageInfo",
    "StageReport",
    "analyze_error_sources",
    "apply_quantization",
    "assign_mixed_precision",
    "calibrate_ranges",
    "calibration_from_inputs",
    "calibration_prompts",
    "choose_attention_kernels",
    "collect_calibration",
    "collect_layer_inputs",
    "distill",
    "export_quantized",
    "layer_formats",
    "mpq_distill",
    "qvdit_distill",
    "select_salient_calibration",
    "sparse_token_distill",
    "stage",
    "weight_budget",
]
