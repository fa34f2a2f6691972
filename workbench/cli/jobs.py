"""The jobs behind `workbench recipes / quantize / eval / analyze`: whole runs built from library calls.

    from workbench.cli.jobs import quantize_recipe, evaluate_directory, analyze_recipe
    quantize_recipe("vidit-q-w8a8", "out/w8a8")            # run the recipe, save model + reports + manifest
    quantize_recipe("s2q-vdit-w4a6", "out/cog", model="models/CogVideoX-2b", device="cuda")   # a local pipeline
    evaluate_directory("out/w8a8")                          # metrics vs FP on the held-out prompts
    analyze_recipe("naive-w4a8", "out/analysis")            # error-source report as one HTML page

Each job checks its output directory before the long work starts, so a refused overwrite costs nothing.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from workbench.eval.prompt_set import EvalSettings
from dataclasses import dataclass

ANALYSIS_FORMAT = "workbench-analysis"
EVAL_KEYS = ("oracle_accuracy", "psnr_vs_fp", "ssim_vs_fp", "temporal_consistency", "temporal_diff_error_vs_fp",
             "flicker_ratio_vs_fp", "latent_rel_l2_mean", "clip_score", "clip_fd_vs_fp", "frechet_distance",
             "seconds_per_video")
DTYPES = {"fp32": "float32", "float32": "float32", "bf16": "bfloat16", "bfloat16": "bfloat16", "fp16": "float16",
          "float16": "float16"}


def parse_dtype(name: str | None):  # noqa: ANN201
    """A torch dtype from a name (fp32 / bf16 / fp16), or None for the default."""
    import torch

    if name is None:
        return None
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}; choose one of fp32, bf16, fp16")
    return getattr(torch, DTYPES[name])


def recipe_rows() -> list[dict[str, Any]]:
    """One row per shipped recipe: name, method, weight / activation format, stages, description."""
    from workbench.quant import QuantConfig
    from workbench.recipes import list_recipes, load_recipe

    rows = []
    for name in list_recipes():
        r = load_recipe(name)
        cfg = QuantConfig.from_dict(r.quant)
        act = cfg.act
        rows.append({
            "name": name,
            "method": r.method,
            "weight": None if cfg.weight is None else f"{cfg.weight.format} per {cfg.weight.granularity}",
            "act": None if act is None else f"{act.format} per {act.granularity}, {'dynamic' if act.dynamic else 'static'}",
            "stages": [s for s, _ in r.stages],
            "description": r.description,
        })
    return rows


def load_model(model: str = "tiny-world", device: str = "cpu", dtype: str | None = None):  # noqa: ANN201
    """The generator a job runs on: a bundled name or a local pipeline folder (`workbench.models.load_generator`)."""
    from workbench.models import load_generator

    return load_generator(model, device, parse_dtype(dtype))


@dataclass(frozen=True)
class VideoOptions:
    """What a command line may override in a recipe's generating stages (calibration, analysis): the prompt
    file and the video size (None: the recipe's / the model's)."""

    prompts: str | None = None
    frames: int | None = None
    height: int | None = None
    width: int | None = None

    def apply(self, recipe, model):  # noqa: ANN001, ANN201
        """The recipe with these overrides in its collect_calibration / analyze_error_sources stages."""
        from workbench.eval.prompt_set import read_prompts_file
        from workbench.recipes import Recipe

        sizes = {k: v for k, v in (("frames", self.frames), ("height", self.height), ("width", self.width))
                 if v is not None}
        prompts = None if self.prompts is None else list(read_prompts_file(self.prompts, model))
        if not sizes and prompts is None:
            return recipe
        stages = []
        for name, settings in recipe.stages:
            settings = dict(settings)
            if name in ("collect_calibration", "analyze_error_sources"):
                settings.update(sizes)
            if name == "collect_calibration" and prompts is not None:
                settings["prompt_list"] = prompts
            stages.append((name, settings))
        return Recipe(recipe.name, recipe.quant, stages, recipe.method, recipe.description, recipe.source)


def check_video_settings(recipe, model) -> None:  # noqa: ANN001
    """Every generating stage's sampler settings and prompts fit the model (`Generator.check_settings`)."""
    for name, info in recipe.settings():
        generation = getattr(info, "generation", None)
        if callable(generation):
            model.check_settings(generation().resolved(model.defaults()))
        if getattr(info, "prompt_list", None):
            model.check_prompts(list(info.prompt_list))


