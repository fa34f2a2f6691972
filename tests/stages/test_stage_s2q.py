"""S2Q-VDiT: salient calibration selection and attention-guided sparse token distillation.

The token weights are checked against values computed here, not against their own normalisation (a mean of 1
and a top-10% share >= 10% hold for any weights whatsoever): a hand-made attention map with known weights,
and the FP block's self-attention recomputed in float64 from the query / key tensors diffusers hands to its
attention function. Training is judged on held-out prompts (`distill_helpers.heldout_errors`), and the folding
of the low-rank estimate by the model's output just before and just after it.
"""
from __future__ import annotations

import inspect
import math

import pytest
import torch

from distill_helpers import fresh, heldout_calibration, heldout_errors
from workbench.stages import s2q as S2Q
from workbench.stages.s2q import (
    Candidate,
    SalientSelectionSettings,
    SparseTokenSettings,
    attention_token_fn,
    attention_weights,
    candidates,
    select,
    select_salient_calibration,
    sparse_token_distill,
)


def _cands(prompts: int, steps: int) -> list[Candidate]:
    return [Candidate(0, p, s, 1000.0 - 100 * s, [0]) for s in range(steps) for p in range(prompts)]


def test_selection_methods():
    cands = _cands(4, 5)
    scores = torch.rand(len(cands), generator=torch.Generator().manual_seed(1))
    top = select("salient", scores, cands, 6, seed=0)
    assert len(top) == 6 and set(top) == set(torch.argsort(scores, descending=True)[:6].tolist())
    uni = select("uniform", scores, cands, 5, seed=0)
    assert len(uni) == 5 and {cands[k].step for k in uni} == set(range(5))  # every step gets its share
    r1, r2 = select("random", scores, cands, 6, seed=3), select("random", scores, cands, 6, seed=3)
    assert r1 == r2 and len(set(r1)) == 6
    assert len(select("salient", scores, cands, 99, seed=0)) == len(cands)
    with pytest.raises(ValueError, match="unknown method"):
        select("greedy", scores, cands, 3, seed=0)


def test_attention_weights_of_a_hand_made_map():
    """Received attention [1, 2, 4, 1, 0, 8, 2, 6] (mean 3) gives weights a / 3; keep_ratio 0.25 keeps exactly the
    2 most attended tokens (8 and 6), renormalised to mean 1 over all 8: 8 / (14 / 8) and 6 / (14 / 8); mix blends
    with 1; a uniform map gives uniform weights."""
    attn = torch.tensor([[1.0, 2, 4, 1, 0, 8, 2, 6], [3.0, 1, 2, 9, 4, 0.5, 7, 5]])
    w = attention_weights(attn)
    assert torch.allclose(w[0], torch.tensor([1, 2, 4, 1, 0, 8, 2, 6]) / 3.0, rtol=1e-6, atol=0)
    assert torch.allclose(w[1], attn[1] / attn[1].mean(), rtol=1e-6, atol=0)
    assert torch.equal(w[1].argsort(), attn[1].argsort())  # more attention, more weight
    sparse = attention_weights(attn, keep_ratio=0.25)
    assert torch.allclose(sparse[0], torch.tensor([0, 0, 0, 0, 0, 8, 0, 6]) / (14 / 8), rtol=1e-6, atol=0)
    assert [set(r.nonzero().flatten().tolist()) for r in sparse] == [{5, 7}, {3, 6}]
    assert torch.allclose(sparse[1, [3, 6]], torch.tensor([9.0, 7.0]) / (16 / 8), rtol=1e-6, atol=0)
    half = attention_weights(attn, mix=0.5)
    assert torch.allclose(half, 0.5 + 0.5 * w, rtol=1e-6, atol=0)
    assert torch.equal(attention_weights(attn, mix=0.0), torch.ones(2, 8))
    assert torch.allclose(attention_weights(torch.full((1, 8), 0.125)), torch.ones(1, 8))


def test_salient_selection_keeps_the_top_scores_within_budget():
    s = fresh()
    pool = s.calibration
    cands = candidates(pool)
    assert len(cands) == len(pool.prompts) * len(pool.entries)  # one candidate per prompt and step
    rep = select_salient_calibration(s, SalientSelectionSettings(budget=3, compare=True, compare_iters=2, compare_rows=2))
    rows = rep.tables["candidates"]
    chosen = [r for r in rows if r["selected"]]
    assert len(chosen) == 3 and rep.summary["selected"] == 3
    assert min(r["score"] for r in chosen) >= max(r["score"] for r in rows if not r["selected"])
    assert all(r["diffusion"] >= 0 and r["quantization"] > 0 for r in rows)
    assert sum(e.batch for e in s.calibration.entries) == 3 * 2  # guidance: conditional + unconditional rows
    assert s.state["calibration_pool"] is pool
    assert {r["method"] for r in rep.tables["comparison"]} == {"salient", "uniform", "random"}
    assert rep.figures()


# ------------------------------------------------------------------------ attention-guided distillation

def _block0_rows(s):
    """(batch_fn, n) of the FP model's blocks.0 over every calibration row, captured by a forward pre-hook."""
    blk = s.fp_transformer.get_submodule("blocks.0")
    calls = []
    h = blk.register_forward_pre_hook(lambda m, a, k: calls.append((a, k)), with_kwargs=True)
    try:
        with torch.no_grad():
            s.calibration.replay(s.fp_transformer)
    finally:
        h.remove()
    sig = inspect.signature(blk.forward)
    bound = [sig.bind(*a, **k).arguments for a, k in calls]
    batch = [b["hidden_states"].shape[0] for b in bound]
    n = sum(batch)

    def cat(name):
        vals = [b[name] for b in bound]
        if isinstance(vals[0], torch.Tensor) and vals[0].dim() and vals[0].shape[0] == batch[0]:
            return torch.cat(vals)
        return vals[0]  # shared by all rows (rotary embedding)

    rows = {name: cat(name) for name in bound[0]}

    def batch_fn(idx):
        return {k: v[idx] if isinstance(v, torch.Tensor) and v.dim() and v.shape[0] == n else v
                for k, v in rows.items()}

    return batch_fn, n


