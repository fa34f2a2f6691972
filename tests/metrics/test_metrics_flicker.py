"""Flicker vs FP: zero for identical clips, exact on hand-made clips, blind to static offsets, rises with noise."""
from __future__ import annotations

import pytest
import torch

from metrics_helpers import add_noise

from workbench.metrics import FlickerScores, flicker_ratio, flicker_score, flicker_vs_fp, temporal_diff_error
from workbench.metrics.flicker import FLICKER_EPS
from workbench.world import all_scenes, render, sample_starts


@pytest.fixture(scope="module")
def clips() -> torch.Tensor:
    """Eight rendered world clips (8, 3, 8, 32, 32): real motion, so frame differences are not trivial."""
    scenes = all_scenes()[::24]
    return render(scenes, sample_starts(scenes, torch.Generator().manual_seed(3)))


def _frames(*levels: float) -> torch.Tensor:
    """One clip (1, 3, F, 2, 2) whose frame t is the constant levels[t]."""
    return torch.tensor(levels).view(1, 1, -1, 1, 1).expand(1, 3, len(levels), 2, 2).clone()


def test_identical_clips(clips):
    assert torch.equal(temporal_diff_error(clips, clips), torch.zeros(len(clips)))
    assert torch.equal(flicker_ratio(clips, clips), torch.ones(len(clips)))


def test_hand_computation():
    fp, q = _frames(0.2, 0.4, 0.6), _frames(0.2, 0.5, 0.5)
    # d(fp) = (0.2, 0.2), d(q) = (0.3, 0.0): |d(q) - d(fp)| = (0.1, 0.2)
    assert float(temporal_diff_error(q, fp)[0]) == pytest.approx(0.15, abs=1e-6)
    assert float(flicker_score(q)[0]) == pytest.approx(0.15, abs=1e-6)
    assert float(flicker_score(fp)[0]) == pytest.approx(0.2, abs=1e-6)
    assert float(flicker_ratio(q, fp)[0]) == pytest.approx((0.15 + FLICKER_EPS) / (0.2 + FLICKER_EPS), rel=1e-5)


def test_alternating_and_still_clips():
    assert float(flicker_score(_frames(0.0, 1.0, 0.0, 1.0))[0]) == pytest.approx(1.0)
    still = _frames(0.3, 0.3, 0.3)
    assert float(flicker_score(still)[0]) == 0.0
    assert float(flicker_ratio(still, still)[0]) == 1.0  # eps keeps 0 / 0 at 1


def test_static_offset_is_not_temporal_error(clips):
    fp = clips * 0.8
    tinted = fp + 0.1  # wrong in every frame the same way: a fidelity error, not flicker
    assert (tinted - fp).abs().mean() > 0.05
    assert float(temporal_diff_error(tinted, fp).max()) < 1e-6 < float(flicker_score(fp).min())
    assert float(temporal_diff_error(clips * 0.7, fp).min()) > 0.05 * float(flicker_score(fp).min())  # scaled motion is not


def test_noise_raises_error_and_ratio(clips):
    scores = [flicker_vs_fp(add_noise(clips, s, seed=1), clips).mean() for s in (0.02, 0.05, 0.1)]
    tde = [m["temporal_diff_error"] for m in scores]
    ratio = [m["flicker_ratio"] for m in scores]
    assert tde[0] > 0 and tde[0] < tde[1] < tde[2]
    assert 1.0 < ratio[0] < ratio[1] < ratio[2]


def test_frozen_clip_flickers_less(clips):
    frozen = clips[:, :, :1].expand_as(clips).contiguous()
    assert float(flicker_score(frozen).max()) == 0.0
    assert float(flicker_ratio(frozen, clips).max()) < 0.1
    assert float(temporal_diff_error(frozen, clips).min()) > 0


def test_flicker_vs_fp_matches_the_functions(clips):
    q = add_noise(clips, 0.05, seed=2)
    f = flicker_vs_fp(q, clips)
    assert isinstance(f, FlickerScores)
    assert torch.allclose(f.temporal_diff_error, temporal_diff_error(q, clips))
    assert torch.allclose(f.flicker_ratio, flicker_ratio(q, clips))
    assert torch.allclose(f.flicker, flicker_score(q)) and torch.allclose(f.flicker_fp, flicker_score(clips))
    m = f.mean()
    assert set(m) == {"temporal_diff_error", "flicker_ratio", "flicker", "flicker_fp"}
    assert m["flicker"] == pytest.approx(float(flicker_score(q).mean()))


def test_single_clip_gives_a_scalar(clips):
    assert temporal_diff_error(clips[0], clips[0]).shape == ()
    assert flicker_score(clips[0]).shape == () and flicker_ratio(clips[0], clips[0]).shape == ()


def test_errors(clips):
    with pytest.raises(ValueError, match="at least 2 frames"):
        flicker_score(clips[:, :, :1])
    with pytest.raises(ValueError, match="at least 2 frames"):
        temporal_diff_error(clips[:, :, :1], clips[:, :, :1])
    with pytest.raises(ValueError, match="same shape"):
        flicker_ratio(clips, clips[:4])
    bad = clips[:1].clone()
    bad[0, 0, 2, 3, 3] = float("nan")
    with pytest.raises(ValueError, match="NaN values"):
        flicker_vs_fp(bad, clips[:1])
