"""Generate a prompt set with the FP model (and a quantized transformer) and measure it.

Video i of a run uses seed `seed + i`, so the FP and quantized runs of the same settings compare
video by video (PSNR/SSIM against FP) as well as set against set (oracle, Frechet distance).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from workbench.metrics import evaluate_videos
from workbench.models.bundled import TinyWorldModel
from workbench.world.grammar import PromptError, Scene, heldout_scenes, parse_prompt


@dataclass(frozen=True)
class EvalSettings:
    """Which videos to generate: prompts (default: the held-out set), seeds, sampler settings."""

    prompts: tuple[str, ...] = field(default_factory=lambda: tuple(s.prompt for s in heldout_scenes()))
    seed: int = 0
    steps: int = 16
    guidance: float = 3.0
    batch_size: int = 16

    @property
    def scenes(self) -> list[Scene]:
        return [parse_prompt(p) for p in self.prompts]

    @property
    def seeds(self) -> list[int]:
        return [self.seed + i for i in range(len(self.prompts))]


def read_prompts_file(path: str | Path) -> tuple[str, ...]:
    """One prompt a line ('#' comments and blank lines skipped); a bad line is an error naming it."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"prompts file {p} does not exist; write one prompt a line, e.g. 'a red circle moving left'")
    prompts = []
    for n, line in enumerate(p.read_text().splitlines(), 1):
        text = line.split("#", 1)[0].strip()
        if not text:
            continue
        try:
            parse_prompt(text)
        except PromptError as e:
            raise PromptError(f"{p}:{n}: {e}") from None
        prompts.append(text)
    if not prompts:
        raise ValueError(f"prompts file {p} holds no prompt; write one prompt a line")
    return tuple(prompts)


def generate_set(
    model: TinyWorldModel, settings: EvalSettings, transformer: torch.nn.Module | None = None, progress: bool = False
) -> tuple[torch.Tensor, float]:
    """All videos of the settings (N, 3, F, H, W) and the seconds per video."""
    from tqdm.auto import tqdm

    prompts, seeds = list(settings.prompts), settings.seeds
    out = []
    t0 = time.perf_counter()
    starts = range(0, len(prompts), settings.batch_size)
    for i in tqdm(starts, desc="generating", disable=not progress):
        j = i + settings.batch_size
        out.append(model.generate_many(prompts[i:j], seeds[i:j], settings.steps, settings.guidance, transformer=transformer))
    return torch.cat(out), (time.perf_counter() - t0) / len(prompts)


def evaluate_fp(model: TinyWorldModel, settings: EvalSettings = EvalSettings(), progress: bool = False) -> tuple[dict, torch.Tensor]:
    """Metrics of the full-precision model on the settings' prompts, and its videos."""
    videos, spv = generate_set(model, settings, progress=progress)
    metrics = evaluate_videos(videos, settings.scenes)
    metrics["seconds_per_video"] = spv
    metrics["num_videos"] = len(settings.prompts)
    return metrics, videos


def evaluate_quantized(
    model: TinyWorldModel,
    transformer: torch.nn.Module,
    settings: EvalSettings = EvalSettings(),
    fp: tuple[dict, torch.Tensor] | None = None,
    progress: bool = False,
) -> tuple[dict, torch.Tensor]:
    """Metrics of a quantized transformer against FP on the same prompts and seeds; FP values as `fp_*`."""
    fp_metrics, fp_videos = fp if fp is not None else evaluate_fp(model, settings, progress)
    videos, spv = generate_set(model, settings, transformer=transformer, progress=progress)
    metrics = evaluate_videos(videos, settings.scenes, reference=fp_videos)
    metrics["seconds_per_video"] = spv
    metrics["num_videos"] = len(settings.prompts)
    for k in ("oracle_accuracy", "exact_match", "temporal_consistency", "seconds_per_video"):
        if k in fp_metrics:
            metrics[f"fp_{k}"] = fp_metrics[k]
    return metrics, videos