def quantize_recipe(recipe: str, out: str | Path, force: bool = False, seed: int = 0, progress: bool = False,
                    model: str = "tiny-world", restart: bool = False, checkpoints: bool = True,
                    options: VideoOptions = VideoOptions(), device: str = "cpu", dtype: str | None = None) -> Path:
    """Run `recipe` (a shipped name or a YAML path) on `model` (a bundled name or a local pipeline folder)
    and save it to `out` (quantized state, stage reports, manifest: `workbench.io.rundir.save_quantized`).

    The output location is checked before any work. With `checkpoints` (the default) the run is resumable:
    its progress goes to `out/checkpoints/` (a snapshot after every stage, distillation checkpoints inside
    the loops); the same call again resumes there (`restart=True` starts over); the folder is removed once
    the run is saved. `options` overrides the calibration prompts and video size.

    Under torchrun (a process group is initialised, `workbench.distributed`) every rank runs the recipe on its
    own device (any CUDA `device` means the rank's GPU); rank 0 alone saves the result and removes the
    checkpoints while the others wait."""
    from workbench import distributed
    from workbench.io.outdir import check_output
    from workbench.io.rundir import CHECKPOINTS, FORMAT_NAME, save_quantized
    from workbench.recipes import load_recipe, run_recipe

    if seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed}")
    r = load_recipe(recipe)  # a bad recipe fails before anything runs
    out = check_output(out, FORMAT_NAME, force=force, own=(CHECKPOINTS,))
    if distributed.active():
        device = str(distributed.rank_device(device))
    generator = load_model(model, device, dtype)
    r = options.apply(r, generator)
    check_video_settings(r, generator)  # a size or prompt the model cannot take fails before any work
    ckpt = out / CHECKPOINTS if checkpoints else None
    session = run_recipe(generator, r, progress=progress, seed=seed, checkpoint_dir=ckpt, restart=restart)
    path = out
    if distributed.is_main():
        path = save_quantized(session, out, force=force)
        if ckpt is not None:
            discard_checkpoints(ckpt)
    distributed.barrier("saving the quantized model")
    return path


def discard_checkpoints(directory: Path) -> None:
    """Remove a finished run's checkpoint folder (only the files a resumable run writes)."""
    from workbench.recipes import ResumableRun

    ResumableRun.discard_dir(Path(directory))


