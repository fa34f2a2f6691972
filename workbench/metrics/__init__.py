"""Metrics for generated clips. For the procedural world: prompt adherence (oracle), temporal consistency and a
Frechet distance on interpretable features. For any model: pixel fidelity and flicker vs the FP clips, latent
error per denoising step, CLIP text-video score and CLIP Frechet distance (local checkpoint). One-call evaluation."""
from workbench.metrics.suite import SCENE_ONLY_KEYS, evaluate_videos
from workbench.metrics.clip_scores import (
    LoadedClip,
    clip_frame_features,
    clip_frechet_distance,
    clip_metrics,
    clip_similarity,
    clip_text_video_score,
    load_clip,
)
from workbench.metrics.fidelity import PSNR_CAP_DB, psnr, ssim
from workbench.metrics.flicker import FlickerScores, flicker_ratio, flicker_score, flicker_vs_fp, temporal_diff_error
from workbench.metrics.frechet import FEATURE_NAMES, frechet_distance, video_features
from workbench.metrics.latents import LatentErrors, LatentRecorder, latent_errors
from workbench.metrics.oracle import (
    OracleReading,
    OracleScores,
    nearest_color,
    oracle_accuracy,
    oracle_scores,
    read_segmentations,
    read_video,
    read_videos,
    score_readings,
)
from workbench.metrics.segment import Segmentation, segment, segment_batch
from workbench.metrics.temporal import TemporalScores, temporal_consistency

__all__ = [
    "evaluate_videos", "SCENE_ONLY_KEYS", "PSNR_CAP_DB", "psnr", "ssim", "FEATURE_NAMES", "frechet_distance",
    "video_features", "OracleReading", "OracleScores", "nearest_color", "oracle_accuracy", "oracle_scores",
    "read_segmentations", "read_video", "read_videos", "score_readings", "Segmentation", "segment", "segment_batch",
    "TemporalScores", "temporal_consistency", "FlickerScores", "flicker_ratio", "flicker_score", "flicker_vs_fp",
    "temporal_diff_error", "LatentErrors", "LatentRecorder", "latent_errors", "LoadedClip", "load_clip",
    "clip_frame_features", "clip_frechet_distance", "clip_metrics", "clip_similarity", "clip_text_video_score",
]
