"""Temporal consistency of generated clips: the analogue of VBench's subject / background consistency.

Per clip, from the object segmentation (`segment`), four components, each a score in [0, 1]:

* colour stability     s_c = p * exp(-color_std / 0.05), color_std = std over object frames of the mean
                         object colour, averaged over R, G, B (a drifting or pulsing object colour);
* size stability       s_a = p * exp(-area_cv / 0.10), area_cv = std / mean of the object area over frames
                         (an object that swells, shrinks or breaks up);
* background stability s_b = exp(-flicker / 0.05), flicker = mean |x[t+1] - x[t]| over channels and the
                         pixels outside the object support of both frames t and t+1 (a flickering background);
* motion smoothness    s_m = p * exp(-max(track_rms - 0.05, 0) / 0.5), track_rms = RMS distance in pixels of
                         the centroid track from its least-squares constant-velocity line (jittery motion);
                         the 0.05 px dead zone absorbs the renderer's own sub-pixel sampling (<= 0.025 px);

where p = fraction of frames that hold an object (an object that blinks out of existence is inconsistent;
clips with fewer than two object frames get s_c = s_a = s_m = 0). The total is their mean,

    temporal_consistency = (s_c + s_a + s_b + s_m) / 4,

1 for a perfect clip (rendered ground truth scores 1.0 up to float error). The scales (0.05 colour,
10 % size, 0.05 brightness, half a pixel) are where each component has fallen to 1/e: differences an
observer would clearly notice on a 32x32 clip.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from workbench.metrics._checks import check_videos
from workbench.metrics.segment import Segmentation, segment_batch

COLOR_SCALE = 0.05
SIZE_SCALE = 0.10
FLICKER_SCALE = 0.05
TRACK_SCALE = 0.5
TRACK_DEADZONE = 0.05


@dataclass
class TemporalScores:
    """Per-clip temporal consistency (B,) tensors: the four component scores, their raw measures, the total."""

    color_stability: torch.Tensor
    size_stability: torch.Tensor
    background_stability: torch.Tensor
    motion_smoothness: torch.Tensor
    temporal_consistency: torch.Tensor
    color_std: torch.Tensor  # raw: std over frames of the object colour (NaN without an object)
    area_cv: torch.Tensor  # raw: coefficient of variation of the object area (NaN without an object)
    flicker: torch.Tensor  # raw: mean absolute frame-to-frame change of background pixels
    track_rms: torch.Tensor  # raw: RMS residual of the centroid from a straight line, pixels (NaN without an object)
    presence: torch.Tensor  # fraction of frames holding an object

    def mean(self) -> dict[str, float]:
        """Set averages of the component scores and the total, as plain floats."""
        keys = ("color_stability", "size_stability", "background_stability", "motion_smoothness", "temporal_consistency")
        return {k: float(getattr(self, k).mean()) for k in keys}


def _track_rms(centroid: torch.Tensor, found: torch.Tensor) -> float:
    """RMS distance (pixels) of the found centroids from their least-squares straight line in time."""
    t = found.nonzero().flatten().float()
    c = centroid[found]
    tc = t - t.mean()
    vel = (tc[:, None] * (c - c.mean(dim=0))).sum(dim=0) / (tc * tc).sum()
    resid = c - c.mean(dim=0) - tc[:, None] * vel[None, :]
    return float(resid.pow(2).sum(dim=1).mean().sqrt())


def _flicker(video: torch.Tensor, support: torch.Tensor) -> float:
    """Mean absolute frame-to-frame change of the pixels outside the object in both frames."""
    x = video.clamp(0.0, 1.0)
    diff = (x[:, 1:] - x[:, :-1]).abs().mean(dim=0)  # (F-1, H, W)
    bg = ~(support[1:] | support[:-1])
    n = bg.sum()
    return float((diff * bg).sum() / n) if n > 0 else 0.0


def temporal_scores_from(videos: torch.Tensor, segs: list[Segmentation]) -> TemporalScores:
    """Temporal consistency of a checked batch (B, 3, F, H, W) from its segmentations (see module docstring)."""
    nan = float("nan")
    rows = []
    for video, g in zip(videos, segs):
        p = float(g.found.float().mean())
        flicker = _flicker(video, g.support) if video.shape[1] > 1 else 0.0
        if int(g.found.sum()) >= 2:
            color_std = float(g.color[g.found].std(dim=0, unbiased=False).mean())
            a = g.area[g.found]
            area_cv = float(a.std(unbiased=False) / a.mean().clamp(min=1e-6))
            rms = _track_rms(g.centroid, g.found)
            s_c = p * math.exp(-color_std / COLOR_SCALE)
            s_a = p * math.exp(-area_cv / SIZE_SCALE)
            s_m = p * math.exp(-max(rms - TRACK_DEADZONE, 0.0) / TRACK_SCALE)
        else:
            color_std = area_cv = rms = nan
            s_c = s_a = s_m = 0.0
        s_b = math.exp(-flicker / FLICKER_SCALE)
        rows.append((s_c, s_a, s_b, s_m, (s_c + s_a + s_b + s_m) / 4, color_std, area_cv, flicker, rms, p))
    cols = torch.tensor(rows, dtype=torch.float32).T
    return TemporalScores(*cols)


def temporal_consistency(videos: torch.Tensor) -> TemporalScores:
    """Temporal consistency of a batch (B, 3, F, H, W) or one clip (3, F, H, W); 1 = perfectly consistent."""
    videos = check_videos(videos)
    return temporal_scores_from(videos, segment_batch(videos))
