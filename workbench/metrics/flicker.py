"""Temporal flicker of generated clips, alone and against the full-precision clip of the same prompt and seed.

Model-agnostic (no segmentation, no optical flow, no warping), so it works for any video model. With
d_t = x[t+1] - x[t] the frame-to-frame change of a clip x (C, F, H, W), means taken over channels,
the F-1 frame pairs and the pixels of one clip:

* flicker_score(x)         = mean |d_t(x)|: how much a clip changes per frame (0 for a still clip; real
                             motion counts too, so compare it between models, not against 0);
* temporal_diff_error(q, fp) = mean |d_t(q) - d_t(fp)|: how far the quantized clip's frame-to-frame
                             change is from the FP clip's (0 when q changes exactly as fp does, even if
                             q is offset or tinted the same way in every frame);
* flicker_ratio(q, fp)     = (flicker_score(q) + eps) / (flicker_score(fp) + eps), eps = FLICKER_EPS:
                             > 1 means the quantized clip flickers (changes) more than the FP clip,
                             < 1 that it is smoother (e.g. frozen), 1 for identical clips.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from workbench.metrics._checks import check_pair, check_videos

# Added to both sides of the ratio so still clips give 1 instead of 0/0: far below one 8-bit level
# (1/255 ~ 0.0039), so it only matters for clips that hardly change.
FLICKER_EPS = 1e-4


def _frame_diff(videos: torch.Tensor, name: str) -> torch.Tensor:
    """Frame-to-frame change (B, 3, F-1, H, W) of a checked batch; raise ValueError for single-frame clips."""
    if videos.shape[2] < 2:
        raise ValueError(f"{name} has {videos.shape[2]} frame(s); temporal flicker needs at least 2 frames per clip")
    return videos[:, :, 1:] - videos[:, :, :-1]


def flicker_score(videos: torch.Tensor) -> torch.Tensor:
    """Mean absolute frame-to-frame change per clip, (B,) or 0-d for one (3, F, H, W) clip: reference-free flicker."""
    batched = isinstance(videos, torch.Tensor) and videos.dim() == 5
    v = check_videos(videos)
    out = _frame_diff(v, "videos").abs().flatten(1).mean(dim=1)
    return out if batched else out[0]


def temporal_diff_error(videos: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """Mean |(q[t+1] - q[t]) - (fp[t+1] - fp[t])| per clip vs the FP reference clip: (B,) or 0-d for one clip."""
    v, r, batched = check_pair(videos, reference)
    out = (_frame_diff(v, "video") - _frame_diff(r, "reference")).abs().flatten(1).mean(dim=1)
    return out if batched else out[0]


def flicker_ratio(videos: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """(flicker_score(q) + eps) / (flicker_score(fp) + eps) per clip: > 1 = q flickers more than FP; (B,) or 0-d."""
    v, r, batched = check_pair(videos, reference)
    out = _ratio(flicker_score(v), flicker_score(r))
    return out if batched else out[0]


def _ratio(q: torch.Tensor, fp: torch.Tensor) -> torch.Tensor:
    return (q + FLICKER_EPS) / (fp + FLICKER_EPS)


@dataclass
class FlickerScores:
    """Per-clip (B,) flicker of a quantized batch against its FP batch (see the module docstring)."""

    temporal_diff_error: torch.Tensor  # mean |d(q) - d(fp)|
    flicker_ratio: torch.Tensor  # (flicker(q) + eps) / (flicker(fp) + eps)
    flicker: torch.Tensor  # flicker_score of the quantized clips
    flicker_fp: torch.Tensor  # flicker_score of the FP clips

    def mean(self) -> dict[str, float]:
        """Set averages (means of the per-clip values) as plain floats."""
        return {k: float(getattr(self, k).mean()) for k in ("temporal_diff_error", "flicker_ratio", "flicker", "flicker_fp")}


def flicker_vs_fp(videos: torch.Tensor, reference: torch.Tensor) -> FlickerScores:
    """All flicker measures of a batch (B, 3, F, H, W) against its FP batch of the same prompts and seeds, per clip."""
    v, r, _ = check_pair(videos, reference)
    dq, dr = _frame_diff(v, "video"), _frame_diff(r, "reference")
    fq, fr = dq.abs().flatten(1).mean(dim=1), dr.abs().flatten(1).mean(dim=1)
    return FlickerScores(
        temporal_diff_error=(dq - dr).abs().flatten(1).mean(dim=1), flicker_ratio=_ratio(fq, fr), flicker=fq, flicker_fp=fr,
    )
