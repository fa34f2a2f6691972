"""evaluate_videos without scenes (a real video model: no oracle): fidelity and flicker vs FP, CLIP scores with a
CLIP model, never an oracle key; with scenes the tiny world's output keeps exactly its old keys."""
from __future__ import annotations

import json

import pytest
import torch
from clip_fixtures import one_torch_thread, tiny_clip_dir  # noqa: F401 (fixtures)
from metrics_helpers import add_noise

from workbench.metrics import (
    SCENE_ONLY_KEYS, clip_frechet_distance, clip_text_video_score, evaluate_videos, flicker_vs_fp, load_clip, psnr,
    ssim,
)

# what evaluate_videos(clips, scenes, reference=...) returned before CLIP / flicker existed, in its order
WORLD_KEYS = ["n_videos", "oracle_accuracy", "exact_match", "color_accuracy", "shape_accuracy", "direction_accuracy",
              "speed_accuracy", "found_rate", "color_stability", "size_stability", "background_stability",
              "motion_smoothness", "temporal_consistency", "psnr_vs_fp", "ssim_vs_fp", "frechet_distance"]
FLICKER_REF_KEYS = {"flicker_score", "temporal_diff_error_vs_fp", "flicker_ratio_vs_fp"}


@pytest.fixture(scope="module")
def clip(tiny_clip_dir):
    return load_clip(tiny_clip_dir)


@pytest.fixture(scope="module")
def small(gt_small):
    """Six ground-truth clips with their scenes and prompts."""
    scenes, clips = gt_small
    return scenes[:6], [s.prompt for s in scenes[:6]], clips[:6]


def _real_like(seed: int = 0) -> torch.Tensor:
    """Clips at a size the tiny world never makes (2, 3, 5, 40, 56): nothing may assume its segmentation."""
    g = torch.Generator().manual_seed(seed)
    base = torch.rand(2, 3, 2, 5, 7, generator=g)  # slow change over time, like real video
    return torch.nn.functional.interpolate(base, size=(5, 40, 56), mode="trilinear").clamp(0, 1)


def test_no_scenes_no_reference():
    out = evaluate_videos(_real_like())
    assert set(out) == {"n_videos", "flicker_score"}
    assert out["n_videos"] == 2.0 and out["flicker_score"] > 0


def test_no_scenes_with_reference():
    fp = _real_like()
    same = evaluate_videos(fp, reference=fp)
    assert set(same) == {"n_videos", "psnr_vs_fp", "ssim_vs_fp"} | FLICKER_REF_KEYS
    assert not set(SCENE_ONLY_KEYS) & set(same)
    assert same["psnr_vs_fp"] == 100.0 and same["ssim_vs_fp"] == pytest.approx(1.0, abs=1e-6)
    assert same["temporal_diff_error_vs_fp"] == 0.0 and same["flicker_ratio_vs_fp"] == 1.0
    q = add_noise(fp, 0.05, seed=1)
    noisy = evaluate_videos(q, reference=fp)
    assert noisy["psnr_vs_fp"] == pytest.approx(float(psnr(q, fp).mean()))
    assert noisy["ssim_vs_fp"] == pytest.approx(float(ssim(q, fp).mean()))
    f = flicker_vs_fp(q, fp).mean()
    assert noisy["temporal_diff_error_vs_fp"] == pytest.approx(f["temporal_diff_error"]) and f["temporal_diff_error"] > 0.01
    assert noisy["flicker_ratio_vs_fp"] == pytest.approx(f["flicker_ratio"]) and f["flicker_ratio"] > 1.2
    assert all(type(v) is float for v in noisy.values())
    json.dumps(noisy, allow_nan=False)


def test_clip_scores(clip, small):
    _, prompts, clips = small
    q = add_noise(clips, 0.1, seed=2)
    out = evaluate_videos(q, reference=clips, clip=clip, prompts=prompts)
    assert set(out) == {"n_videos", "psnr_vs_fp", "ssim_vs_fp", "clip_score", "clip_fd_vs_fp"} | FLICKER_REF_KEYS
    assert out["clip_score"] == pytest.approx(float(clip_text_video_score(q, prompts, clip).mean()), abs=1e-5)
    assert out["clip_fd_vs_fp"] == pytest.approx(clip_frechet_distance(q, clips, clip), rel=1e-6)
    assert out["clip_fd_vs_fp"] > evaluate_videos(clips, reference=clips, clip=clip)["clip_fd_vs_fp"]
    assert set(evaluate_videos(q, clip=clip, prompts=prompts)) == {"n_videos", "flicker_score", "clip_score"}
    assert set(evaluate_videos(q, reference=clips, clip=clip)) == {"n_videos", "psnr_vs_fp", "ssim_vs_fp",
                                                                   "clip_fd_vs_fp"} | FLICKER_REF_KEYS
    json.dumps(out, allow_nan=False)


def test_with_scenes_the_keys_are_unchanged(clip, small):
    scenes, prompts, clips = small
    q = add_noise(clips, 0.05, seed=3)
    out = evaluate_videos(q, scenes, reference=clips)
    assert list(out) == WORLD_KEYS
    with_flicker = evaluate_videos(q, scenes, reference=clips, flicker=True)
    assert set(with_flicker) == set(WORLD_KEYS) | FLICKER_REF_KEYS
    assert {k: with_flicker[k] for k in WORLD_KEYS} == out
    with_clip = evaluate_videos(q, scenes, reference=clips, clip=clip, prompts=prompts)
    assert set(with_clip) == set(WORLD_KEYS) | {"clip_score", "clip_fd_vs_fp"}
    assert {k: with_clip[k] for k in WORLD_KEYS} == out
    assert set(evaluate_videos(_real_like(), flicker=False)) == {"n_videos"}


def test_errors(clip, small):
    _, prompts, clips = small
    with pytest.raises(ValueError, match="6 videos but 2 prompts; pass one prompt per video"):
        evaluate_videos(clips, prompts=prompts[:2], clip=clip)
    with pytest.raises(ValueError, match="clip needs prompts.*or a reference"):
        evaluate_videos(clips, clip=clip)
    with pytest.raises(ValueError, match="same shape"):
        evaluate_videos(clips, reference=clips[:2])
    with pytest.raises(ValueError, match="at least 2 frames"):
        evaluate_videos(clips[:, :, :1])
    with pytest.raises(ValueError, match=r"\(B, 3, F, H, W\)"):
        evaluate_videos(torch.zeros(2, 4, 8, 32, 32))
