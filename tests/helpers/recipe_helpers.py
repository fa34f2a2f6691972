"""Shrunk copies of the shipped recipes for tests: the same stages and formats with less data and fewer steps."""
from __future__ import annotations

from pathlib import Path

import yaml

from workbench.eval.compare import CalibrationBudget, scaled_recipe

SHRINK = {
    "analyze_error_sources": {"prompts": 1, "steps": 2, "timesteps": 1, "error_timesteps": 1, "sample_rows": 32},
    "calibrate_ranges": {"alpha_search": [0.5], "sample_rows": 64},
    "select_salient_calibration": {"budget": 4},
    "sparse_token_distill": {"batch_size": 2, "rows": 8},
    "qvdit_distill": {"batch_size": 2, "rows": 8},
    "mpq_distill": {"batch_size": 2, "rows": 8, "stat_calls": 1},
}


def shrunk_recipe(name: str, tmp_path: Path) -> Path:
    """The recipe with 2 calibration prompts x 2 steps, <= 3 training steps and the SHRINK settings, as YAML."""
    r = scaled_recipe(name, CalibrationBudget(prompts=2, steps=2, iters=3))
    d = r.to_dict()
    stages = []
    for item in d["stages"]:
        (stage, settings), = item.items()
        stages.append({stage: {**settings, **SHRINK.get(stage, {})}})
    d["stages"] = stages
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(d))
    return path
