"""Temporal consistency: ~1 on ground truth, falling monotonically with noise, flicker and jitter."""
from __future__ import annotations

import torch
from metrics_helpers import add_noise

from workbench.metrics import temporal_consistency
from workbench.world import Scene, WorldConfig, render


def test_ground_truth_is_consistent(gt_one):
    _, clips = gt_one
    t = temporal_consistency(clips)
    assert float(t.temporal_consistency.min()) >= 0.98
    for comp in (t.color_stability, t.size_stability, t.background_stability, t.motion_smoothness):
        assert float(comp.min()) >= 0.98
    assert t.temporal_consistency.shape == (clips.shape[0],)


def test_noise_lowers_it_monotonically(gt_small):
    _, clips = gt_small
    totals = [float(temporal_consistency(add_noise(clips, s, seed=2)).temporal_consistency.mean())
              for s in (0.0, 0.02, 0.05, 0.1, 0.2)]
    assert all(a > b for a, b in zip(totals, totals[1:])), totals
    assert totals[0] >= 0.98


def test_background_flicker_lowers_background_stability(gt_small):
    _, clips = gt_small
    F = clips.shape[2]
    sign = torch.tensor([(-1.0) ** f for f in range(F)])
    scores = []
    for amp in (0.0, 0.02, 0.05, 0.1):
        flicker = (clips + 0.1 + amp * sign[None, None, :, None, None]).clamp(0, 1)  # whole frame pulses
        t = temporal_consistency(flicker)
        scores.append((float(t.background_stability.mean()), float(t.temporal_consistency.mean())))
    bg = [s[0] for s in scores]
    total = [s[1] for s in scores]
    assert all(a > b for a, b in zip(bg, bg[1:])), bg
    assert all(a > b for a, b in zip(total, total[1:])), total


def test_jitter_lowers_motion_smoothness():
    cfg = WorldConfig()
    scene = Scene("green", "square", "right")
    base = torch.tensor([16.0, 10.0])
    scores = []
    for amp in (0.0, 0.5, 1.0, 2.0):
        frames = []
        for f in range(cfg.frames):  # render each frame from a start shifted up/down by the jitter
            start = base + torch.tensor([amp * (-1) ** f, 0.0])
            frames.append(render([scene], start[None], cfg)[0][:, f])
        scores.append(float(temporal_consistency(torch.stack(frames, dim=1)).motion_smoothness))
    assert scores[0] >= 0.99
    assert all(a > b for a, b in zip(scores, scores[1:])), scores


def test_colour_drift_and_size_change_are_seen():
    cfg = WorldConfig()
    clip = render([Scene("red", "circle", "down")], torch.tensor([[10.0, 16.0]]), cfg)[0]
    ramp = torch.linspace(1.0, 0.5, cfg.frames)
    drift = clip * ramp[None, :, None, None]  # the object fades over the clip
    t = temporal_consistency(torch.stack([clip, drift]))
    assert float(t.color_stability[1]) < float(t.color_stability[0]) - 0.2


def test_missing_object_scores_zero_object_components():
    cfg = WorldConfig()
    t = temporal_consistency(torch.zeros(3, cfg.frames, cfg.height, cfg.width))
    assert float(t.color_stability[0]) == 0.0 and float(t.motion_smoothness[0]) == 0.0
    assert float(t.background_stability[0]) == 1.0
    assert float(t.temporal_consistency[0]) == 0.25
