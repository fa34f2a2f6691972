"""The pieces behind the app and the notebooks that need no model: recipe scaling, bit-width labels, prompt
checks, and the explorer's three ways of quantizing one activation tensor."""
import pytest
import torch

from workbench.eval.compare import BIT_WIDTHS, FULL, QUICK, CalibrationBudget, describe_prompt, difference_video, scaled_recipe
from workbench.viz.explore import LayerSnapshot, fake_quantize, quantization_errors
from workbench.recipes import RecipeError, list_recipes, load_recipe


def test_bit_width_labels_name_shipped_recipes():
    assert set(BIT_WIDTHS) == {"W8A8", "W4A8", "W4A6", "W3A6"}
    assert set(BIT_WIDTHS.values()) <= set(list_recipes())
    assert BIT_WIDTHS["W8A8"] == "vidit-q-w8a8"


def test_scaled_recipe_caps_calibration_and_keeps_the_method():
    full = load_recipe("vidit-q-w4a8")
    quick = scaled_recipe("vidit-q-w4a8", QUICK)
    assert [n for n, _ in quick.stages] == [n for n, _ in full.stages] and quick.quant == full.quant
    cal = dict(quick.stages)["collect_calibration"]
    assert cal["prompts"] == QUICK.prompts and cal["steps"] == QUICK.steps
    ana = dict(quick.stages)["analyze_error_sources"]
    assert ana["prompts"] <= QUICK.prompts and ana["steps"] <= QUICK.steps
    assert dict(quick.stages)["calibrate_ranges"] == dict(full.stages)["calibrate_ranges"]
    assert dict(full.stages)["collect_calibration"]["prompts"] > QUICK.prompts  # the original is untouched
    assert scaled_recipe("vidit-q-w4a8", FULL).stages == full.stages
    assert scaled_recipe("naive-w8a8", CalibrationBudget(prompts=100)).stages == load_recipe("naive-w8a8").stages
    quick.settings()  # still valid settings for every stage
    distilled = dict(scaled_recipe("q-vdit-w3a6", QUICK).stages)
    assert distilled["qvdit_distill"]["iters"] == QUICK.iters
    assert {k: v for k, v in distilled["qvdit_distill"].items() if k != "iters"} == \
        {k: v for k, v in dict(load_recipe("q-vdit-w3a6").stages)["qvdit_distill"].items() if k != "iters"}
    with pytest.raises(RecipeError, match="available recipes"):
        scaled_recipe("no-such-recipe", QUICK)


def test_describe_prompt():
    assert describe_prompt("a fast red circle moving left") == "Reads as: a fast red circle moving left."
    bad = describe_prompt("a red dog moving left")
    assert bad.startswith("**Not a prompt") and "dog" in bad and "Vocabulary" in bad


def test_difference_video_is_amplified_and_clamped():
    fp, q = torch.zeros(3, 2, 4, 4), torch.zeros(3, 2, 4, 4)
    q[0, 1, 0, 0], q[1, 0, 0, 0] = 0.1, 0.9
    d = difference_video(fp, q)
    assert d[0, 1, 0, 0] == pytest.approx(0.4) and d[1, 0, 0, 0] == 1.0 and d.sum() == pytest.approx(1.4)


def _snapshot(outlier_token: bool, outlier_channel: bool) -> LayerSnapshot:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 16, generator=g)
    if outlier_token:
        x[5] *= 50
    if outlier_channel:
        x[:, 3] *= 50
    return LayerSnapshot("layer", 500.0, x, torch.randn(8, 16, generator=g), torch.zeros(8), (4, 4, 4))


def test_each_strategy_wins_on_its_own_kind_of_outlier():
    tok = quantization_errors(_snapshot(True, False), bits=6)
    assert tok["token"]["total"] < 0.2 * tok["tensor"]["total"]
    ch = quantization_errors(_snapshot(False, True), bits=6)
    assert ch["channel"]["total"] < 0.2 * ch["tensor"]["total"]
    e = tok["tensor"]
    assert e["token"].shape == (64,) and e["channel"].shape == (16,)
    # the per-tensor grid is sized for the outlier token: the other tokens lose the most, relatively
    assert e["token"][5] < e["token"].median()


def test_fake_quantize_grid_and_errors():
    x = torch.linspace(-1, 3, 40).reshape(5, 8)
    for s in ("tensor", "token", "channel"):
        xq = fake_quantize(x, s, bits=8)
        assert xq.shape == x.shape and (xq - x).abs().max() <= (x.max() - x.min()) / 255 + 1e-6
    assert fake_quantize(x, "tensor", 2).unique().numel() <= 4
    with pytest.raises(ValueError, match="unknown strategy"):
        fake_quantize(x, "group")
