"""The training script's pieces: input widening / temporal-patch inflation and a short CPU run."""
from __future__ import annotations

import json

import pytest
import torch

from workbench.models.tiny_dit import build_transformer, with_coordinate_channels
from workbench.models.train import direction_sign_gap, main, widen_input


def _old(**kw):
    torch.manual_seed(0)
    t = build_transformer(num_layers=2, patch_size=(1, 4, 4), in_channels=3, **kw).eval()
    with torch.no_grad():  # diffusers zero-inits nothing we rely on, but make every weight non-trivial
        for p in t.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return t


def _inputs(frames: int = 8):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, frames, 16, 16, generator=g)
    emb = torch.randn(2, 8, 64, generator=g)
    return x, torch.tensor([300.0, 800.0]), emb


def test_widened_channels_compute_what_the_old_model_did():
    old = _old()
    wide = widen_input(old, 6).eval()
    x, t, e = _inputs()
    with torch.no_grad():
        a = old(x, t, e, return_dict=False)[0]
        b = wide(with_coordinate_channels(x, 6), t, e, return_dict=False)[0]
    assert torch.allclose(a, b, atol=1e-5)
    assert widen_input(old, 3) is old


def test_temporal_patch_inflation_is_the_old_model_on_frame_pair_averages():
    old = _old()
    new = widen_input(old, 6, patch_t=2).eval()
    assert tuple(new.config.patch_size) == (2, 4, 4) and new.config.in_channels == 6
    x, t, e = _inputs()
    pairs = x.view(2, 3, 4, 2, 16, 16).mean(3)  # (B, C, 4, H, W)
    flat = pairs.repeat_interleave(2, dim=2)
    with torch.no_grad():
        got = new(with_coordinate_channels(flat, 6), t, e, return_dict=False)[0]
        want = old(pairs, t, e, return_dict=False)[0].repeat_interleave(2, dim=2)
    assert got.shape == (2, 3, 8, 16, 16)
    assert torch.allclose(got, want, atol=1e-4), (got - want).abs().max()


def test_widen_input_refuses_what_it_cannot_do():
    old = _old()
    with pytest.raises(ValueError, match="narrow"):
        widen_input(widen_input(old, 6), 4)
    with pytest.raises(ValueError, match="multiple"):
        widen_input(widen_input(old, 3, patch_t=2), 3, patch_t=3)


def test_sign_gap_is_zero_for_a_model_that_ignores_the_text():
    from workbench.models.text_encoder import TextEncoder
    from workbench.world.grammar import parse_prompt

    model = build_transformer(num_layers=1)
    with torch.no_grad():  # cross-attention output projections to zero: the text cannot reach the output
        for blk in model.blocks:
            blk.attn2.to_out[0].weight.zero_()
            blk.attn2.to_out[0].bias.zero_()
    scenes = [parse_prompt("a red circle moving left"), parse_prompt("a blue square moving up")]
    x0 = torch.rand(2, 3, 8, 32, 32) * 2 - 1
    assert direction_sign_gap(model, TextEncoder(), x0, scenes, 0.8) == pytest.approx(0.0, abs=1e-6)


def test_a_short_cpu_run_writes_the_bundled_layout_and_logs(tmp_path):
    out = tmp_path / "run"
    log = main(["--steps", "2", "--batch", "2", "--per-scene", "1", "--device", "cpu", "--eval-steps", "1",
                "--eval-seeds", "1", "--warmup", "1", "--out", str(out)])
    assert log["steps"] == 2 and len(log["sign_gap"]) == 1 and len(log["loss"]) == 1
    saved = json.loads((out / "train_log.json").read_text())
    assert saved["args"]["seed"] == 0 and "heldout" in saved["eval"]
    cfg = json.loads((out / "transformer" / "config.json").read_text())
    assert cfg["in_channels"] == 6 and cfg["patch_size"] == [2, 4, 4]