def _finite(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


def evaluate_directory(directory: str | Path, settings: EvalSettings = EvalSettings(), progress: bool = False,
                       model: str | None = None, device: str = "cpu", dtype: str | None = None,
                       prompts_file: str | None = None, clip: str | None = None) -> dict[str, Any]:
    """Metrics of a saved quantized model against its FP model on the same prompts and seeds.

    Returns one flat dict: the quantized model's metrics (`EVAL_KEYS` first; oracle accuracy only where the
    model has an oracle), the FP model's as `fp_*`, and what was evaluated (directory, recipe, seed, steps,
    guidance, size, prompts). Non-finite numbers become None so the dict is valid JSON. `model` points to
    the pipeline folder when it moved since the run; `clip` to a local CLIP checkpoint for CLIP scores."""
    from dataclasses import replace

    from workbench.eval.prompt_set import evaluate_quantized, read_prompts_file
    from workbench.io.rundir import load_quantized
    from workbench.models.generator import Generator

    clip_model = None
    if clip is not None:
        from workbench.metrics import load_clip

        clip_model = load_clip(clip, device)  # a bad CLIP folder fails before the long work
    gen, qtransformer, manifest = load_quantized(directory, model, device, parse_dtype(dtype))
    if not isinstance(gen, Generator):
        raise ValueError(f"{directory} holds a bare transformer ({manifest['model']['name']}); evaluation needs a "
                         "text-to-video model: quantize the bundled model or a pipeline folder")
    if prompts_file is not None:
        settings = replace(settings, prompts=read_prompts_file(prompts_file, gen))
    settings = settings.resolved(gen)
    metrics, _ = evaluate_quantized(gen, qtransformer, settings, progress=progress, clip=clip_model)
    first = {k: metrics[k] for k in EVAL_KEYS if k in metrics}
    fp = {k: v for k, v in metrics.items() if k.startswith("fp_")}
    rest = {k: v for k, v in metrics.items() if k not in first and k not in fp and not k.startswith("per_")
            and isinstance(v, (int, float, str, bool, type(None)))}
    info = {
        "directory": str(directory),
        "recipe": (manifest.get("recipe") or {}).get("name"),
        "model": gen.name,
        "seed": settings.seed,
        "steps": settings.steps,
        "guidance": settings.guidance,
        "frames": settings.frames,
        "height": settings.height,
        "width": settings.width,
        "num_prompts": len(settings.prompts),
    }
    return {k: _finite(v) for k, v in {**first, **fp, **rest, **info}.items()}


def analyze_recipe(recipe: str, out: str | Path, force: bool = False, seed: int = 0, prompts: int = 2,
                   steps: int = 8, progress: bool = False, model: str = "tiny-world", device: str = "cpu",
                   dtype: str | None = None, options: VideoOptions = VideoOptions()) -> Path:
    """Error-source analysis of the bundled model with the recipe's quant config as the probe, written as
    `out/analysis.html` (self-contained, with the figures) and `out/reports.json`; returns the HTML path.

    Calibration uses the recipe's `collect_calibration` settings when it has them; the analysis runs all
    four parts (activations, weights, layer errors, metric-decoupled sensitivity on `prompts` generated
    training-scene videos of `steps` steps)."""
    from workbench.io.manifest import file_entries, write_manifest
    from workbench.io.outdir import check_output, staged_output
    from workbench.recipes import load_recipe
    from workbench.session import Session
    from workbench.stages import AnalysisSettings, CalibrationSettings, analyze_error_sources, collect_calibration
    from workbench.viz.html import ReportContent, write_report

    if seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed}")
    r = load_recipe(recipe)
    out = check_output(out, ANALYSIS_FORMAT, force=force)
    generator = load_model(model, device, dtype)
    r = options.apply(r, generator)
    check_video_settings(r, generator)
    session = Session.start(generator, seed=seed, progress=progress)
    session.recipe = {"name": r.name, "recipe": r.to_dict()}
    cal = dict(next((s for name, s in r.stages if name == "collect_calibration"), {}))
    collect_calibration(session, CalibrationSettings(**cal))
    sizes = {k: v for k, v in (("frames", options.frames), ("height", options.height), ("width", options.width))
             if v is not None}
    report = analyze_error_sources(session, AnalysisSettings(quant=r.quant, prompts=prompts, steps=steps, **sizes))
    table = [{"quantity": k, "value": v} for k, v in report.summary.items()]
    content = ReportContent(
        title=f"Error sources: {session.model_name} under {r.name}",
        prompts=[],
        table=table,
        stage_reports=session.reports,
        notes=[f"Probe quant config: {json.dumps(r.quant)}",
               *report.notes,
               f"Seed {seed}; sensitivity measured on {prompts} generated training-scene prompts x {steps} steps."],
    )
    with staged_output(out, ANALYSIS_FORMAT) as tmp:
        (tmp / "reports.json").write_text(json.dumps([x.to_dict() for x in session.reports], indent=1, allow_nan=False))
        write_report(content, tmp / "analysis.html")
        write_manifest(tmp / "manifest.json", {"format": ANALYSIS_FORMAT, "recipe": r.name, "seed": seed,
                                               "files": file_entries(tmp, ["reports.json", "analysis.html"])})
    return out / "analysis.html"


__all__ = ["EVAL_KEYS", "VideoOptions", "analyze_recipe", "discard_checkpoints", "evaluate_directory", "load_model",
           "parse_dtype", "quantize_recipe", "recipe_rows"]
