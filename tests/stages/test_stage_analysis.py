from __future__ import annotations

import pytest

from workbench.session import Session
from workbench.stages import AnalysisSettings, analyze_error_sources


def test_tables_cover_every_quantized_layer(pipeline):
    session, reports = pipeline
    r = reports["analyze_error_sources"]
    layers = {row["layer"] for row in r.tables["activations"]}
    assert len(layers) == 20  # 2 blocks x (4 self-attn + 4 cross-attn + 2 FFN); embeddings/proj_out stay FP
    assert layers == {row["layer"] for row in r.tables["weights"]} == {row["layer"] for row in r.tables["layer_errors"]}
    for row in r.tables["activations"]:
        assert row["channel_outlier_ratio"] >= 1 and row["timestep_ratio"] >= 1 and row["token_range_ratio"] >= 1
        # a dynamic per-token range never loses to one static range for all timesteps and tokens
        assert row["act_err_token_dynamic"] <= row["act_err_tensor_static"] * 1.05
    for row in r.tables["layer_errors"]:
        assert row["output_rel_mse"] > 0 and row["layer_rel_mse"] > 0
    assert sorted(row["rank"] for row in r.tables["layer_errors"]) == list(range(1, 21))
    per_t = r.arrays["output_error_per_timestep"]
    assert all(len(v) == 1 for v in per_t.values())


def test_metric_decoupled_rankings(pipeline):
    session, reports = pipeline
    rows = reports["analyze_error_sources"].tables["sensitivity"]
    groups = reports["analyze_error_sources"].arrays["groups"]
    assert [r["group"] for r in rows] == list(groups)
    assert set(groups) == {f"blocks.{b}.{g}" for b in (0, 1) for g in ("attn", "cross", "ff")}
    n = len(rows)
    for key in ("content_rank", "temporal_rank", "priority_rank"):
        assert sorted(r[key] for r in rows) == list(range(1, n + 1))
    for r in rows:
        assert 0 <= r["psnr_vs_fp"] <= 100
        assert r["temporal_damage"] == pytest.approx(r["motion_drop"] + r["tc_drop"])
    # attention modules travel with their projections
    assert "blocks.0.attn1" in groups["blocks.0.attn"]


def test_parts_can_be_switched_off_and_need_a_generator_for_videos(pipeline_copy):
    session, reports = pipeline_copy
    r = analyze_error_sources(session, AnalysisSettings(activations=False, weights=True, layer_errors=False,
                                                        sensitivity=False))
    assert set(r.tables) == {"weights"}
    # the partial re-run does not hide the earlier ranking from mixed precision
    assert session.last_report("analyze_error_sources", table="sensitivity") is reports["analyze_error_sources"]
    bare = Session.start(session.fp_transformer)
    bare.calibration = session.calibration
    with pytest.raises(ValueError, match="text-to-video"):
        analyze_error_sources(bare, AnalysisSettings(activations=False, weights=False, layer_errors=False))
