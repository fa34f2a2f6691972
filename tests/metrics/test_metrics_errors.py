"""Bad input fails loudly: wrong shapes name the expected layout, NaN videos (a diverged model) are refused."""
from __future__ import annotations

import pytest
import torch

from workbench.metrics import (
    evaluate_videos, oracle_scores, psnr, read_video, segment, ssim, temporal_consistency, video_features,
)
from workbench.world import Scene

SCENE = Scene("red", "circle", "left")


@pytest.mark.parametrize("shape", [(8, 32, 32), (4, 8, 32, 32), (1, 8, 3, 32, 32)])
def test_read_video_wrong_shape(shape):
    with pytest.raises(ValueError, match=r"\(3, F, H, W\)"):
        read_video(torch.zeros(shape))


@pytest.mark.parametrize("fn", [lambda v: oracle_scores(v, [SCENE] * v.shape[0]), temporal_consistency, video_features,
                                lambda v: evaluate_videos(v, [SCENE] * v.shape[0])])
def test_batch_functions_wrong_shape(fn):
    with pytest.raises(ValueError, match=r"\(B, 3, F, H, W\)"):
        fn(torch.zeros(2, 4, 8, 32, 32))
    with pytest.raises(ValueError, match=r"\(B, 3, F, H, W\)"):
        fn(torch.zeros(2, 3, 32, 32))


@pytest.mark.parametrize("fn", [read_video, segment, temporal_consistency, video_features,
                                lambda v: oracle_scores(v, [SCENE]), lambda v: evaluate_videos(v, [SCENE]),
                                lambda v: psnr(v, torch.zeros_like(v)), lambda v: ssim(torch.zeros_like(v), v)])
def test_nan_video_is_refused(fn):
    v = torch.zeros(3, 8, 32, 32)
    v[0, 3, 5, 5] = float("nan")
    with pytest.raises(ValueError, match="NaN values"):
        fn(v)


def test_inf_video_is_refused():
    v = torch.zeros(3, 8, 32, 32)
    v[1, 0, 0, 0] = float("inf")
    with pytest.raises(ValueError, match="infinite"):
        read_video(v)


def test_mismatches():
    v = torch.zeros(2, 3, 8, 32, 32)
    with pytest.raises(ValueError, match="one scene per video"):
        oracle_scores(v, [SCENE])
    with pytest.raises(ValueError, match="same shape"):
        psnr(v, torch.zeros(2, 3, 8, 16, 16))
    with pytest.raises(ValueError, match="same shape"):
        evaluate_videos(v, [SCENE, SCENE], reference=torch.zeros(1, 3, 8, 32, 32))
    with pytest.raises(ValueError, match="torch.Tensor"):
        read_video([[0.0]])
