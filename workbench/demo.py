"""The main job on the bundled model: evaluate it and write the HTML report (`make demo`)."""
from __future__ import annotations

import json
from pathlib import Path

from workbench.evaluation import EvalSettings, evaluate_fp
from workbench.models import load_bundled
from workbench.report import ReportContent, VideoRow, write_report


def run_demo(out: Path, model_name: str = "tiny-world", settings: EvalSettings = EvalSettings(), force: bool = False) -> Path:
    """Generate the prompt set with the FP model, measure it, write out/report.html and metrics.json."""
    report_path = out / "report.html"
    if report_path.exists() and not force:
        raise FileExistsError(f"{report_path} exists; pass --force (make demo FORCE=1) to overwrite it")
    model = load_bundled(model_name)
    fp_metrics, fp_videos = evaluate_fp(model, settings, progress=True)
    rows = [{"model": "FP (bf16/fp32 reference)", **{k: v for k, v in fp_metrics.items() if not k.startswith("per_")}}]
    content = ReportContent(
        title=f"Workbench report: {model_name}",
        prompts=list(settings.prompts),
        rows=[VideoRow("FP", fp_videos)],
        table=rows,
        notes=[f"{len(settings.prompts)} prompts, seeds {settings.seed}..{settings.seed + len(settings.prompts) - 1}, "
               f"{settings.steps} steps, guidance {settings.guidance}."],
    )
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.json").write_text(json.dumps(rows, indent=2))
    return write_report(content, report_path, overwrite=force)
