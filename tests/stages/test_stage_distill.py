"""The shared distillation loop: it learns (judged on held-out prompts, `distill_helpers.heldout_errors`, not on
the rows it trained on), resumes bit for bit, and stops on NaN with a clear message."""
from __future__ import annotations

import pytest
import torch

from distill_helpers import fresh, heldout_errors, state_of
from workbench.stages.distill import (
    DistillDivergedError,
    DistillSettings,
    Term,
    distill,
    relation_kl,
    run_distillation,
    weighted_rel_mse,
)

BLOCK = ["blocks.0"]


def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs)


def test_block_reconstruction_lowers_the_block_error():
    """Block 0's output error on held-out prompts drops (measured 0.63x); the loss curve falls; the block that
    was not selected is only propagated."""
    s = fresh()
    before = state_of(s.qtransformer)
    held_before = heldout_errors(s.qtransformer)
    rows = sum(e.batch for e in s.calibration.entries)  # one batch of every row: the same problem at each step
    rep = distill(s, DistillSettings(iters=12, batch_size=rows, lr=1e-2, scale_lr=1e-2, blocks=BLOCK, train=["scales"],
                                     eval_rows=8))
    row = rep.tables["blocks"][0]
    assert row["block"] == "blocks.0" and row["trained"] and row["iterations"] == 12
    assert heldout_errors(s.qtransformer)["blocks.0"] < 0.85 * held_before["blocks.0"]
    curve = rep.arrays["curves"]["total"]["blocks.0"]
    assert curve[-1] < curve[0] and _mean(curve[-3:]) < _mean(curve[:3])
    # the untrained block was only propagated: its parameters did not move
    after = state_of(s.qtransformer)
    assert all(torch.equal(before[k], after[k]) for k in before if k.startswith("blocks.1."))
    assert any(not torch.equal(before[k], after[k]) for k in before if k.startswith("blocks.0."))
    assert rep.figures()


def test_end_to_end_mode_trains_the_whole_transformer():
    """The transformer's output error on held-out prompts drops (measured 0.57x)."""
    s = fresh()
    held_before = heldout_errors(s.qtransformer)["output"]
    res = run_distillation(s, DistillSettings(mode="e2e", iters=12, lr=1e-3, scale_lr=1e-3, train=["scales"], eval_rows=4))
    (unit,) = res.units
    assert unit.unit == "transformer" and len(unit.curves["total"]) == 12
    assert heldout_errors(s.qtransformer)["output"] < 0.75 * held_before


def test_block_recomputation_gives_the_same_result():
    """grad_checkpoint (e2e: every block recomputed in backward, on by default on a GPU) trains to the very same
    parameters (to float rounding) as keeping the activations, and the blocks' own forward is back afterwards."""
    from workbench.models.adapters import transformer_blocks

    states, ran = [], []
    for recompute in (False, True):
        s = fresh()
        blocks = list(transformer_blocks(s.qtransformer))
        calls = [0]
        inner = next(m for m in blocks[0].modules() if m is not blocks[0])  # a recomputed block runs its children
        hook = inner.register_forward_pre_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
        run_distillation(s, DistillSettings(mode="e2e", iters=3, lr=1e-3, scale_lr=1e-3, train=["scales"],
                                            eval_rows=0, grad_checkpoint=recompute))
        hook.remove()
        assert all("forward" not in vars(b) for b in blocks)
        states.append(state_of(s.qtransformer))
        ran.append(calls[0])
    assert states[0].keys() == states[1].keys()
    for k in states[0]:  # bit-identical in practice; float rounding is allowed should a kernel reorder a sum
        torch.testing.assert_close(states[1][k], states[0][k], rtol=1e-5, atol=1e-7)
    assert ran[1] > ran[0]  # the recomputation really ran the blocks again in backward


