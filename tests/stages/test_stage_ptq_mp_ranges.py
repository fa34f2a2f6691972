from __future__ import annotations

import copy

import pytest
import torch

from stage_helpers import W4A8_DYNAMIC, W4A8_STATIC, tiny_world_model
from workbench.models.generator import GenerationSettings
from workbench.quant import QuantLinear
from workbench.session import Session
from workbench.stages import (
    MixedPrecisionSettings,
    PTQSettings,
    RangeSettings,
    apply_quantization,
    assign_mixed_precision,
    calibrate_ranges,
)


def test_ptq_keeps_embeddings_and_output_in_fp(pipeline):
    session, reports = pipeline
    r = reports["apply_quantization"]
    assert r.summary["quantized_linears"] == 20
    kept = {row["layer"] for row in r.tables["kept_fp"]}
    assert "proj_out" in kept and "condition_embedder.time_proj" in kept
    assert not isinstance(session.fp_transformer.get_submodule("blocks.0.attn1.to_q"), QuantLinear)
    assert isinstance(session.qtransformer.get_submodule("blocks.0.attn1.to_q"), QuantLinear)


def test_ptq_errors():
    session = Session.start(tiny_world_model())
    with pytest.raises(ValueError, match="unknown role 'bogus'"):
        apply_quantization(session, PTQSettings(quant=W4A8_DYNAMIC, keep_fp_roles=["bogus"]))
    with pytest.raises(ValueError, match="collect_calibration"):
        apply_quantization(session, PTQSettings(quant=W4A8_STATIC))
    with pytest.raises(ValueError, match="unknown field 'wieght'"):
        apply_quantization(session, PTQSettings(quant={"wieght": {"format": "int4"}}))


def test_mixed_precision_respects_budget(pipeline):
    session, reports = pipeline
    r = reports["assign_mixed_precision"]
    assert r.summary["avg_weight_bits"] <= 5.0 + 1e-9
    assert r.summary["upgraded_layers"] > 0
    up = [row for row in r.tables["assignment"] if row["upgraded"]]
    assert all(row["w_bits"] == 8 for row in up)
    assert all(row["w_bits"] == 4 for row in r.tables["assignment"] if not row["upgraded"])
    for row in up:
        q = session.qtransformer.get_submodule(row["layer"])
        assert q.weight_quantizer.spec.bits == 8
        assert session.quant_config.specs_for(row["layer"])[0].bits == 8
    # the most sensitive unit (priority rank 1) is upgraded first by the greedy walk
    units = r.tables["units"]
    first = min(units, key=lambda u: u["rank"])
    assert first["chosen"]


def test_mixed_precision_needs_a_ranking():
    session = Session.start(tiny_world_model())
    apply_quantization(session, PTQSettings(quant=W4A8_DYNAMIC))
    with pytest.raises(ValueError, match="analyze_error_sources"):
        assign_mixed_precision(session, MixedPrecisionSettings())
    with pytest.raises(ValueError, match="2..8"):
        MixedPrecisionSettings(high_bits=9)


def test_knapsack_fills_budget(pipeline):
    session = copy.deepcopy(pipeline[0])
    r = assign_mixed_precision(session, MixedPrecisionSettings(avg_weight_bits=6.0, method="knapsack"))
    assert r.summary["avg_weight_bits"] <= 6.0 + 1e-9
    assert r.summary["upgraded_units"] >= 1


def test_ranges_report(pipeline):
    session, reports = pipeline
    r = reports["calibrate_ranges"]
    rows = r.tables["layer_errors"]
    assert len(rows) == 20
    assert r.summary["static_layers"] == 20
    # no layer leaves the stage worse than it came in: where the new observer / balancing lost, the layer
    # kept its previous quantizer, and the report says which
    assert all(row["err_after"] <= row["err_before"] for row in rows)
    assert r.summary["mean_err_after"] < r.summary["mean_err_before"]
    kept = {row["layer"] for row in rows if row["kept_previous"]}
    assert r.summary["kept_previous_layers"] == len(kept) < len(rows) // 2
    assert all(k in r.notes[0] for k in kept) if kept else not r.notes
    ranges = r.tables["ranges"]
    assert all(row["timestep_wise"] and row["observer"] == "percentile" for row in ranges if row["layer"] not in kept)
    assert all(row["observer"] != "percentile" for row in ranges if row["layer"] in kept)
    assert all(0 < row["clip_ratio"] <= 1.0 + 1e-6 for row in ranges)
    assert len(r.arrays["bucket_ranges"]) == 20 - len(kept) and all(len(v) == 4 for v in r.arrays["bucket_ranges"].values())
    assert {"err_minmax", "err_percentile", "err_mse"} <= set(r.tables["observers"][0])
    q = session.qtransformer.get_submodule(next(row["layer"] for row in ranges if row["layer"] not in kept))
    assert q.input_quantizer.spec.timestep_wise and q.input_quantizer.calibrated
    assert q.weight_quantizer.spec.observer == "mse" and session.quant_config.weight.observer == "mse"
    # mixed-precision rules survive the re-spec
    up = [row["layer"] for row in reports["assign_mixed_precision"].tables["assignment"] if row["upgraded"]]
    assert session.qtransformer.get_submodule(up[0]).weight_quantizer.spec.bits == 8


def test_ranges_need_quantized_copy():
    session = Session.start(tiny_world_model())
    with pytest.raises(ValueError, match="apply_quantization"):
        calibrate_ranges(session)
    with pytest.raises(ValueError, match="observer"):
        RangeSettings(observer="median")


def test_quantized_model_generates(pipeline):
    session, _ = pipeline
    m = session.fp_model
    q = m.generate(["a red circle moving left"], [5], GenerationSettings(steps=2), transformer=session.qtransformer)
    f = m.generate(["a red circle moving left"], [5], GenerationSettings(steps=2))
    assert torch.isfinite(q).all() and q.shape == f.shape
    assert 0 < (q - f).abs().mean() < 0.2
