"""The jobs behind `workbench recipes / quantize / eval / analyze`: whole runs built from library calls.

    from workbench.cli.jobs import quantize_recipe, evaluate_directory, analyze_recipe
    quantize_recipe("vidit-q-w8a8", "out/w8a8")            # run the recipe, save model + reports + manifest
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

ANALYSIS_FORMAT = "workbench-analysis"
EVAL_KEYS = ("oracle_accuracy", "psnr_vs_fp", "ssim_vs_fp", "temporal_consistency", "frechet_distance")


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


def _bundled(model: str = "tiny-world"):
    from workbench.models import load_bundled
    from workbench.models.bundled import BUNDLED

    if model not in BUNDLED:
        raise ValueError(f"`{model}` is not a bundled text-to-video model; choose one of {', '.join(BUNDLED)}")
    return load_bundled(model)


def quantize_recipe(recipe: str, out: str | Path, force: bool = False, seed: int = 0, progress: bool = False,
                    model: str = "tiny-world", restart: bool = False, checkpoints: bool = True) -> Path:
    """Run `recipe` (a shipped name or a YAML path) on the bundled model and save it to `out`
    (quantized state, stage reports, manifest: `workbench.io.rundir.save_quantized`).

    The output location is checked before any work. With `checkpoints` (the default) the run is resumable:
    its progress goes to `out/checkpoints/` (a snapshot after every stage, distillation checkpoints inside
    the loops); the same call again resumes there (`restart=True` starts over); the folder is removed once
    the run is saved."""
    from workbench.io.outdir import check_output
    from workbench.io.rundir import CHECKPOINTS, FORMAT_NAME, save_quantized
    from workbench.recipes import load_recipe, run_recipe

    if seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed}")
    r = load_recipe(recipe)  # a bad recipe fails before anything runs
    out = check_output(out, FORMAT_NAME, force=force, own=(CHECKPOINTS,))
    ckpt = out / CHECKPOINTS if checkpoints else None
    session = run_recipe(_bundled(model), r, progress=progress, seed=seed, checkpoint_dir=ckpt, restart=restart)
    path = save_quantized(session, out, force=force)
    if ckpt is not None:
        discard_checkpoints(ckpt)
    return path


def discard_checkpoints(directory: Path) -> None:
    """Remove a finished run's checkpoint folder (only the files a resumable run writes)."""
    from workbench.recipes import ResumableRun

    ResumableRun.discard_dir(Path(directory))


def _finite(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


def evaluate_directory(directory: str | Path, settings: EvalSettings = EvalSettings(),
                       progress: bool = False) -> dict[str, Any]:
    """Metrics of a saved quantized model against its FP model on the same prompts and seeds.

    Returns one flat dict: the quantized model's metrics (`EVAL_KEYS` first), the FP model's as `fp_*`,
    and what was evaluated (directory, recipe, seed, steps, guidance, prompts). Non-finite numbers
    (PSNR of identical videos) become None so the dict is valid JSON."""
    from workbench.io.rundir import load_quantized
    from workbench.eval.prompt_set import evaluate_quantized

    model, qtransformer, manifest = load_quantized(directory)
    if not hasattr(model, "generate_many"):
        raise ValueError(f"{directory} holds a bare transformer ({manifest['model']['name']}); evaluation needs a "
                         "text-to-video model: quantize the bundled model (workbench quantize --recipe ...)")
    metrics, _ = evaluate_quantized(model, qtransformer, settings, progress=progress)
    first = {k: metrics[k] for k in EVAL_KEYS if k in metrics}
    fp = {k: v for k, v in metrics.items() if k.startswith("fp_")}
    rest = {k: v for k, v in metrics.items() if k not in first and k not in fp and not k.startswith("per_")}
    info = {
        "directory": str(directory),
        "recipe": (manifest.get("recipe") or {}).get("name"),
        "seed": settings.seed,
        "steps": settings.steps,
        "guidance": settings.guidance,
        "num_prompts": len(settings.prompts),
    }
    return {k: _finite(v) for k, v in {**first, **fp, **rest, **info}.items()}


def analyze_recipe(recipe: str, out: str | Path, force: bool = False, seed: int = 0, prompts: int = 2,
                   steps: int = 8, progress: bool = False, model: str = "tiny-world") -> Path:
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
    session = Session.start(_bundled(model), seed=seed, progress=progress)
    session.recipe = {"name": r.name, "recipe": r.to_dict()}
    cal = dict(next((s for name, s in r.stages if name == "collect_calibration"), {}))
    collect_calibration(session, CalibrationSettings(**cal))
    report = analyze_error_sources(session, AnalysisSettings(quant=r.quant, prompts=prompts, steps=steps))
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


__all__ = ["EVAL_KEYS", "analyze_recipe", "discard_checkpoints", "evaluate_directory", "quantize_recipe", "recipe_rows"]
