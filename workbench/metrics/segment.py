"""Per-frame object segmentation of a clip: the shared first step of the oracle, temporal and Frechet metrics.

Works on imperfect generated video (noise, blur, dimming, a non-black background) by measuring
everything relative to the frame itself:

1. clamp to [0, 1]; subtract the per-frame, per-channel median (the background level, since the
   object covers under 10 % of the frame);
2. brightness I = max over channels of what is left (so every palette colour, even dimmed, is bright);
3. peak = the 3rd-largest brightness of the frame (a robust max: one hot pixel cannot set it);
   a frame holds an object only if peak >= `min_peak` and the object stands out of the frame's noise:
   on the 3x3-box-smoothed brightness, (max - median) / (1.4826 * MAD, floored at 0.01) >= `min_snr`
   (pure noise of any strength scores about 2-7, a dimmed object under sigma=0.1 noise about 16);
4. core = pixels with I >= `rel_threshold` * peak, keeping only the connected blob that holds the
   most brightness (stray speckles elsewhere are dropped);
5. support = core grown by one pixel (so anti-aliased / blurred edge pixels count);
6. alpha = clamp(I / peak, 0, 1) on the support: a soft coverage map, exact on rendered clips.

Area is sum(alpha); the centroid is the alpha-weighted mean pixel centre; the object colour is
sum(residual colour over the support) / area, i.e. the colour of a fully covered pixel, which on
rendered clips is exactly the palette colour whatever the sub-pixel position.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.ndimage as ndi
import torch

from workbench.metrics._checks import check_video, check_videos


@dataclass
class Segmentation:
    """Soft object masks and per-frame statistics of one clip (F frames)."""

    alpha: torch.Tensor  # (F, H, W) soft coverage in [0, 1], zero off the support
    support: torch.Tensor  # (F, H, W) bool, the object's pixels (core grown by one pixel)
    found: torch.Tensor  # (F,) bool, the frame holds an object
    centroid: torch.Tensor  # (F, 2) (y, x) in pixels, NaN where not found
    area: torch.Tensor  # (F,) soft area in pixels, 0 where not found
    color: torch.Tensor  # (F, 3) background-subtracted object colour, NaN where not found
    background: torch.Tensor  # (F, 3) per-frame background level (median per channel)
    peak: torch.Tensor  # (F,) robust peak brightness above the background
    snr: torch.Tensor  # (F,) how far the smoothed peak stands above the frame's noise, in robust sigmas


# 8-connectivity within a frame, none across frames (frames are stacked on the first axis)
_IN_PLANE = np.zeros((3, 3, 3), dtype=bool)
_IN_PLANE[1] = True


def frame_snr(bright: torch.Tensor) -> torch.Tensor:
    """Per-frame (max - median) / robust sigma of the 3x3-box-smoothed brightness (N, H, W) -> (N,)."""
    padded = torch.nn.functional.pad(bright[:, None], (1, 1, 1, 1), mode="replicate")
    flat = torch.nn.functional.avg_pool2d(padded, 3, stride=1)[:, 0].flatten(1)
    med = flat.median(dim=1).values
    mad = (flat - med[:, None]).abs().median(dim=1).values
    return (flat.max(dim=1).values - med) / (1.4826 * mad).clamp(min=0.01)


def _largest_blob_support(core: torch.Tensor, bright: torch.Tensor) -> torch.Tensor:
    """Per frame of core (N, H, W), the connected blob holding the most brightness, grown by one pixel."""
    core_np = core.numpy()
    labels, n = ndi.label(core_np, structure=_IN_PLANE)
    if n == 0:
        return torch.zeros_like(core)
    ids = np.arange(1, n + 1)
    mass = np.asarray(ndi.sum(bright.numpy(), labels, index=ids))
    frame = np.asarray(ndi.minimum(np.broadcast_to(np.arange(core_np.shape[0])[:, None, None], core_np.shape),
                                   labels, index=ids)).astype(np.int64)
    order = np.lexsort((mass, frame))  # by frame, then mass: the last label of each frame is its heaviest
    last = np.r_[frame[order][1:] != frame[order][:-1], True]
    keep_ids = np.zeros(n + 1, dtype=bool)
    keep_ids[ids[order][last]] = True
    keep = keep_ids[labels]
    return torch.from_numpy(ndi.binary_dilation(keep, structure=_IN_PLANE))


def segment_batch(
    videos: torch.Tensor, rel_threshold: float = 0.5, min_peak: float = 0.1, min_snr: float = 8.0
) -> list[Segmentation]:
    """Segment the object in every frame of each clip of a batch (B, 3, F, H, W); see the module docstring."""
    x = check_videos(videos).detach().cpu().clamp(0.0, 1.0)
    B, _, F, H, W = x.shape
    x = x.permute(0, 2, 1, 3, 4).reshape(B * F, 3, H, W)  # frames of all clips stacked: (N, 3, H, W)
    background = x.flatten(2).median(dim=2).values  # (N, 3)
    resid = (x - background[:, :, None, None]).clamp(min=0.0)
    bright = resid.max(dim=1).values  # (N, H, W)
    peak = bright.flatten(1).topk(min(3, H * W), dim=1).values[:, -1]
    snr = frame_snr(bright)
    found = (peak >= min_peak) & (snr >= min_snr)

    core = (bright >= rel_threshold * peak[:, None, None]) & found[:, None, None]
    support = _largest_blob_support(core, bright)
    alpha = (bright / peak.clamp(min=1e-6)[:, None, None]).clamp(0.0, 1.0) * support
    area = alpha.sum(dim=(1, 2))
    found = found & (area > 0)
    ys = torch.arange(H, dtype=torch.float32) + 0.5
    xs = torch.arange(W, dtype=torch.float32) + 0.5
    safe = area.clamp(min=1e-6)
    cy = (alpha.sum(dim=2) * ys).sum(dim=1) / safe
    cx = (alpha.sum(dim=1) * xs).sum(dim=1) / safe
    nan = torch.tensor(float("nan"))
    centroid = torch.where(found[:, None], torch.stack([cy, cx], dim=1), nan)
    color = torch.where(found[:, None], (resid * support[:, None]).sum(dim=(2, 3)) / safe[:, None], nan)
    area = torch.where(found, area, torch.zeros(()))
    return [
        Segmentation(alpha[sl], support[sl], found[sl], centroid[sl], area[sl], color[sl], background[sl], peak[sl], snr[sl])
        for sl in (slice(b * F, (b + 1) * F) for b in range(B))
    ]


def segment(video: torch.Tensor, rel_threshold: float = 0.5, min_peak: float = 0.1, min_snr: float = 8.0) -> Segmentation:
    """Segment the object in every frame of one clip (3, F, H, W); see the module docstring for the steps."""
    return segment_batch(check_video(video)[None], rel_threshold, min_peak, min_snr)[0]
