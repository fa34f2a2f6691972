"""Pixel fidelity against a reference clip (e.g. the full-precision model's video for the same prompt and seed).

Both metrics take (B, 3, F, H, W) batches (or one (3, F, H, W) clip), values in [0, 1] (data range 1.0),
and return one value per video: a (B,) tensor, or a 0-d tensor for a single clip.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as Fn

from workbench.metrics._checks import check_pair

PSNR_CAP_DB = 100.0  # PSNR of identical videos (MSE = 0) and the ceiling of every PSNR, so means stay finite
SSIM_WINDOW = 11
SSIM_SIGMA = 1.5
SSIM_K1, SSIM_K2 = 0.01, 0.03


def psnr(video: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """Peak signal-to-noise ratio in dB per video, 10 log10(1 / MSE), capped at PSNR_CAP_DB (identical -> 100 dB)."""
    v, r, batched = check_pair(video, reference)
    mse = (v - r).pow(2).flatten(1).mean(dim=1)
    out = torch.where(mse > 0, -10.0 * torch.log10(mse.clamp(min=1e-30)), torch.full_like(mse, PSNR_CAP_DB))
    out = out.clamp(max=PSNR_CAP_DB)
    return out if batched else out[0]


def _gaussian_window(size: int, sigma: float) -> torch.Tensor:
    """Normalised 1-D Gaussian of `size` taps."""
    x = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-(x**2) / (2 * sigma**2))
    return (g / g.sum()).float()


def ssim(video: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """Structural similarity per video (Wang et al. 2004): 11x11 Gaussian window, sigma 1.5, K1=0.01, K2=0.03.

    Computed on every frame of every RGB channel separately over the 'valid' window positions
    (no padding), then averaged over positions, channels and frames. Frames smaller than 11 pixels
    use the largest odd window that fits. 1 for identical videos; falls as noise or blur grows.
    """
    v, r, batched = check_pair(video, reference)
    B, C, F, H, W = v.shape
    size = min(SSIM_WINDOW, H - (1 - H % 2), W - (1 - W % 2))
    g = _gaussian_window(size, SSIM_SIGMA)
    x = v.reshape(B * C * F, 1, H, W).double()
    y = r.reshape(B * C * F, 1, H, W).double()
    gh = g.double().reshape(1, 1, 1, size)
    gv = g.double().reshape(1, 1, size, 1)

    def blur(t: torch.Tensor) -> torch.Tensor:
        return Fn.conv2d(Fn.conv2d(t, gh), gv)

    mu_x, mu_y = blur(x), blur(y)
    sxx = blur(x * x) - mu_x**2
    syy = blur(y * y) - mu_y**2
    sxy = blur(x * y) - mu_x * mu_y
    c1, c2 = SSIM_K1**2, SSIM_K2**2
    smap = ((2 * mu_x * mu_y + c1) * (2 * sxy + c2)) / ((mu_x**2 + mu_y**2 + c1) * (sxx + syy + c2))
    out = smap.reshape(B, -1).mean(dim=1).float()
    return out if batched else out[0]


def psnr_from_mse(mse: float) -> float:
    """PSNR in dB for a data range of 1.0 from an MSE, with the same cap as `psnr`."""
    return PSNR_CAP_DB if mse <= 0 else min(PSNR_CAP_DB, -10.0 * math.log10(mse))
