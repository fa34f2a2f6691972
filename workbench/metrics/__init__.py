"""Metrics for generated clips of the procedural world: prompt adherence (oracle), pixel fidelity,
temporal consistency and a Frechet distance on interpretable features, plus one-call evaluation."""
from workbench.metrics.suite import evaluate_videos
from workbench.metrics.fidelity import PSNR_CAP_DB, psnr, ssim
from workbench.metrics.frechet import FEATURE_NAMES, frechet_distance, video_features
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
    "evaluate_videos", "PSNR_CAP_DB", "psnr", "ssim", "FEATURE_NAMES", "frechet_distance", "video_features",
    "OracleReading", "OracleScores", "nearest_color", "oracle_accuracy", "oracle_scores", "read_segmentations",
    "read_video", "read_videos", "score_readings", "Segmentation", "segment", "segment_batch", "TemporalScores",
    "temporal_consistency",
]
