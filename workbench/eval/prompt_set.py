"""Generate a prompt set with the FP model (and quantized transformers) and measure it.

Video i of a run uses seed `seed + i`, so the FP and quantized runs of the same settings compare
video by video (PSNR/SSIM against FP) as well as set against set (oracle, Frechet distance).
`comparison_content` measures FP and several quantized transformers and lays them out for a report page.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from workbench.metrics import evaluate_videos
from workbench.models.generator import GenerationSettings, Generator
from workbench.viz.html import ReportContent, VideoRow


@dataclass(frozen=True)
class EvalSettings:
    """Which videos to generate: prompts (None: the model's held-out set), seeds, sampler settings (None:
    the model's defaults) and what to measure beyond the video metrics.

    latents: also record the latents of every denoising step and report the quantized run's relative error
    against FP per step (`workbench.metrics.latents`; at most `latent_elements` elements kept per step).
    """

    prompts: tuple[str, ...] | None = None
    seed: int = 0
    steps: int | None = None
    guidance: float | None = None
    frames: int | None = None
    height: int | None = None
    width: int | None = None
    batch_size: int = 16
    latents: bool = True
    latent_elements: int = 1_000_000

    def __post_init__(self) -> None:
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"seed must be an integer >= 0, got {self.seed!r}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.prompts is not None and not self.prompts:
            raise ValueError("prompts is empty: give at least one prompt (or None for the model's held-out set)")
        self.generation()

    def generation(self) -> GenerationSettings:
        """The sampler settings (None fields: the model's defaults)."""
        return GenerationSettings(steps=self.steps, guidance=self.guidance, frames=self.frames, height=self.height,
                                  width=self.width)

    def resolved(self, model: Generator) -> EvalSettings:
        """These settings with the prompts and every sampler setting filled from `model` and checked by it."""
        prompts = tuple(self.prompts) if self.prompts is not None else tuple(model.eval_prompts())
        model.check_prompts(list(prompts))
        g = self.generation().resolved(model.defaults())
        model.check_settings(g)
        return replace(self, prompts=prompts, steps=g.steps, guidance=g.guidance, frames=g.frames, height=g.height,
                       width=g.width)

    @property
    def seeds(self) -> list[int]:
        if self.prompts is None:
            raise ValueError("the settings name no prompts yet: call resolved(model) first")
        return [self.seed + i for i in range(len(self.prompts))]


MAX_PROMPTS_BYTES = 8 * 2**20


def read_prompts_file(path: str | Path, model: Generator | None = None) -> tuple[str, ...]:
    """One prompt a line ('#' comments and blank lines skipped); with `model`, a prompt it cannot take is
    an error naming the file and the line."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"prompts file {p} does not exist; write one prompt a line")
    if p.stat().st_size > MAX_PROMPTS_BYTES:
        raise ValueError(f"prompts file {p} is {p.stat().st_size} bytes, more than a prompt list needs "
                         f"(at most {MAX_PROMPTS_BYTES // 2**20} MiB): write one prompt a line")
    try:
        text = p.read_bytes().decode("utf-8")
    except UnicodeDecodeError:
        raise ValueError(f"prompts file {p} is not UTF-8 text (a binary file?): write one prompt a line") from None
    prompts = []
    for n, line in enumerate(text.splitlines(), 1):
        prompt = line.split("#", 1)[0].strip()
        if not prompt:
            continue
        if model is not None:
            try:
                model.check_prompts([prompt])
            except ValueError as e:
                raise type(e)(f"{p}:{n}: {e}") from None
        prompts.append(prompt)
    if not prompts:
        raise ValueError(f"prompts file {p} holds no prompt; write one prompt a line")
    return tuple(prompts)


def generate_set(model: Generator, settings: EvalSettings, transformer: torch.nn.Module | None = None,
                 progress: bool = False, on_step=None) -> tuple[torch.Tensor, float]:  # noqa: ANN001
    """All videos of the settings (N, 3, F, H, W) and the seconds per video."""
    from tqdm.auto import tqdm

    s = settings.resolved(model)
    prompts, seeds, gen = list(s.prompts), s.seeds, s.generation()
    out = []
    t0 = time.perf_counter()
    for i in tqdm(range(0, len(prompts), s.batch_size), desc="generating", disable=not progress):
        j = i + s.batch_size
        out.append(model.generate(prompts[i:j], seeds[i:j], gen, transformer=transformer, progress=progress,
                                  on_step=on_step))
    return torch.cat(out), (time.perf_counter() - t0) / len(prompts)


@dataclass
class Reference:
    """The FP run of a prompt set: its metrics, videos and (when recorded) per-step latents."""

    metrics: dict
    videos: torch.Tensor
    latents: Any = None


def evaluate_fp(model: Generator, settings: EvalSettings = EvalSettings(), progress: bool = False,
                clip=None) -> Reference:  # noqa: ANN001
    """Metrics of the full-precision model on the settings' prompts, with its videos (and latents)."""
    from workbench.metrics import LatentRecorder

    s = settings.resolved(model)
    rec = LatentRecorder(max_elements=s.latent_elements, seed=s.seed) if s.latents else None
    videos, spv = generate_set(model, s, progress=progress, on_step=rec)
    metrics = evaluate_videos(videos, model.oracle_scenes(list(s.prompts)), clip=clip, prompts=list(s.prompts),
                              flicker=True)
    metrics["seconds_per_video"] = spv
    metrics["num_videos"] = len(s.prompts)
    return Reference(metrics, videos, rec)


FP_KEYS = ("oracle_accuracy", "exact_match", "temporal_consistency", "flicker_score", "clip_score", "seconds_per_video")


def evaluate_quantized(
    model: Generator,
    transformer: torch.nn.Module,
    settings: EvalSettings = EvalSettings(),
    fp: Reference | None = None,
    progress: bool = False,
    clip=None,  # noqa: ANN001
) -> tuple[dict, torch.Tensor]:
    """Metrics of a quantized transformer against FP on the same prompts and seeds (FP values as `fp_*`):
    the video metrics (with the oracle's where the model has one), flicker against FP, the latent error per
    denoising step, CLIP scores with `clip`, seconds per video."""
    from workbench.metrics import LatentRecorder, latent_errors

    s = settings.resolved(model)
    fp = fp if fp is not None else evaluate_fp(model, s, progress, clip)
    rec = LatentRecorder(max_elements=s.latent_elements, seed=s.seed) if s.latents and fp.latents is not None else None
    videos, spv = generate_set(model, s, transformer=transformer, progress=progress, on_step=rec)
    metrics = evaluate_videos(videos, model.oracle_scenes(list(s.prompts)), reference=fp.videos, clip=clip,
                              prompts=list(s.prompts), flicker=True)
    if rec is not None:
        metrics.update(latent_errors(fp.latents, rec).as_dict())
    metrics["seconds_per_video"] = spv
    metrics["num_videos"] = len(s.prompts)
    for k in FP_KEYS:
        if k in fp.metrics:
            metrics[f"fp_{k}"] = fp.metrics[k]
    return metrics, videos


# The columns of the results table, in order (any other scalar metric follows them); the oracle's columns
# only for a model that has one.
TABLE_KEYS = ("oracle_accuracy", "exact_match", "temporal_consistency", "psnr_vs_fp", "ssim_vs_fp",
              "frechet_distance", "temporal_diff_error_vs_fp", "flicker_ratio_vs_fp", "latent_rel_l2_mean",
              "avg_weight_bits", "weight_mb", "seconds_per_video")
ORACLE_COLUMNS = ("oracle_accuracy", "exact_match", "temporal_consistency", "frechet_distance")


@dataclass
class QuantizedEntry:
    """One quantized transformer to compare: a label (recipe name), the module and its stage reports."""

    label: str
    transformer: torch.nn.Module
    reports: list = field(default_factory=list)
    info: dict[str, Any] = field(default_factory=dict)  # extra table columns (e.g. method, source directory)


def _row(label: str, metrics: dict, info: dict | None = None, oracle: bool = True) -> dict:
    scalars = {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not k.startswith(("per_", "fp_"))}
    keys = [k for k in TABLE_KEYS if oracle or k not in ORACLE_COLUMNS]
    first = {k: scalars.pop(k, None) for k in keys}  # every row has these columns, in this order
    return {"model": label, **(info or {}), **first, **scalars}


def comparison_content(model, entries: list[QuantizedEntry], settings: EvalSettings, title: str,
                       notes: list[str] = (), progress: bool = False) -> tuple[ReportContent, list[dict]]:
    """Generate and measure FP and every entry on the settings' prompts; the report content and its table rows."""
    from workbench.stages.ptq import weight_budget

    settings = settings.resolved(model)
    fp = evaluate_fp(model, settings, progress=progress)
    fp_size = weight_budget(model.transformer)
    oracle = model.oracle_scenes(list(settings.prompts[:1])) is not None
    rows = [_row("FP", {**fp.metrics, "avg_weight_bits": 32.0, "weight_mb": fp_size["fp_weight_mb"]}, oracle=oracle)]
    video_rows = [VideoRow("FP", fp.videos)]
    for e in entries:
        metrics, videos = evaluate_quantized(model, e.transformer, settings, fp=fp, progress=progress)
        size = weight_budget(e.transformer)
        rows.append(_row(e.label, {**metrics, "avg_weight_bits": size["avg_weight_bits"], "weight_mb": size["weight_mb"]},
                         e.info, oracle=oracle))
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
