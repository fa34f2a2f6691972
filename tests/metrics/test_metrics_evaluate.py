"""evaluate_videos: a flat, JSON-ready dict of plain floats, right on ground truth, sensitive to damage."""
from __future__ import annotations

import json

from metrics_helpers import add_noise

from workbench.metrics import evaluate_videos

BASE_KEYS = {"n_videos", "oracle_accuracy", "exact_match", "color_accuracy", "shape_accuracy", "direction_accuracy",
             "speed_accuracy", "found_rate", "temporal_consistency"}
REF_KEYS = {"psnr_vs_fp", "ssim_vs_fp", "frechet_distance"}


def test_ground_truth_without_reference(gt_small):
    scenes, clips = gt_small
    out = evaluate_videos(clips, scenes)
    assert BASE_KEYS <= set(out) and not (REF_KEYS & set(out))
    assert all(type(v) is float for v in out.values())
    assert out["oracle_accuracy"] == 1.0 and out["exact_match"] == 1.0
    assert out["temporal_consistency"] >= 0.98
    json.dumps(out, allow_nan=False)


def test_against_reference(gt_small):
    scenes, clips = gt_small
    same = evaluate_videos(clips, scenes, reference=clips)
    assert BASE_KEYS | REF_KEYS <= set(same)
    assert same["psnr_vs_fp"] == 100.0 and abs(same["ssim_vs_fp"] - 1.0) < 1e-6 and same["frechet_distance"] < 1e-4
    noisy = evaluate_videos(add_noise(clips, 0.05, seed=9), scenes, reference=clips)
    assert noisy["psnr_vs_fp"] < 40 and noisy["ssim_vs_fp"] < 0.9 and noisy["frechet_distance"] > 1e-3
    assert noisy["temporal_consistency"] < same["temporal_consistency"]
    assert noisy["oracle_accuracy"] >= 0.95
    json.dumps(noisy, allow_nan=False)


def test_single_video(gt_small):
    scenes, clips = gt_small
    out = evaluate_videos(clips[0], scenes[:1], reference=clips[0])
    assert out["n_videos"] == 1.0 and out["oracle_accuracy"] == 1.0
    json.dumps(out, allow_nan=False)
