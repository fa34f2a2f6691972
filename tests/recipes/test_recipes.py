from __future__ import annotations

import sys
from pathlib import Path

import pytest
import yaml

from stage_helpers import tiny_world_model  # noqa: E402
from workbench.models.generator import GenerationSettings
from workbench.quant import QuantConfig  # noqa: E402
from workbench.recipes import RecipeError, list_recipes, load_recipe, recipe_from_dict, run_recipe  # noqa: E402

EXPECTED = {"naive-w8a8", "naive-w4a8", "naive-w4a6", "naive-w3a6", "vidit-q-w8a8", "vidit-q-w4a8", "vidit-q-w4a6",
            "vidit-q-w3a6", "s2q-vdit-w4a6", "q-vdit-w3a6", "q-vdit-w4a6", "mpq-dmv2-w3a6", "mpq-dmv2-w4a6"}


def test_every_recipe_loads():
    names = list_recipes()
    assert EXPECTED <= set(names)
    for name in names:
        r = load_recipe(name)
        assert r.name == name and r.stages and r.description
        QuantConfig.from_dict(r.quant)
        assert len(r.settings()) == len(r.stages)
        assert recipe_from_dict(r.to_dict()).to_dict() == r.to_dict()


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_recipe_bits_match_name(name):
    r = load_recipe(name)
    w, a = name.split("-w")[1].split("a")
    cfg = QuantConfig.from_dict(r.quant)
    assert cfg.weight.bits == int(w) and cfg.act.bits == int(a)
    if name.startswith("naive"):
        assert not cfg.act.dynamic and cfg.act.granularity == "tensor" and cfg.weight.granularity == "channel"
    else:
        assert cfg.act.dynamic and cfg.act.granularity == "token"


def _good() -> dict:
    return load_recipe("naive-w8a8").to_dict()


def test_unknown_recipe_lists_available():
    with pytest.raises(RecipeError, match="unknown recipe 'vidit-q-w2a2'.*naive-w8a8.*vidit-q-w8a8"):
        load_recipe("vidit-q-w2a2")
    with pytest.raises(RecipeError, match="does not exist"):
        load_recipe("no/such/file.yaml")


@pytest.mark.parametrize("change, match", [
    (lambda d: d.update(stagez=[]), "unknown field 'stagez'"),
    (lambda d: d["quant"].update(wieght={}), "unknown field 'wieght'"),
    (lambda d: d["stages"].append({"collect_calibration": {"promts": 3}}), "unknown field 'promts'.*collect_calibration"),
    (lambda d: d["stages"].append({"quantize_everything": {}}), "unknown stage 'quantize_everything'"),
    (lambda d: d["quant"]["weight"].update(format="int9"), "bit-width 9 is outside 2..8"),
    (lambda d: d["quant"]["act"].update(format="uint1"), "bit-width 1 is outside 2..8"),
    (lambda d: d["quant"]["weight"].update(bits=12), "bit-width 12 is outside 2..8"),
    (lambda d: d["stages"].append({"assign_mixed_precision": {"high_bits": 16}}), "bit-width 16 is outside 2..8"),
    (lambda d: d["stages"].append({"collect_calibration": {"prompts": "many"}}), "prompts must be int"),
    (lambda d: d.pop("stages"), "missing field 'stages'"),
    (lambda d: d.update(stages=[]), "non-empty list"),
])
def test_bad_recipes_give_clear_errors(change, match):
    d = _good()
    change(d)
    with pytest.raises(RecipeError, match=match):
        recipe_from_dict(d)


def test_recipe_file_by_path(tmp_path):
    p = tmp_path / "mine.yaml"
    d = _good()
    d["name"] = "mine"
    p.write_text(yaml.safe_dump(d))
    assert load_recipe(str(p)).name == "mine"
    p.write_text("name: [unclosed")
    with pytest.raises(RecipeError, match="not valid YAML"):
        load_recipe(p)


def test_run_recipe_end_to_end(tmp_path):
    """The vidit-q-w4a8 stage list, shrunk to run in seconds on the 2-block model."""
    d = load_recipe("vidit-q-w4a8").to_dict()
    small = {
        "collect_calibration": {"prompts": 2, "steps": 2},
        "analyze_error_sources": {"activations": False, "weights": False, "layer_errors": False, "prompts": 1,
                                  "steps": 2, "grouping": "block_all"},
        "calibrate_ranges": {"alpha_search": [0.1, 0.5], "compare_observers": False, "sample_rows": 64},
    }
    d["stages"] = [{k: {**v, **small.get(k, {})}} for s in d["stages"] for k, v in s.items()]
    session = run_recipe(tiny_world_model(), recipe_from_dict(d), seed=1)
    assert [r.name for r in session.reports] == [k for s in d["stages"] for k in s]
    assert session.recipe["name"] == "vidit-q-w4a8" and session.seed == 1
    mp = session.last_report("assign_mixed_precision")
    assert mp.summary["avg_weight_bits"] <= 5.0 + 1e-9
    v = session.fp_model.generate(["a red circle moving right"], [0], GenerationSettings(steps=2), transformer=session.qtransformer)
    assert v.isfinite().all()