def test_token_weights_enter_the_reconstruction_loss():
    """Per-token weights reach the loss the loop optimises: with weight 0 on every token but the first, the loss
    is the error of that token alone (recomputed from the FP and quantized block outputs of the same rows), and
    with all weights 0 nothing is learned."""
    s = fresh()
    before = state_of(s.qtransformer)
    seen = {}

    def zeros(unit, fp_block, batch_fn, n):
        seen["tokens"] = batch_fn(torch.arange(1))["hidden_states"].shape[1]
        return torch.zeros(n, seen["tokens"])

    res = run_distillation(s, DistillSettings(iters=3, blocks=BLOCK, train=["scales"], eval_rows=0),
                           token_weights=zeros)
    assert res.units[0].curves["rec"] == [0.0, 0.0, 0.0]
    after = state_of(s.qtransformer)
    assert all(torch.equal(before[k], after[k]) for k in before)

    s = fresh()
    rows = sum(e.batch for e in s.calibration.entries)

    def first_token(unit, fp_block, batch_fn, n):
        w = torch.zeros(n, seen["tokens"])
        w[:, 0] = 1.0
        with torch.no_grad():
            seen["fp"] = fp_block(**batch_fn(torch.arange(n)))
            seen["q"] = s.qtransformer.get_submodule(unit)(**batch_fn(torch.arange(n)))
        return w

    res = run_distillation(s, DistillSettings(iters=1, batch_size=rows, blocks=BLOCK, train=["scales"], eval_rows=0,
                                              inputs="fp"), token_weights=first_token)
    fp, q = seen["fp"].float(), seen["q"].float()
    expected = float((q[:, 0] - fp[:, 0]).pow(2).sum() / fp.pow(2).sum())
    assert res.units[0].curves["rec"][0] == pytest.approx(expected, rel=1e-4)


def _interrupt_at(unit: str, iteration: int):
    def on_step(u: str, it: int, loss: float) -> None:
        if u == unit and it == iteration:
            raise KeyboardInterrupt

    return on_step


def test_resume_after_interruption_is_bit_identical(tmp_path):
    settings = dict(iters=4, lr=5e-3, train=["scales"], checkpoint_every=2, eval_rows=0)
    ref = fresh()
    run_distillation(ref, DistillSettings(**settings, checkpoint_dir=str(tmp_path / "a")))

    s = fresh()
    st = DistillSettings(**settings, checkpoint_dir=str(tmp_path / "b"))
    with pytest.raises(KeyboardInterrupt):
        run_distillation(s, st, on_step=_interrupt_at("blocks.1", 3))  # after the checkpoint at iteration 2
    resumed = fresh()  # a new process: the untrained model, the checkpoint on disk
    res = run_distillation(resumed, st)
    assert res.resumed_from is not None and "unit 1, iteration 2" in res.resumed_from
    a, b = state_of(ref.qtransformer), state_of(resumed.qtransformer)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    # a checkpoint of other settings is refused rather than silently mixed in
    with pytest.raises(ValueError, match="other settings"):
        run_distillation(fresh(), DistillSettings(**{**settings, "lr": 1e-3}, checkpoint_dir=str(tmp_path / "b")))


def test_nan_stops_with_a_clear_error_and_restores_the_block():
    s = fresh()
    before = state_of(s.qtransformer)

    def poison(ctx):
        return ctx.pred.sum() * (float("nan") if ctx.iteration == 2 else 0.0)

    with pytest.raises(DistillDivergedError, match=r"blocks\.0 at iteration 3 of 5.*nan \(poison term\).*Lower the learning rate"):
        run_distillation(s, DistillSettings(iters=5, train=["scales"], eval_rows=0), terms=[Term("poison", 1.0, poison)])
    after = state_of(s.qtransformer)
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_settings_are_validated():
    with pytest.raises(ValueError, match="unknown mode"):
        DistillSettings(mode="layer")
    with pytest.raises(ValueError, match="unknown trainable 'biases'"):
        DistillSettings(train=["biases"])
    with pytest.raises(ValueError, match="lr must be a positive"):
        DistillSettings(lr=float("nan"))
    with pytest.raises(ValueError, match="unknown block 'blocks.9'"):
        run_distillation(fresh(), DistillSettings(iters=1, blocks=["blocks.9"]))


def test_losses():
    x = torch.randn(2, 5, 3)
    assert float(weighted_rel_mse(x, x)) == 0.0
    y = x + 0.1 * torch.randn_like(x)
    assert torch.allclose(weighted_rel_mse(y, x), (y - x).pow(2).sum() / x.pow(2).sum())
    w = torch.ones(2, 5)
    assert torch.allclose(weighted_rel_mse(y, x, w), weighted_rel_mse(y, x))
    w0 = torch.zeros(2, 5)
    w0[:, 0] = 5.0  # only token 0 counts
    manual = (y[:, 0] - x[:, 0]).pow(2).sum() * 5.0 / x.pow(2).sum()
    assert torch.allclose(weighted_rel_mse(y, x, w0), manual)
    s = torch.randn(3, 4, 4)
    assert float(relation_kl(s, s)) == pytest.approx(0.0, abs=1e-6)
    assert float(relation_kl(s + torch.randn_like(s), s)) > 0


