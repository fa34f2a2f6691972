"""Distortions the metrics tests apply to ground-truth clips (a uniquely named module, not conftest)."""
from __future__ import annotations

import torch
import torch.nn.functional as Fn


def box_blur3(videos: torch.Tensor) -> torch.Tensor:
    """3x3 box blur of every frame of (B, 3, F, H, W) clips (edges replicated)."""
    B, C, F, H, W = videos.shape
    x = videos.permute(0, 2, 1, 3, 4).reshape(B * F, C, H, W)
    x = Fn.avg_pool2d(Fn.pad(x, (1, 1, 1, 1), mode="replicate"), 3, stride=1)
    return x.reshape(B, F, C, H, W).permute(0, 2, 1, 3, 4).contiguous()


def add_noise(videos: torch.Tensor, sigma: float, seed: int = 0) -> torch.Tensor:
    """Gaussian noise of std sigma, clamped back to [0, 1]."""
    g = torch.Generator().manual_seed(seed)
    return (videos + sigma * torch.randn(videos.shape, generator=g)).clamp(0.0, 1.0)
