"""One call that scores a set of generated clips. Returns a flat JSON-ready dict of plain floats.

With scenes (the bundled tiny world, which has an oracle): prompt adherence read by the oracle, temporal
consistency and, given the full-precision clips for the same prompts and seeds, fidelity to them. Without
scenes (any real video model, no oracle): fidelity to the FP clips, flicker, and CLIP scores given a CLIP model.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

from workbench.metrics._checks import check_videos
from workbench.metrics.fidelity import psnr, ssim
from workbench.metrics.flicker import flicker_score, flicker_vs_fp
from workbench.metrics.frechet import features_from, frechet_distance
from workbench.metrics.oracle import read_segmentations, score_readings
from workbench.metrics.segment import segment_batch
from workbench.metrics.temporal import temporal_scores_from
from workbench.world.grammar import ATTRIBUTES, Scene
from workbench.world.render import WorldConfig

if TYPE_CHECKING:
    from workbench.metrics.clip_scores import LoadedClip

# Keys only calls with scenes return (the tiny world's oracle, its segmentation-based temporal consistency and
# its feature Frechet distance): a model without an oracle never reports them.
SCENE_ONLY_KEYS: tuple[str, ...] = (
    "oracle_accuracy", "exact_match", *(f"{a}_accuracy" for a in ATTRIBUTES), "found_rate",
    "color_stability", "size_stability", "background_stability", "motion_smoothness", "temporal_consistency",
    "frechet_distance",
)


def evaluate_videos(
    videos: torch.Tensor,
    scenes: list[Scene] | None = None,
    reference: torch.Tensor | None = None,
    clip: LoadedClip | None = None,
    prompts: Sequence[str] | None = None,
    *,
    flicker: bool | None = None,
    cfg: WorldConfig = WorldConfig(),
) -> dict[str, float]:
    """Score clips (B, 3, F, H, W); `reference` = the FP clips of the same prompts and seeds (same shape).

    With `scenes` (one per clip; tiny world only): n_videos, oracle_accuracy, exact_match,
    <attribute>_accuracy for color/shape/direction/speed, found_rate, temporal_consistency and its four
    components; with a reference also psnr_vs_fp (dB, capped at 100), ssim_vs_fp and frechet_distance
    (the world's interpretable video features vs the reference set's).
    Without scenes (no oracle; none of the keys above except n_videos and, with a reference, psnr_vs_fp
    and ssim_vs_fp): flicker_score, and with a reference temporal_diff_error_vs_fp and
    flicker_ratio_vs_fp (see workbench.metrics.flicker).
    `flicker` adds (True) or drops (False) those three flicker keys; default: only without scenes, so
    calls with scenes return exactly what they always did.
    `clip` (from load_clip): clip_score (mean CLIP text-video score vs `prompts`, 0..100) when prompts
    are given, clip_fd_vs_fp (CLIP Frechet distance of the frames vs the reference's) with a reference.
    `prompts` (one per clip) are used only by the CLIP score.
    """
    videos = check_videos(videos)
    n = videos.shape[0]
    if scenes is not None and len(scenes) != n:
        raise ValueError(f"got {n} videos but {len(scenes)} scenes; need one scene per video")
    if prompts is not None:
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        if len(prompts) != n:
            raise ValueError(f"got {n} videos but {len(prompts)} prompts; pass one prompt per video, in the same order")
    if clip is not None and prompts is None and reference is None:
        raise ValueError("clip needs prompts (for clip_score) or a reference (for clip_fd_vs_fp); pass prompts=[...] "
                         "and/or reference=fp_videos, or leave clip out")
    ref = None
    if reference is not None:
        ref = check_videos(reference, "reference")
        if ref.shape != videos.shape:
            raise ValueError(f"reference must have the same shape as videos (B, 3, F, H, W): {tuple(ref.shape)} vs {tuple(videos.shape)}")

    out: dict[str, float] = {"n_videos": float(n)}
    if scenes is not None:
        out.update(_oracle_metrics(videos, scenes, ref, cfg))
    elif ref is not None:
        out["psnr_vs_fp"] = float(psnr(videos, ref).mean())
        out["ssim_vs_fp"] = float(ssim(videos, ref).mean())
    use_flicker = scenes is None if flicker is None else flicker
    if use_flicker:
        if ref is None:
            out["flicker_score"] = float(flicker_score(videos).mean())
        else:
            f = flicker_vs_fp(videos, ref)
            out["flicker_score"] = float(f.flicker.mean())
            out["temporal_diff_error_vs_fp"] = float(f.temporal_diff_error.mean())
            out["flicker_ratio_vs_fp"] = float(f.flicker_ratio.mean())
    if clip is not None:
        from workbench.metrics.clip_scores import clip_metrics

        out.update(clip_metrics(videos, clip, prompts=prompts, reference=ref))
    return {k: float(v) for k, v in out.items()}


def _oracle_metrics(videos: torch.Tensor, scenes: list[Scene], ref: torch.Tensor | None, cfg: WorldConfig) -> dict[str, float]:
    """The tiny world's metrics (oracle, segmentation-based temporal consistency, feature Frechet distance)."""
    segs = segment_batch(videos)
    readings = read_segmentations(segs, cfg)
    scores = score_readings(readings, scenes)
    temporal = temporal_scores_from(videos, segs)
    out: dict[str, float] = {
        "oracle_accuracy": scores.oracle_accuracy,
        "exact_match": scores.exact_match,
        **{f"{a}_accuracy": scores.per_attribute[a] for a in ATTRIBUTES},
        "found_rate": sum(r.found for r in readings) / len(readings),
        **temporal.mean(),
    }
    if ref is not None:
        ref_segs = segment_batch(ref)
        feats = features_from(videos, segs, readings, temporal, cfg)
        ref_feats = features_from(ref, ref_segs, read_segmentations(ref_segs, cfg), temporal_scores_from(ref, ref_segs), cfg)
        out["psnr_vs_fp"] = float(psnr(videos, ref).mean())
        out["ssim_vs_fp"] = float(ssim(videos, ref).mean())
        out["frechet_distance"] = frechet_distance(feats, ref_feats)
    return out