def _received_attention(monkeypatch, block, batch_fn, n):
    """(n, S) attention each token receives in `block`'s self-attention, recomputed in float64 from the query /
    key tensors diffusers passes to its attention function: column mean over queries of softmax(q k^T / sqrt(d)),
    averaged over heads."""
    import diffusers.models.transformers.transformer_wan as W

    seen = []
    original = W.dispatch_attention_fn

    def recorder(query, key, value, *args, **kwargs):
        if key.shape[1] == query.shape[1]:  # self-attention (cross-attention keys are the text tokens)
            q, k = query.double().transpose(1, 2), key.double().transpose(1, 2)  # (B, H, S, D)
            p = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]), dim=-1)
            seen.append(p.mean(2).mean(1))
        return original(query, key, value, *args, **kwargs)

    monkeypatch.setattr(W, "dispatch_attention_fn", recorder)
    with torch.no_grad():
        block(**batch_fn(torch.arange(n)))
    monkeypatch.setattr(W, "dispatch_attention_fn", original)
    assert len(seen) == 1
    return seen[0]


def test_token_weights_are_the_attention_each_token_receives(monkeypatch):
    """The weights `sparse_token_distill` trains with equal a / mean(a) of the attention received, recomputed here;
    the most attended tokens get the largest weights; keep_ratio keeps exactly round(ratio * S) tokens, the most
    attended ones; the report's top-10% share is that of the recomputed attention."""
    s = fresh()
    batch_fn, n = _block0_rows(s)
    blk = s.fp_transformer.get_submodule("blocks.0")
    a = _received_attention(monkeypatch, blk, batch_fn, n)                     # (n, S), float64
    expected = a / a.mean(-1, keepdim=True)
    got = attention_token_fn(s, keep_ratio=1.0, mix=1.0)("blocks.0", blk, batch_fn, n)
    assert got.shape == a.shape and torch.allclose(got.double(), expected, rtol=1e-4, atol=1e-6)
    assert (got.argsort(-1)[:, -3:] == a.argsort(-1)[:, -3:]).all()  # the three most attended tokens lead

    rep = sparse_token_distill(s, SparseTokenSettings(iters=0, blocks=["blocks.0"], eval_rows=n, rank=0,
                                                      keep_ratio=0.25))
    f, h, w = rep.arrays["grid"]
    seq = a.shape[1]
    assert f * h * w == seq
    keep = round(0.25 * seq)
    first = torch.tensor(rep.arrays["token_maps"]["blocks.0"]["first"]).flatten()
    assert set(first.nonzero().flatten().tolist()) == set(a[0].topk(keep).indices.tolist())
    kept = a[0].topk(keep).indices
    assert torch.allclose(first[kept].double(), a[0, kept] / (a[0, kept].sum() / seq), rtol=1e-4)
    stats = rep.tables["token_weights"][0]
    assert stats["zero_weight_share"] == pytest.approx(1 - keep / seq, abs=1e-9)
    top = max(1, seq // 10)
    share = float((a.topk(top, dim=-1).values.sum(-1) / a.sum(-1)).mean())
    assert stats["top10_attention_share"] == pytest.approx(share, rel=1e-4)


def test_sparse_token_distillation_generalises_and_folds_exactly(monkeypatch):
    """Trained with the low-rank estimate: the block error goes down on held-out prompts (measured 0.47x), and
    folding the estimate into the weights leaves the quantized model's output bit for bit unchanged (W + BA is what
    the weight quantizer already saw), while the folded weights differ from the untrained ones."""
    s = fresh()
    before = heldout_errors(s.qtransformer)
    w0 = {k: v.detach().clone() for k, v in s.qtransformer.state_dict().items() if k.endswith(".weight")}
    entries = heldout_calibration().entries
    seen = {}
    real_bake = S2Q.bake_weight_deltas

    def checked_bake(model):
        with torch.no_grad():
            seen["before"] = [o.clone() for o in heldout_calibration().replay(model, entries)]
            done = real_bake(model)
            seen["after"] = heldout_calibration().replay(model, entries)
        seen["layers"] = done
        return done

    monkeypatch.setattr(S2Q, "bake_weight_deltas", checked_bake)
    rep = sparse_token_distill(s, SparseTokenSettings(iters=8, blocks=["blocks.0"], eval_rows=4, rank=2, lr=5e-3))
    assert seen["layers"] and len(seen["layers"]) == rep.summary["low_rank_layers"]
    assert all(torch.equal(x, y) for x, y in zip(seen["before"], seen["after"]))
    assert not any("parametrizations" in k for k in s.qtransformer.state_dict())
    moved = [k for k in w0 if not torch.equal(w0[k], s.qtransformer.state_dict()[k])]
    assert moved and all(k.startswith("blocks.0.") for k in moved)
    after = heldout_errors(s.qtransformer)
    assert after["blocks.0"] < 0.7 * before["blocks.0"]  # measured 0.47x
    assert rep.figures()
    with pytest.raises(ValueError, match="keep_ratio"):
        SparseTokenSettings(keep_ratio=0.0)
