from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from stage_helpers import tiny_world_model  # noqa: E402
from workbench.models.adapters import tiny_model  # noqa: E402
from workbench.session import Session  # noqa: E402
from workbench.stages import StageReport  # noqa: E402


def test_start_with_text_to_video_model():
    m = tiny_world_model()
    s = Session.start(m, seed=3)
    assert s.can_generate and s.seed == 3 and s.model_name == "tiny-world-2blocks"
    assert s.fp_transformer is m.transformer
    assert s.qtransformer is not m.transformer
    with torch.no_grad():
        s.qtransformer.proj_out.weight.add_(1.0)
    assert not torch.equal(s.qtransformer.proj_out.weight, m.transformer.proj_out.weight)
    assert s.calibration is None and s.reports == [] and s.quant_config is None
    assert "tiny-world-2blocks" in repr(s)


def test_start_with_bare_transformer():
    t = tiny_model("WanTransformer3DModel")
    s = Session.start(t)
    assert not s.can_generate and s.fp_transformer is t
    assert s.adapter.class_name == "WanTransformer3DModel"
    with pytest.raises(ValueError, match="text-to-video"):
        s.require_generator("some_stage")


def test_start_rejects_other_things():
    with pytest.raises(TypeError, match="Session.start"):
        Session.start("tiny-world")


def test_reports_and_rng():
    s = Session.start(tiny_model("WanTransformer3DModel"), seed=1)
    r1, r2 = StageReport("a"), StageReport("a", summary={"x": 1.0})
    s.add(r1)
    s.add(r2)
    assert s.last_report("a") is r2 and s.last_report("b") is None
    r1.tables["ranking"] = [{"x": 1}]
    assert s.last_report("a", table="ranking") is r1  # a later report without the table does not hide it
    assert s.last_report("a", table="other") is None
    assert torch.equal(torch.rand(3, generator=s.rng(5)), torch.rand(3, generator=s.rng(5)))
