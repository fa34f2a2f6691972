"""Input checks shared by the metrics: wrong shapes and NaN videos fail loudly, never score silently."""
from __future__ import annotations

import torch


def check_video(video: torch.Tensor, name: str = "video") -> torch.Tensor:
    """Return one clip (3, F, H, W) as float32; raise ValueError naming the expected shape or the NaN values."""
    if not isinstance(video, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor of shape (3, F, H, W), got {type(video).__name__}")
    if video.dim() != 4 or video.shape[0] != 3:
        raise ValueError(f"{name} must have shape (3, F, H, W) (RGB, frames, height, width), got {tuple(video.shape)}")
    return _finite(video, name).float()


def check_videos(videos: torch.Tensor, name: str = "videos") -> torch.Tensor:
    """Return a batch (B, 3, F, H, W) as float32 (a single (3, F, H, W) clip becomes B=1); raise ValueError otherwise."""
    if not isinstance(videos, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor of shape (B, 3, F, H, W), got {type(videos).__name__}")
    if videos.dim() == 4 and videos.shape[0] == 3:
        videos = videos[None]
    if videos.dim() != 5 or videos.shape[1] != 3:
        raise ValueError(
            f"{name} must have shape (B, 3, F, H, W) or (3, F, H, W) (RGB, frames, height, width), got {tuple(videos.shape)}"
        )
    if videos.shape[0] == 0:
        raise ValueError(f"{name} is empty: shape (B, 3, F, H, W) needs B >= 1, got {tuple(videos.shape)}")
    return _finite(videos, name).float()


def check_pair(video: torch.Tensor, reference: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """Check a video batch against its reference batch; return both as (B, 3, F, H, W) and whether the input was batched."""
    batched = isinstance(video, torch.Tensor) and video.dim() == 5
    v = check_videos(video, "video")
    r = check_videos(reference, "reference")
    if v.shape != r.shape:
        raise ValueError(f"video and reference must have the same shape (B, 3, F, H, W), got {tuple(v.shape)} and {tuple(r.shape)}")
    return v, r, batched


def _finite(x: torch.Tensor, name: str) -> torch.Tensor:
    """Raise ValueError if x holds NaN or infinite values (e.g. a diverged quantized model)."""
    if torch.isnan(x).any():
        raise ValueError(f"{name} has NaN values ({int(torch.isnan(x).sum())} of {x.numel()}); a diverged model cannot be scored")
    if torch.isinf(x).any():
        raise ValueError(f"{name} has infinite values ({int(torch.isinf(x).sum())} of {x.numel()}); a diverged model cannot be scored")
    return x
