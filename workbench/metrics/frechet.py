"""Frechet distance between two sets of clips on interpretable per-clip features: the FVD analogue.

FVD embeds clips with an I3D network trained on real video; this world is simple enough to embed
each clip with features we can name, so a rise in the distance can be traced to what changed.
"""
from __future__ import annotations

import math

import numpy as np
import scipy.linalg
import torch

from workbench.metrics._checks import check_videos
from workbench.metrics.oracle import OracleReading, read_segmentations
from workbench.metrics.segment import Segmentation, segment_batch
from workbench.metrics.temporal import TemporalScores, temporal_scores_from
from workbench.world.grammar import SHAPES
from workbench.world.render import WorldConfig

FEATURE_NAMES: tuple[str, ...] = (
    "color_r", "color_g", "color_b",  # mean object colour over frames (background subtracted)
    "area",  # mean object area / (pi * radius^2)
    "velocity_y", "velocity_x",  # centroid velocity, pixels per frame
    *(f"shape_{s}" for s in SHAPES),  # mean template IoU per shape
    "presence",  # fraction of frames holding an object
    "background",  # mean background level
    "color_stability", "size_stability", "background_stability", "motion_smoothness",  # temporal components
    "edge_energy",  # mean spatial gradient magnitude (sharpness)
)


def _edge_energy(videos: torch.Tensor) -> torch.Tensor:
    """Mean absolute horizontal + vertical pixel difference per clip (B,): falls with blur, rises with noise."""
    x = videos.clamp(0.0, 1.0)
    dy = (x[..., 1:, :] - x[..., :-1, :]).abs().flatten(1).mean(dim=1)
    dx = (x[..., :, 1:] - x[..., :, :-1]).abs().flatten(1).mean(dim=1)
    return dy + dx


def features_from(
    videos: torch.Tensor, segs: list[Segmentation], readings: list[OracleReading], temporal: TemporalScores,
    cfg: WorldConfig = WorldConfig(),
) -> torch.Tensor:
    """Feature matrix (B, D) of a checked batch from its segmentations, oracle readings and temporal scores."""
    rows = []
    unit_area = math.pi * cfg.radius**2
    for g, r in zip(segs, readings):
        if bool(g.found.any()):
            color = g.color[g.found].mean(dim=0)
            area = g.area[g.found].mean() / unit_area
        else:
            color, area = torch.zeros(3), torch.tensor(0.0)
        rows.append(torch.cat([
            color, area[None], r.velocity.float(), torch.tensor([r.shape_scores[s] for s in SHAPES]),
            g.found.float().mean()[None], g.background.mean()[None],
        ]))
    t = torch.stack([temporal.color_stability, temporal.size_stability, temporal.background_stability,
                     temporal.motion_smoothness], dim=1)
    return torch.cat([torch.stack(rows), t, _edge_energy(videos)[:, None]], dim=1).float()


def video_features(videos: torch.Tensor, cfg: WorldConfig = WorldConfig()) -> torch.Tensor:
    """Interpretable per-clip features (N, D) of a batch (N, 3, F, H, W); column names in FEATURE_NAMES."""
    videos = check_videos(videos)
    segs = segment_batch(videos)
    return features_from(videos, segs, read_segmentations(segs, cfg), temporal_scores_from(videos, segs), cfg)


def _cov(f: np.ndarray) -> np.ndarray:
    """Sample covariance (D, D) of features (N, D); zeros when N == 1."""
    if f.shape[0] < 2:
        return np.zeros((f.shape[1], f.shape[1]))
    return np.atleast_2d(np.cov(f, rowvar=False))


def frechet_distance(feats_a: torch.Tensor | np.ndarray, feats_b: torch.Tensor | np.ndarray, eps: float = 1e-6) -> float:
    """Frechet distance between Gaussians fitted to two feature sets (N, D): |mu_a - mu_b|^2 + Tr(Sa + Sb - 2 sqrt(Sa Sb)).

    eps * I is added to both covariances so the matrix square root (scipy.linalg.sqrtm, real part kept)
    stays stable when N is small or features are constant; a set against itself gives ~0. A set of one
    clip has zero covariance (the distance is then mostly the squared mean difference).
    """
    a = np.asarray(feats_a.detach().cpu() if isinstance(feats_a, torch.Tensor) else feats_a, dtype=np.float64)
    b = np.asarray(feats_b.detach().cpu() if isinstance(feats_b, torch.Tensor) else feats_b, dtype=np.float64)
    for name, f in (("feats_a", a), ("feats_b", b)):
        if f.ndim != 2 or f.shape[0] < 1:
            raise ValueError(f"{name} must have shape (N, D) with N >= 1, got {f.shape}")
        if not np.isfinite(f).all():
            raise ValueError(f"{name} has NaN or infinite values")
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"feature sets must have the same D, got {a.shape} and {b.shape}")
    mu_a, mu_b = a.mean(axis=0), b.mean(axis=0)
    eye = np.eye(a.shape[1])
    sa = _cov(a) + eps * eye
    sb = _cov(b) + eps * eye
    covmean = scipy.linalg.sqrtm(sa @ sb)
    covmean = np.real(covmean)
    dist = float(((mu_a - mu_b) ** 2).sum() + np.trace(sa + sb - 2.0 * covmean))
    return max(dist, 0.0)
