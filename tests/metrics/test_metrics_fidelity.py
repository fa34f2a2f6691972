"""PSNR and SSIM: known values, identities, monotonic in distortion, and SSIM against an independent reference."""
from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.ndimage as ndi
import torch
from metrics_helpers import add_noise, box_blur3

from workbench.metrics import PSNR_CAP_DB, psnr, ssim


def test_psnr_identical_is_capped(gt_small):
    _, clips = gt_small
    p = psnr(clips, clips)
    assert p.shape == (clips.shape[0],)
    assert torch.all(p == PSNR_CAP_DB)


def test_psnr_known_value_and_per_video():
    a = torch.zeros(2, 3, 4, 16, 16)
    b = a.clone()
    b[0] += 0.1  # MSE 0.01 -> 20 dB
    b[1] += 0.01  # MSE 1e-4 -> 40 dB
    assert torch.allclose(psnr(b, a), torch.tensor([20.0, 40.0]), atol=1e-3)
    assert psnr(b[0], a[0]).shape == ()  # one clip -> a 0-d tensor
    assert float(psnr(b[0], a[0])) == pytest.approx(20.0, abs=1e-3)


def test_ssim_identity_and_monotonic(gt_small):
    _, clips = gt_small
    assert torch.allclose(ssim(clips, clips), torch.ones(clips.shape[0]), atol=1e-6)
    means = [float(ssim(add_noise(clips, s, seed=1), clips).mean()) for s in (0.01, 0.03, 0.1, 0.3)]
    assert all(a > b for a, b in zip(means, means[1:])), means
    assert means[0] < 1.0
    assert float(ssim(box_blur3(clips), clips).mean()) < 1.0
    p = [float(psnr(add_noise(clips, s, seed=1), clips).mean()) for s in (0.01, 0.03, 0.1, 0.3)]
    assert all(a > b for a, b in zip(p, p[1:])), p


def _ssim_reference(x: np.ndarray, y: np.ndarray) -> float:
    """Independent SSIM of two 2-D images: scipy Gaussian filtering (11 taps, sigma 1.5), valid region."""
    def filt(img):
        return ndi.gaussian_filter(img, sigma=1.5, truncate=5 / 1.5, mode="constant")[5:-5, 5:-5]

    mx, my = filt(x), filt(y)
    sxx, syy, sxy = filt(x * x) - mx**2, filt(y * y) - my**2, filt(x * y) - mx * my
    c1, c2 = 0.01**2, 0.03**2
    m = ((2 * mx * my + c1) * (2 * sxy + c2)) / ((mx**2 + my**2 + c1) * (sxx + syy + c2))
    return float(m.mean())


def test_ssim_matches_independent_reference():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(3, 2, 32, 32, generator=g)
    y = (x + 0.1 * torch.randn(x.shape, generator=g)).clamp(0, 1)
    ref = np.mean([_ssim_reference(x[c, f].double().numpy(), y[c, f].double().numpy()) for c in range(3) for f in range(2)])
    assert float(ssim(y, x)) == pytest.approx(ref, abs=1e-6)
    assert float(ssim(y, x)) == pytest.approx(float(ssim(x, y)), abs=1e-9)  # symmetric


def test_ssim_small_frames_use_smaller_window():
    x = torch.rand(1, 3, 2, 8, 8)
    assert math.isclose(float(ssim(x, x)[0]), 1.0, abs_tol=1e-6)
