"""Channel balancing transforms for linear layers: SmoothQuant scales and orthogonal rotations.

Both move outliers between a layer's input and its weight without changing the product:
smoothing y = (x / s) (W * s)^T, rotation y = (x R)(W R)^T with R orthogonal. ViDiT-Q combines them
(static-dynamic channel balancing); `QuantLinear.set_smooth` / `set_rotation` apply them.
"""

from __future__ import annotations

import math

import torch


def smooth_scales(
    act_absmax: torch.Tensor, weight: torch.Tensor, alpha: float = 0.5, eps: float = 1e-5
) -> torch.Tensor:
    """SmoothQuant per-input-channel scales s_j = max|X_j|^alpha / max|W_j|^(1 - alpha)."""
    w_absmax = weight.detach().abs().amax(dim=0).float()
    s = act_absmax.float().clamp(min=eps).pow(alpha) / w_absmax.clamp(min=eps).pow(1.0 - alpha)
    return s.clamp(min=eps)


def is_power_of_two(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def hadamard(n: int) -> torch.Tensor:
    """Orthonormal Hadamard matrix of size n (a power of two), built by Sylvester's construction."""
    if not is_power_of_two(n):
        raise ValueError(f"Hadamard matrices are built for powers of two only, got {n}")
    h = torch.ones(1, 1)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h / math.sqrt(n)


def random_orthogonal(n: int, seed: int = 0) -> torch.Tensor:
    """Haar-random orthogonal matrix (QR of a Gaussian matrix with the sign fix)."""
    g = torch.Generator().manual_seed(seed)
    q, r = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    return (q * torch.sign(torch.diagonal(r))).float()


def rotation_matrix(n: int, seed: int = 0) -> torch.Tensor:
    """Randomized Hadamard diag(+-1) H for powers of two (as QuaRot / ViDiT-Q), else a random orthogonal."""
    if not is_power_of_two(n):
        return random_orthogonal(n, seed)
    g = torch.Generator().manual_seed(seed)
    signs = torch.randint(0, 2, (n,), generator=g).float() * 2 - 1
    return signs[:, None] * hadamard(n)
