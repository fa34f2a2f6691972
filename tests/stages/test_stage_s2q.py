"""S2Q-VDiT: salient calibration selection and attention-guided sparse token distillation."""
from __future__ import annotations

import pytest
import torch

from distill_helpers import fresh
from workbench.stages.s2q import (
    Candidate,
    SalientSelectionSettings,
    SparseTokenSettings,
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


def test_attention_weights_have_mean_one():
    attn = torch.rand(3, 40) ** 4  # sparse-ish: a few tokens receive most attention
    w = attention_weights(attn)
    assert w.shape == (3, 40) and torch.allclose(w.mean(-1), torch.ones(3))
    assert torch.equal(w.argsort(-1), attn.argsort(-1))  # more attention, more weight
    sparse = attention_weights(attn, keep_ratio=0.25)
    assert torch.allclose(sparse.mean(-1), torch.ones(3)) and int((sparse[0] > 0).sum()) == 10
    assert torch.allclose(attention_weights(attn, mix=0.0), torch.ones(3, 40))


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


def test_sparse_token_distillation_weights_tokens_by_attention():
    s = fresh()
    rep = sparse_token_distill(s, SparseTokenSettings(iters=4, blocks=["blocks.0"], eval_rows=4, rank=2))
    f, h, w = rep.arrays["grid"]
    maps = rep.arrays["token_maps"]["blocks.0"]["mean"]
    assert (len(maps), len(maps[0]), len(maps[0][0])) == (f, h, w)
    assert torch.tensor(maps).mean().item() == pytest.approx(1.0, rel=1e-4)
    stats = rep.tables["token_weights"][0]
    assert stats["top10_attention_share"] > 0.1  # at least uniform share
    # the low-rank correction was folded into the weights: a plain quantized model is left
    assert not any("parametrizations" in k for k in s.qtransformer.state_dict())
    assert rep.summary["mean_err_after"] < rep.summary["mean_err_before"]
    assert rep.figures()
    with pytest.raises(ValueError, match="keep_ratio"):
        SparseTokenSettings(keep_ratio=0.0)
