"""The HTML reports of whole runs: `make demo` (FP and a quantized recipe) and `workbench report DIR...`.

    run_demo(Path("out/demo"))                          # FP + vidit-q-w8a8 on the held-out prompts
    run_report(["out/w8a8", "out/w4a8"], "out/report.html")   # saved quantized models, one page

Both generate the same prompts and seeds with the FP model and with each quantized transformer, measure
them against FP (`workbench.eval.prompt_set`), and write one self-contained page (`workbench.viz.html`): the
results table, the videos side by side (one row per model, one column per prompt) and every stage's
figures, grouped by recipe. `metrics.json` beside the page holds the table.
"""
from __future__ import annotations

import json
from pathlib import Path

from workbench.eval.compare import QUICK, CalibrationBudget, scaled_recipe
from workbench.eval.prompt_set import EvalSettings, QuantizedEntry, comparison_content
from workbench.models.generator import Generator
from workbench.viz.html import ReportContent, write_report

DEMO_RECIPES = ("vidit-q-w8a8",)
# `make demo` must finish in minutes on a laptop CPU: the recipe runs on a scaled-down calibration set (the
# page says so); `workbench quantize` + `workbench report` give the recipe as published.
DEMO_BUDGET = QUICK


def _write(content: ReportContent, rows: list[dict], report_path: Path, force: bool) -> Path:
    report_path.parent.mkdir(parents=True, exist_ok=True)
    path = write_report(content, report_path, overwrite=force)
    (report_path.parent / "metrics.json").write_text(json.dumps(rows, indent=2, allow_nan=False, default=str))
    return path


def run_demo(out: Path, model_name: str = "tiny-world", settings: EvalSettings = EvalSettings(), force: bool = False,
             recipes: tuple[str, ...] = DEMO_RECIPES, budget: CalibrationBudget = DEMO_BUDGET, seed: int = 0,
             progress: bool = True, prompts_file: str | None = None, device: str = "cpu") -> Path:
    """Quantize a model (bundled name or pipeline folder) with `recipes`, generate the prompt set with FP and
    each, write out/report.html and out/metrics.json (one row per model)."""
    from dataclasses import replace

    from workbench.eval.prompt_set import read_prompts_file
    from workbench.models import load_generator
    from workbench.recipes import load_recipe, run_recipe

    out = Path(out)
    report_path = out / "report.html"
    if report_path.exists() and not force:
        raise FileExistsError(f"{report_path} exists; pass --force (make demo FORCE=1) to overwrite it")
    chosen = [scaled_recipe(load_recipe(r), budget) for r in recipes]  # a bad recipe fails before the long work
    model = load_generator(model_name, device)
    if prompts_file is not None:
        settings = replace(settings, prompts=read_prompts_file(prompts_file, model))
    entries = []
    for r in chosen:
        session = run_recipe(model, r, progress=progress, seed=seed)
        entries.append(QuantizedEntry(r.name, session.qtransformer.eval(), session.reports, {"method": r.method}))
    content, rows = comparison_content(
        model, entries, settings, f"Workbench report: {model.name}",
        notes=[f"Recipes: {', '.join(recipes) or 'none'} (calibration budget: {budget.label})."], progress=progress)
    return _write(content, rows, report_path, force)


def run_report(directories: list[str | Path], out: str | Path, settings: EvalSettings = EvalSettings(),
               force: bool = False, progress: bool = True, prompts_file: str | None = None) -> Path:
    """One page comparing saved quantized models (`workbench quantize --out DIR`) with their FP model.

    Every directory must hold the same text-to-video model; its stage reports (reports.json) are
    drawn again. `out` is the HTML file; metrics.json is written beside it.
    """
    from workbench.io.rundir import load_quantized, load_reports

    out = Path(out)
    if out.suffix.lower() not in (".html", ".htm"):
        raise ValueError(f"--out must be an .html file, got {out}")
    if out.exists() and not force:
        raise FileExistsError(f"{out} exists; choose another --out or pass --force to overwrite it")
    if not directories:
        raise ValueError("give at least one directory written by `workbench quantize`")
    model, entries, model_names = None, [], set()
    for d in directories:
        d = Path(d)
        if not d.is_dir():
            raise FileNotFoundError(f"{d} is not a directory; give directories written by `workbench quantize --out DIR`")
        fp_model, qt, manifest = load_quantized(d)
        if not isinstance(fp_model, Generator):
            raise ValueError(f"{d} holds a bare transformer; the report generates videos, which needs a text-to-video model")
        name = manifest["model"].get("name") or "model"
        model_names.add(name)
        if len(model_names) > 1:
            raise ValueError(f"{d} holds {name}, but earlier directories hold {sorted(model_names - {name})}: "
                             "a report compares quantized versions of one model")
        model = model if model is not None else fp_model
        recipe = manifest.get("recipe") or {}
        label = recipe.get("name") or d.name
        if any(e.label == label for e in entries):
            label = f"{label} ({d.name})"
        entries.append(QuantizedEntry(label, qt.eval(), load_reports(d),
                                      {"method": (recipe.get("recipe") or {}).get("method", ""), "directory": str(d)}))
    if prompts_file is not None:
        from dataclasses import replace

        from workbench.eval.prompt_set import read_prompts_file

        settings = replace(settings, prompts=read_prompts_file(prompts_file, model))
    content, rows = comparison_content(model, entries, settings, f"Workbench report: {model_names.pop()}",
                                       progress=progress)
    return _write(content, rows, out, force)
