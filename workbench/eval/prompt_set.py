"""Generate a prompt set with the FP model (and quantized transformers) and measure it.

Video i of a run uses seed `seed + i`, so the FP and quantized runs of the same settings compare
video by video (PSNR/SSIM against FP) as well as set against set (oracle, Frechet distance).
`comparison_content` measures FP and several quantized transformers and lays them out for a report page.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from workbench.metrics import evaluate_videos
from workbench.models.bundled import TinyWorldModel
from workbench.viz.html import ReportContent, VideoRow
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


MAX_PROMPTS_BYTES = 8 * 2**20


def read_prompts_file(path: str | Path) -> tuple[str, ...]:
    """One prompt a line ('#' comments and blank lines skipped); a bad line is an error naming it."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"prompts file {p} does not exist; write one prompt a line, e.g. 'a red circle moving left'")
    if p.stat().st_size > MAX_PROMPTS_BYTES:
        raise ValueError(f"prompts file {p} is {p.stat().st_size} bytes, more than a prompt list needs "
                         f"(at most {MAX_PROMPTS_BYTES // 2**20} MiB): write one prompt a line")
    try:
        text = p.read_bytes().decode("utf-8")
    except UnicodeDecodeError:
        raise ValueError(f"prompts file {p} is not UTF-8 text (a binary file?): write one prompt a line") from None
    prompts = []
    for n, line in enumerate(text.splitlines(), 1):
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


# The columns of the results table, in order (any other scalar metric follows them).
TABLE_KEYS = ("oracle_accuracy", "exact_match", "temporal_consistency", "psnr_vs_fp", "ssim_vs_fp",
              "frechet_distance", "avg_weight_bits", "weight_mb", "seconds_per_video")


@dataclass
class QuantizedEntry:
    """One quantized transformer to compare: a label (recipe name), the module and its stage reports."""

    label: str
    transformer: torch.nn.Module
    reports: list = field(default_factory=list)
    info: dict[str, Any] = field(default_factory=dict)  # extra table columns (e.g. method, source directory)


def _row(label: str, metrics: dict, info: dict | None = None) -> dict:
    scalars = {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not k.startswith(("per_", "fp_"))}
    first = {k: scalars.pop(k, None) for k in TABLE_KEYS}  # every row has these columns, in this order
    return {"model": label, **(info or {}), **first, **scalars}


def comparison_content(model, entries: list[QuantizedEntry], settings: EvalSettings, title: str,
                       notes: list[str] = (), progress: bool = False) -> tuple[ReportContent, list[dict]]:
    """Generate and measure FP and every entry on the settings' prompts; the report content and its table rows."""
    from workbench.stages.ptq import weight_budget

    fp_metrics, fp_videos = evaluate_fp(model, settings, progress=progress)
    fp_size = weight_budget(model.transformer)
    rows = [_row("FP", {**fp_metrics, "avg_weight_bits": 32.0, "weight_mb": fp_size["fp_weight_mb"]})]
    video_rows = [VideoRow("FP", fp_videos)]
    for e in entries:
        metrics, videos = evaluate_quantized(model, e.transformer, settings, fp=(fp_metrics, fp_videos), progress=progress)
        size = weight_budget(e.transformer)
        rows.append(_row(e.label, {**metrics, "avg_weight_bits": size["avg_weight_bits"], "weight_mb": size["weight_mb"]},
                         e.info))
        video_rows.append(VideoRow(e.label, videos))
    content = ReportContent(
        title=title,
        prompts=list(settings.prompts),
        rows=video_rows,
        table=rows,
        stage_sections=[(f"Stages of {e.label}", e.reports) for e in entries if e.reports],
        notes=[f"{len(settings.prompts)} prompts, seeds {settings.seed}..{settings.seed + len(settings.prompts) - 1}, "
               f"{settings.steps} steps, guidance {settings.guidance}. PSNR, SSIM and Frechet distance are measured "
               "against the FP videos of the same prompts and seeds; weight_mb counts quantized weights at their bits.",
               *notes],
    )
    return content, rows
