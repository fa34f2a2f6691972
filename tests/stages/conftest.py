"""One small pipeline run shared by the stage tests (collect -> analyse -> quantize -> mixed precision -> ranges)."""
from __future__ import annotations

import copy

import pytest
import torch

from stage_helpers import PIPELINE, W4A8_STATIC, tiny_world_model
from workbench.session import Session
from workbench.stages import (
    AnalysisSettings,
    CalibrationSettings,
    MixedPrecisionSettings,
    PTQSettings,
    RangeSettings,
    analyze_error_sources,
    apply_quantization,
    assign_mixed_precision,
    calibrate_ranges,
    collect_calibration,
)


@pytest.fixture(scope="session")
def pipeline():
    """(session, {stage name: report}) after every stage ran once with small settings."""
    torch.manual_seed(0)
    session = Session.start(tiny_world_model(), seed=0)
    reports = {}
    reports["collect_calibration"] = collect_calibration(session, CalibrationSettings(prompts=2, steps=3))
    reports["analyze_error_sources"] = analyze_error_sources(
        session, AnalysisSettings(quant=W4A8_STATIC, timesteps=2, error_timesteps=1, prompts=1, steps=2, sample_rows=64))
    reports["apply_quantization"] = apply_quantization(session, PTQSettings(quant=W4A8_STATIC))
    reports["assign_mixed_precision"] = assign_mixed_precision(session, MixedPrecisionSettings(avg_weight_bits=5.0))
    reports["calibrate_ranges"] = calibrate_ranges(session, RangeSettings(
        alpha_search=[0.2, 0.5], observer="percentile", weight_observer="mse", timestep_wise=True, timestep_buckets=4, sample_rows=128))
    assert list(reports) == PIPELINE
    return session, reports


@pytest.fixture
def pipeline_copy(pipeline):
    """The pipeline's session with its own report list and state, for tests that run more stages on it
    (the session-scoped pipeline itself must stay as the fixture left it)."""
    session, reports = pipeline
    own = copy.copy(session)
    own.reports, own.state = list(session.reports), dict(session.state)
    return own, reports
