"""Q-VDiT: Token-aware Quantization Estimator and Temporal Maintenance Distillation.

Training is judged on held-out prompts (`distill_helpers.heldout_errors`), the folding of the in-quantizer
estimate by the quantized model's output just before and just after it."""
from __future__ import annotations

import pytest
import torch

from distill_helpers import fresh, heldout_calibration, heldout_errors
from workbench.stages import qvdit as QV
from workbench.stages.distill import TermContext
from workbench.stages.qvdit import QVDiTSettings, TemporalRelationLoss, TokenAwareEstimator, qvdit_distill


def test_token_aware_estimator_starts_at_zero_and_scales_per_frame():
    est = TokenAwareEstimator(8, 6, rank=2, tokens=12, frames=3, token_mode="frame")
    est.reset_parameters(torch.Generator().manual_seed(0))
    x = torch.randn(2, 12, 8)
    assert torch.equal(est(x, None), torch.zeros(2, 12, 6))  # B = 0: training starts from plain quantization
    with torch.no_grad():
        est.B.normal_()
        est.token_scale.copy_(torch.tensor([1.0, 0.0, 2.0]))
    d = est(x, None)
    plain = x @ (est.B @ est.A).T
    assert torch.allclose(d[:, :4], plain[:, :4]) and torch.equal(d[:, 4:8], torch.zeros(2, 4, 6))
    assert torch.allclose(d[:, 8:], 2 * plain[:, 8:])
    # a sequence that is not the video grid (e.g. text tokens) gets no token scale
    assert torch.allclose(est(x[:, :5], None), plain[:, :5])
    with pytest.raises(ValueError, match="token_mode"):
        TokenAwareEstimator(8, 6, token_mode="pixel")


def _ctx(pred, target):
    return TermContext(pred, target, "transformer", 0, torch.zeros(pred.shape[0]), None, (4, 2, 2), "e2e",
                       torch.Generator())


def test_temporal_maintenance_loss_compares_frame_relations():
    target = torch.randn(2, 3, 4, 2, 2)  # (B, C, F, H, W)
    tmd = TemporalRelationLoss()
    assert float(tmd(_ctx(target, target))) == pytest.approx(0.0, abs=1e-6)
    pred = target.clone().requires_grad_(True)
    with torch.no_grad():
        pred[:, :, 1] = torch.randn(2, 3, 2, 2)  # frame 1 no longer relates to the others as in FP
    loss = tmd(_ctx(pred, target))
    assert float(loss) > 0
    loss.backward()
    assert pred.grad.abs().sum() > 0
    # scaling a frame does not change cosine relations: TMD measures relations, not values
    scaled = target.clone()
    scaled[:, :, 2] *= 3.0
    assert float(tmd(_ctx(scaled, target))) == pytest.approx(0.0, abs=1e-6)


def test_qvdit_distill_trains_and_folds_the_estimator(monkeypatch):
    """End-to-end Q-VDiT lowers the output error on held-out prompts; folding Q(W + B_in A_in) into W leaves the
    model's output bit for bit unchanged (the weight quantizer already saw W + B_in A_in) while the folded weights
    differ from the untrained ones (the estimate was trained away from B_in = 0)."""
    s = fresh()
    before = heldout_errors(s.qtransformer)
    w0 = {k: v.detach().clone() for k, v in s.qtransformer.state_dict().items() if k.endswith(".weight")}
    entries = heldout_calibration().entries
    seen = {}
    real_bake = QV.bake_weight_deltas

    def checked_bake(model):
        with torch.no_grad():
            seen["before"] = [o.clone() for o in heldout_calibration().replay(model, entries)]
            done = real_bake(model)
            seen["after"] = heldout_calibration().replay(model, entries)
        return done

    monkeypatch.setattr(QV, "bake_weight_deltas", checked_bake)
    rep = qvdit_distill(s, QVDiTSettings(mode="e2e", iters=5, lr=1e-2, tqe_rank=2, tqe_out_rank=2, eval_rows=4,
                                         similarity_rows=2))
    assert rep.summary["tqe_layers"] > 0
    assert rep.summary["tqe_inner_baked"] == rep.summary["tqe_layers"]  # Q(W + BA): folded into W
    assert all(torch.equal(x, y) for x, y in zip(seen["before"], seen["after"]))
    assert not any("parametrizations" in k for k in s.qtransformer.state_dict())
    after_w = s.qtransformer.state_dict()
    moved = [k for k in w0 if not torch.equal(w0[k], after_w[k])]
    assert len(moved) == rep.summary["tqe_layers"]
    assert rep.summary["tqe_branches"] == rep.summary["tqe_layers"]
    curves = rep.arrays["curves"]
    assert set(curves) >= {"total", "rec", "tmd"}
    after = heldout_errors(s.qtransformer)
    assert after["output"] < 0.75 * before["output"]  # measured 0.54x
    # video-token layers got one scale per frame, the text-reading cross-attention keys / values none
    grid = rep.arrays["grid"]
    scales = rep.arrays["token_scales"]
    assert scales and all(len(v) == grid[0] for v in scales.values())
    assert not any(k.endswith(("attn2.to_k", "attn2.to_v")) for k in scales)
    assert rep.figures()


def test_qvdit_ablation_without_tqe_has_no_branches():
    s = fresh()
    rep = qvdit_distill(s, QVDiTSettings(iters=2, tqe=False, tmd=False, blocks=["blocks.0"], eval_rows=0,
                                         similarity_rows=2))
    assert rep.summary["tqe_branches"] == 0 and "tmd" not in rep.arrays["curves"]


def test_tmd_cannot_see_a_reversed_direction_but_sees_speed():
    """Q-VDiT's frame-relation loss is blind to playing a constant-speed clip backwards (a documented limit,
    docs/results.md W3A6 section): the similarity matrix depends only on |i - j|. A speed change it does see."""
    from workbench.stages.distill import frame_similarity, relation_kl
    from workbench.world.render import render_prompt

    def sims(prompt: str, flip: bool = False) -> torch.Tensor:
        v = render_prompt(prompt, seed=0)  # (C, F, H, W)
        v = v.flip(1) if flip else v
        return frame_similarity(v.permute(1, 0, 2, 3).reshape(1, v.shape[1], -1))

    clip = sims("a red circle moving right slow")
    assert relation_kl(sims("a red circle moving right slow", flip=True), clip) < 1e-5
    assert relation_kl(sims("a red circle moving right fast"), clip) > 1e-2


def test_block_recomputation_trains_the_estimators_alike():
    """Q-VDiT end to end with every block recomputed in backward (grad_checkpoint, the GPU default) trains the
    TQE branches and scales to the same values as keeping the activations."""
    from distill_helpers import state_of

    states = []
    for recompute in (False, True):
        s = fresh()
        qvdit_distill(s, QVDiTSettings(mode="e2e", iters=3, batch_size=4, eval_rows=0, grad_checkpoint=recompute,
                                       tqe_rank=4, tqe_out_rank=2))
        states.append(state_of(s.qtransformer))
    assert states[0].keys() == states[1].keys() and any("tqe" in k.lower() for k in states[0])
    for k in states[0]:
        torch.testing.assert_close(states[1][k], states[0][k], rtol=1e-5, atol=1e-7)