def test_a_unit_made_worse_is_warned_and_noted():
    """Training that raises a unit's error on its evaluation rows (here: a far too high learning rate) says so,
    as a warning while it runs and as a report note naming the unit and both errors; normal training does not."""
    from workbench.stages.distill import result_notes

    s = fresh()
    with pytest.warns(RuntimeWarning, match="made transformer worse"):
        res = run_distillation(s, DistillSettings(mode="e2e", iters=4, lr=0.3, scale_lr=0.3, train=["scales"],
                                                  eval_rows=4))
    (unit,) = res.units
    assert unit.err_after > unit.err_before
    (note,) = result_notes(res)
    assert note.startswith("transformer: error on the evaluation rows rose from") and "learning rate" in note
    good = run_distillation(fresh(), DistillSettings(mode="e2e", iters=4, lr=1e-3, scale_lr=1e-3, train=["scales"],
                                                     eval_rows=4))
    assert good.units[0].err_after < good.units[0].err_before and result_notes(good) == []


def test_forward_chunks_are_sized_by_tokens():
    """Forward-only passes (block inputs, targets, errors, S2Q's token weights) take CHUNK_TOKENS tokens a call:
    16 rows of a small model, 2 rows of Wan2.1-1.3B's 32,760-token videos."""
    from workbench.stages.distill.rows import CHUNK_ROWS, chunk_rows

    def batch_of(tokens, channels=8):
        return lambda idx: {"hidden_states": torch.zeros(len(idx), tokens, channels), "temb": torch.zeros(len(idx), 4)}

    assert chunk_rows(batch_of(100)) == CHUNK_ROWS
    assert chunk_rows(batch_of(32760)) == 2
    assert chunk_rows(batch_of(18002)) == 3
    assert chunk_rows(batch_of(10**6)) == 1
    assert chunk_rows(lambda idx: {"x": 3}) == CHUNK_ROWS


@pytest.mark.parametrize("mode,term", [("block", False), ("e2e", False), ("block", True)],
                         ids=["block", "e2e", "block_with_a_term"])
def test_chunked_training_steps_give_the_same_gradient(mode, term, monkeypatch):
    """train_chunk_tokens below a step's tokens: every backward pass sees at most that many tokens' rows (one chunk's
    activations alive) and each step's gradient is the one-pass gradient. The reconstruction loss alone is a sum
    over rows (each chunk back-propagates its share: no extra forward); with a term that mixes rows, a no-grad
    forward of all rows gives the loss's gradient w.r.t. the output first (one more forward a step)."""
    from workbench.stages.distill.rows import call_tokens

    first_grads, widest, passes = [], [], []
    orig_step = torch.optim.AdamW.step

    def step(self, *a, **k):
        if len(first_grads) < len(widest) + 1:
            first_grads.append([p.grad.clone() for g in self.param_groups for p in g["params"] if p.grad is not None])
        return orig_step(self, *a, **k)

    monkeypatch.setattr(torch.optim.AdamW, "step", step)
    for chunk in (0, 1):  # 0: never chunk; 1 token: one row per pass
        s = fresh()
        rows_seen, n = [], [0]

        def hook(module, args, kwargs):
            x = next(v for v in list(args) + list(kwargs.values()) if isinstance(v, torch.Tensor) and v.dim() >= 2)
            if torch.is_grad_enabled():
                rows_seen.append(x.shape[0])
            n[0] += x.shape[0]  # rows run through the unit, with or without gradients

        unit = s.qtransformer if mode == "e2e" else s.qtransformer.get_submodule("blocks.0")
        h = unit.register_forward_pre_hook(hook, with_kwargs=True)
        terms = [Term("relation", 0.5, lambda ctx: relation_kl(ctx.pred.flatten(1) @ ctx.pred.flatten(1).T,
                                                                ctx.target.flatten(1) @ ctx.target.flatten(1).T))]
        run_distillation(s, DistillSettings(mode=mode, iters=2, batch_size=4, lr=1e-2, scale_lr=1e-2, train=["scales"],
                                            blocks=BLOCK if mode == "block" else None, eval_rows=0,
                                            train_chunk_tokens=chunk, seed=3), terms=terms if term else None)
        h.remove()
        widest.append(max(rows_seen))
        passes.append(n[0])
    assert widest == [4, 1]  # the chunked run back-propagated one row at a time
    assert (passes[1] > passes[0]) == term  # an extra no-grad forward of the rows only where a term mixes rows
    assert len(first_grads[0]) == len(first_grads[1]) > 0
    for a, b in zip(*first_grads):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5 * float(a.abs().max()))  # fp32 summation order
    assert call_tokens(lambda idx: {"hidden_states": torch.zeros(len(idx), 7, 3, 5)}) == 21
    with pytest.raises(ValueError, match="train_chunk_tokens"):
        DistillSettings(train_chunk_tokens=-1)
