"""Frechet distance on interpretable features: ~0 for a set against itself, growing with distortion."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from metrics_helpers import add_noise, box_blur3

from workbench.metrics import FEATURE_NAMES, frechet_distance, video_features


def test_features_shape_and_finite(gt_small):
    _, clips = gt_small
    f = video_features(clips)
    assert f.shape == (clips.shape[0], len(FEATURE_NAMES))
    assert torch.isfinite(f).all()


def test_self_distance_is_zero_and_grows_with_distortion(gt_small):
    _, clips = gt_small
    ref = video_features(clips)
    assert frechet_distance(ref, ref) == pytest.approx(0.0, abs=1e-4)
    d = [frechet_distance(video_features(add_noise(clips, s, seed=5)), ref) for s in (0.02, 0.05, 0.1, 0.2)]
    assert d[0] > 1e-3
    assert all(a < b for a, b in zip(d, d[1:])), d
    assert frechet_distance(video_features(box_blur3(clips)), ref) > 1e-3
    assert frechet_distance(video_features(clips * 0.7), ref) > 1e-3


def test_known_value_one_dimension():
    g = np.random.default_rng(0)
    a = g.normal(0.0, 1.0, size=(4000, 1))
    b = g.normal(2.0, 3.0, size=(4000, 1))
    expected = (a.mean() - b.mean()) ** 2 + (a.std(ddof=1) - b.std(ddof=1)) ** 2  # 1-D: (mu diff)^2 + (sigma diff)^2
    assert frechet_distance(a, b) == pytest.approx(expected, rel=1e-4)
    assert frechet_distance(a, b) == pytest.approx(frechet_distance(b, a), rel=1e-6)


def test_small_sets_and_bad_input():
    f = torch.rand(3, 5)
    assert frechet_distance(f, f) == pytest.approx(0.0, abs=1e-4)
    assert frechet_distance(f[:1], f[:1]) == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(ValueError, match="same D"):
        frechet_distance(f, torch.rand(3, 4))
    with pytest.raises(ValueError, match="NaN"):
        frechet_distance(f, torch.full((3, 5), float("nan")))
