"""Every stage returns a JSON-ready report with finite numbers and plotly figures."""
from __future__ import annotations

import json

import plotly.graph_objects as go
import pytest

from stage_helpers import PIPELINE, finite_numbers
from workbench.stages import STAGES, StageReport


@pytest.mark.parametrize("name", PIPELINE)
def test_report_is_plain_finite_and_draws(pipeline, name):
    session, reports = pipeline
    r = reports[name]
    assert isinstance(r, StageReport) and r.name == name
    assert r in session.reports
    d = r.to_dict()
    json.dumps(d, allow_nan=False)
    assert finite_numbers(d)
    assert r.summary and all(isinstance(v, (int, float)) for v in r.summary.values())
    figs = r.figures()
    assert figs and all(isinstance(f, go.Figure) for f in figs)
    back = StageReport.from_dict(json.loads(json.dumps(d)))
    assert back.to_dict() == d
    assert len(back.figures()) == len(figs)


def test_reports_in_stage_order(pipeline):
    session, _ = pipeline
    assert set(PIPELINE) <= set(STAGES)
    assert [r.name for r in session.reports] == PIPELINE
    assert session.last_report("apply_quantization") is session.reports[2]
