"""One call that scores a set of generated clips: prompt adherence, temporal consistency and, given the
full-precision clips for the same prompts and seeds, fidelity to them. Returns a flat JSON-ready dict."""
from __future__ import annotations

from workbench.metrics._checks import check_videos
from workbench.metrics.fidelity import psnr, ssim
from workbench.metrics.frechet import features_from, frechet_distance
from workbench.metrics.oracle import read_segmentations, score_readings
from workbench.metrics.segment import segment_batch
from workbench.metrics.temporal import temporal_scores_from
from workbench.world.grammar import ATTRIBUTES, Scene
from workbench.world.render import WorldConfig


def evaluate_videos(videos, scenes: list[Scene], reference=None, cfg: WorldConfig = WorldConfig()) -> dict[str, float]:
    """Score clips (B, 3, F, H, W) made for `scenes`; with `reference` (same shape) add psnr/ssim/frechet vs it.

    Keys: n_videos, oracle_accuracy, exact_match, <attribute>_accuracy for color/shape/direction/speed,
    found_rate, temporal_consistency and its four components; with a reference also psnr_vs_fp (dB,
    capped at 100), ssim_vs_fp and frechet_distance (video features vs the reference set's). Plain floats.
    """
    videos = check_videos(videos)
    if len(scenes) != videos.shape[0]:
        raise ValueError(f"got {videos.shape[0]} videos but {len(scenes)} scenes; need one scene per video")
    segs = segment_batch(videos)
    readings = read_segmentations(segs, cfg)
    scores = score_readings(readings, scenes)
    temporal = temporal_scores_from(videos, segs)
    out: dict[str, float] = {
        "n_videos": float(videos.shape[0]),
        "oracle_accuracy": scores.oracle_accuracy,
        "exact_match": scores.exact_match,
        **{f"{a}_accuracy": scores.per_attribute[a] for a in ATTRIBUTES},
        "found_rate": sum(r.found for r in readings) / len(readings),
        **temporal.mean(),
    }
    if reference is not None:
        ref = check_videos(reference, "reference")
        if ref.shape != videos.shape:
            raise ValueError(f"reference must have the same shape as videos (B, 3, F, H, W): {tuple(ref.shape)} vs {tuple(videos.shape)}")
        ref_segs = segment_batch(ref)
        feats = features_from(videos, segs, readings, temporal, cfg)
        ref_feats = features_from(ref, ref_segs, read_segmentations(ref_segs, cfg), temporal_scores_from(ref, ref_segs), cfg)
        out["psnr_vs_fp"] = float(psnr(videos, ref).mean())
        out["ssim_vs_fp"] = float(ssim(videos, ref).mean())
        out["frechet_distance"] = frechet_distance(feats, ref_feats)
    return {k: float(v) for k, v in out.items()}
