"""S2Q-VDiT (arXiv 2508.04016): Hessian-aware salient calibration data + attention-guided sparse token distillation.

    from workbench.stages.s2q import SalientSelectionSettings, SparseTokenSettings, \
        select_salient_calibration, sparse_token_distill
    collect_calibration(session, CalibrationSettings(prompts=16, steps=8))   # the candidate pool
    apply_quantization(session)
    select_salient_calibration(session, SalientSelectionSettings(budget=16))
    sparse_token_distill(session, SparseTokenSettings(iters=100))

Hessian-aware salient data selection (`select_salient_calibration`). A candidate is one prompt at one
sampling step of the collected FP trajectories (with guidance: its conditional and unconditional rows).
Each gets two saliences, normalised by their means over the pool and mixed, score = a D + (1 - a) Q:
- diffusion salience D: how much the denoising changes there, the relative change of the FP model's
  guided prediction between this step and the adjacent step of the same trajectory,
  ||v_t - v_t'||^2 / ||v_t||^2 (large where the trajectory turns; small on the flat stretches);
- quantization salience Q (Hessian-aware): the second-order estimate of the loss increase that weight
  quantization causes on this sample, summed over the quantized layers: with the layer Hessian
  H = X^T X of the sample's FP inputs X (Gauss-Newton / GPTQ form), tr(dW H dW^T) / tr(W H W^T) =
  ||X dW^T||^2 / ||X W^T||^2, dW = W - Q(W) (in the layer's input basis).
The `budget` highest scores become the calibration set (`method="salient"`); "uniform" (evenly over
steps and prompts) and "random" are the baselines. With `compare`, each of the three selections trains
the current quantized model briefly (block reconstruction of the weight scales, `compare_iters` steps
per block) on its own selection, and the final-output error against FP over the whole pool is reported.

Attention-guided sparse token distillation (`sparse_token_distill`). Block reconstruction where every
token's loss is weighted by the attention it receives in the FP block's self attention (the column
mean of the softmax matrix, averaged over heads: video attention is sparse, few tokens carry most of
it). Weights are scaled to mean 1 per row; `keep_ratio < 1` keeps only the most attended tokens
(sparse), `mix` blends with uniform weights. Trained: weight scales and an optional low-rank weight
estimate folded into the weights afterwards (`rank`), so the result is plain W4A6 PTQ.
"""

from __future__ import annotations

import copy
import time
from dataclasses import asdict, dataclass, field
from typing import Callable

import torch
from torch import nn

from workbench.session import Session
from workbench.quant.compensation import LowRankWeightDelta, add_weight_delta, bake_weight_deltas
from workbench.stages.calibration import CalibrationCache, CalibrationEntry, capturing_inputs, to_device
from workbench.stages.distill import (
    DistillSettings,
    curves_of,
    distill_summary,
    result_notes,
    run_distillation,
    unit_rows,
)
from workbench.stages.qvdit import ensure_quantized, block_linears, session_grid
from workbench.stages.registry import stage
from workbench.stages.report import StageReport
from workbench.viz.stage_figures import selection_figures, sparse_token_figures

METHODS = ("salient", "uniform", "random")


# ----------------------------------------------------------------------------------------------------
# candidates


@dataclass
class Candidate:
    """One prompt at one sampling step: an entry of the pool and the rows of that prompt in it."""

    entry: int
    prompt: int
    step: int
    timestep: float
    rows: list[int]


def candidate_entry(cache: CalibrationCache, c: Candidate) -> CalibrationEntry:
    """The calibration entry holding just this candidate's rows."""
    return cache.entries[c.entry].take(torch.tensor(c.rows))


def candidates(cache: CalibrationCache) -> list[Candidate]:
    """Split the pool into (prompt, step) candidates. Entries are recorded batch after batch of prompts,
    step after step; with guidance a call's rows are [conditional..., unconditional...]."""
    guided = cache.guidance != 1.0
    out: list[Candidate] = []
    first_prompt, prev_step, per_call = 0, None, 0
    for i, e in enumerate(cache.entries):
        if prev_step is not None and e.step <= prev_step:
            first_prompt += per_call
        per_call = e.batch // 2 if guided and e.batch % 2 == 0 else e.batch
        for j in range(per_call):
            rows = [j, j + per_call] if per_call != e.batch else [j]
            out.append(Candidate(i, first_prompt + j, e.step, float(e.timestep), rows))
        prev_step = e.step
    return out


# ----------------------------------------------------------------------------------------------------
# saliences


@torch.no_grad()
def saliences(session: Session, cands: list[Candidate], cache: CalibrationCache) -> tuple[torch.Tensor, torch.Tensor]:
    """(diffusion salience D, Hessian-aware quantization salience Q) per candidate (module docstring)."""
    fp, q = session.fp_transformer, session.qtransformer
    layers = block_linears(q)
    device = next(fp.parameters()).device
    guided = cache.guidance != 1.0
    q_num = torch.zeros(len(cands))
    by_entry: dict[int, list[int]] = {}
    for k, c in enumerate(cands):
        by_entry.setdefault(c.entry, []).append(k)
    outputs: dict[int, torch.Tensor] = {}
    per_row: dict[str, torch.Tensor] = {}

    def fn(name: str, x: torch.Tensor, out: torch.Tensor) -> None:
        ql = layers[name]
        xt = ql.transform_input(x.detach().float())
        # W and dW in the layer's input basis, made per call: fp32 W and dW of every layer held at once (8 bytes a
        # weight) raised the peak by 12 GiB on Wan2.1-1.3B
        with torch.no_grad():
            w = ql.effective_weight().float().to(xt.device)
            dw = w - ql.quantized_weight().float().to(xt.device)
        num = (xt @ dw.T).pow(2).reshape(xt.shape[0], -1).sum(1)
        den = (xt @ w.T).pow(2).reshape(xt.shape[0], -1).sum(1).clamp(min=1e-12)
        per_row[name] = (num / den).cpu()

    with capturing_inputs(fp, list(layers), fn):
        for i, e in enumerate(cache.entries):
            per_row.clear()
            out = fp(*to_device(e.args, device), **to_device(e.kwargs, device))
            out = out[0] if isinstance(out, (tuple, list)) else getattr(out, "sample", out)
            out = out.detach().float().cpu()
            rel = torch.stack(list(per_row.values())).mean(0) if per_row else torch.zeros(e.batch)
            for k in by_entry.get(i, []):
                c = cands[k]
                q_num[k] = rel[c.rows].mean()
                v = out[c.rows]
                if guided and len(c.rows) == 2:
                    v = v[1] + cache.guidance * (v[0] - v[1])
                else:
                    v = v[0]
                outputs[k] = v
    # diffusion salience: change of the guided prediction to the adjacent step of the same trajectory
    d = torch.zeros(len(cands))
    traj: dict[int, list[int]] = {}
    for k, c in enumerate(cands):
        traj.setdefault(c.prompt, []).append(k)
    for ks in traj.values():
        ks = sorted(ks, key=lambda k: cands[k].step)
        for pos, k in enumerate(ks):
            if len(ks) == 1:
                d[k] = 1.0
                continue
            other = ks[pos + 1] if pos + 1 < len(ks) else ks[pos - 1]
            v, w = outputs[k], outputs[other]
            d[k] = float((v - w).pow(2).sum() / v.pow(2).sum().clamp(min=1e-12))
    return d, q_num


def select(method: str, scores: torch.Tensor, cands: list[Candidate], budget: int, seed: int) -> list[int]:
    """Indices of the selected candidates: top scores, evenly spread, or random."""
    n = len(cands)
    budget = min(budget, n)
    if method == "salient":
        return sorted(torch.argsort(scores, descending=True)[:budget].tolist())
    if method == "uniform":
        # evenly spaced over the candidates ordered by step, then prompt: every step gets its share
        order = sorted(range(n), key=lambda k: (cands[k].step, cands[k].prompt))
        idx = torch.linspace(0, n - 1, budget).round().long().unique().tolist()
        return sorted(order[i] for i in idx)
    if method == "random":
        g = torch.Generator().manual_seed(seed)
        return sorted(torch.randperm(n, generator=g)[:budget].tolist())
    raise ValueError(f"unknown method {method!r}; choose one of {list(METHODS)}")


def selection_cache(pool: CalibrationCache, cands: list[Candidate], chosen: list[int]) -> CalibrationCache:
    """A calibration cache of the chosen candidates (one entry each)."""
    cache = CalibrationCache(entries=[candidate_entry(pool, cands[k]) for k in chosen], prompts=list(pool.prompts),
                             seeds=list(pool.seeds), steps=pool.steps, guidance=pool.guidance)
    return cache


@torch.no_grad()
def output_error(session: Session, transformer: nn.Module, entries: list[CalibrationEntry]) -> float:
    """Relative MSE of `transformer`'s output against the FP transformer's on the given calls."""
    num = den = 0.0
    cal = session.calibration
    fp_out = cal.replay(session.fp_transformer, entries)
    q_out = cal.replay(transformer, entries)
    for a, b in zip(q_out, fp_out):
        num += float((a - b).pow(2).sum())
        den += float(b.pow(2).sum())
    return num / den if den > 0 else num


# ----------------------------------------------------------------------------------------------------
# stage 1: selection


@dataclass
class SalientSelectionSettings:
    """budget: candidates (prompt x step) kept. method: "salient", "uniform" or "random".
    alpha: weight of the diffusion salience (1 - alpha: the quantization salience).
    compare: also train briefly on each of the three selections and report the output error each gives.
    compare_iters / compare_batch: block-reconstruction steps per block and rows per step of that comparison.
    compare_rows: pool candidates (evenly spaced) on which the comparison's output error is measured.
    seed: for the random selection and the comparison's training."""

    budget: int = 16
    method: str = "salient"
    alpha: float = 0.5
    compare: bool = True
    compare_iters: int = 10
    compare_batch: int = 4
    compare_rows: int = 16
    seed: int = 0

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"unknown method {self.method!r}; choose one of {list(METHODS)}")
        if self.budget < 1:
            raise ValueError(f"budget must be >= 1, got {self.budget}")
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {self.alpha}")
        if self.compare_iters < 0 or self.compare_rows < 1 or self.compare_batch < 1:
            raise ValueError("compare_iters must be >= 0, compare_rows and compare_batch >= 1")


@stage(SalientSelectionSettings, figures=selection_figures)
def select_salient_calibration(session: Session, settings: SalientSelectionSettings | None = None) -> StageReport:
    """Score every (prompt, step) candidate of the calibration pool and keep `budget` of them."""
    s = settings or SalientSelectionSettings()
    ensure_quantized(session, "select_salient_calibration")
    t0 = time.perf_counter()
    pool: CalibrationCache = session.state.get("calibration_pool") or session.calibration
    session.state["calibration_pool"] = pool
    cands = candidates(pool)
    d, qs = saliences(session, cands, pool)
    dn = d / d.mean().clamp(min=1e-12)
    qn = qs / qs.mean().clamp(min=1e-12)
    score = s.alpha * dn + (1 - s.alpha) * qn
    picks = {m: select(m, score, cands, s.budget, s.seed) for m in METHODS}
    chosen = picks[s.method]
    comparison = []
    notes = []
    if s.compare:
        eval_ids = torch.linspace(0, len(cands) - 1, min(s.compare_rows, len(cands))).round().long().unique().tolist()
        eval_entries = [candidate_entry(pool, cands[k]) for k in eval_ids]
        base_err = _pool_error(session, pool, session.qtransformer, eval_entries)
        for m in METHODS:
            sub = _sub_session(session, selection_cache(pool, cands, picks[m]))
            ds = DistillSettings(iters=s.compare_iters, batch_size=s.compare_batch, lr=1e-3, train=["scales"],
                                 seed=s.seed, eval_rows=0)
            res = run_distillation(sub, ds, name=f"compare_{m}")
            err = _pool_error(session, pool, sub.qtransformer, eval_entries)
            comparison.append({"method": m, "chosen": m == s.method, "candidates": len(picks[m]),
                               "output_err_untrained": base_err, "output_err_trained": err,
                               "recon_loss_last": _mean_last(res), "mean_score": float(score[picks[m]].mean()),
                               "timesteps_covered": len({cands[k].step for k in picks[m]})})
    new = selection_cache(pool, cands, chosen)
    session.calibration = new
    rows = [{"candidate": k, "prompt": c.prompt, "prompt_text": pool.prompts[c.prompt] if c.prompt < len(pool.prompts) else "",
             "step": c.step, "timestep": c.timestep, "diffusion": float(d[k]), "quantization": float(qs[k]),
             "score": float(score[k]), "selected": k in set(chosen)} for k, c in enumerate(cands)]
    steps = sorted({c.step for c in cands})
    prompts = sorted({c.prompt for c in cands})
    grid = {name: [[None] * len(steps) for _ in prompts] for name in ("score", "diffusion", "quantization")}
    for r in rows:
        pi, si = prompts.index(r["prompt"]), steps.index(r["step"])
        for name in grid:
            grid[name][pi][si] = r[name]
    per_t = {name: [sum(r[name] for r in rows if r["step"] == st) / max(1, sum(r["step"] == st for r in rows))
                    for st in steps] for name in ("score", "diffusion", "quantization")}
    report = StageReport(
        name="select_salient_calibration",
        settings=asdict(s),
        summary={"pool_candidates": len(cands), "selected": len(chosen), "pool_calls": len(pool.entries),
                 "selected_rows": sum(e.batch for e in new.entries),
                 "timesteps_covered": len({cands[k].step for k in chosen}),
                 **{f"output_err_{r['method']}": r["output_err_trained"] for r in comparison}},
        tables={"candidates": rows, "comparison": comparison},
        arrays={"grids": grid, "steps": steps, "prompts": prompts,
                "timesteps": [next(c.timestep for c in cands if c.step == st) for st in steps],
                "per_timestep": per_t},
        notes=notes,
        seconds=time.perf_counter() - t0,
    )
    return session.add(report)


def _mean_last(res) -> float | None:  # noqa: ANN001
    last = [r.curves["total"][-1] for r in res.units if r.curves.get("total")]
    return sum(last) / len(last) if last else None


def _sub_session(session: Session, cache: CalibrationCache) -> Session:
    return Session(fp_model=session.fp_model, qtransformer=copy.deepcopy(session.qtransformer), seed=session.seed,
                   calibration=cache, quant_config=session.quant_config, progress=False)


def _pool_error(session: Session, pool: CalibrationCache, transformer: nn.Module, entries: list[CalibrationEntry]) -> float:
    saved = session.calibration
    session.calibration = pool
    try:
        return output_error(session, transformer, entries)
    finally:
        session.calibration = saved


# ----------------------------------------------------------------------------------------------------
# stage 2: attention-guided sparse token distillation


@dataclass
class SparseTokenSettings(DistillSettings):
    """Distillation settings plus S2Q-VDiT's token weighting.

    token_weighting: weight each token's loss by the attention it receives (False: plain reconstruction).
    keep_ratio: fraction of the most attended tokens that keep a weight (1.0: all, dense).
    mix: w = (1 - mix) + mix * attention weight (1.0: attention weights alone).
    rank: rank of a low-rank weight-error estimate trained with the scales and folded into the weights
        afterwards (0: scales only).
    """

    iters: int = 100
    batch_size: int = 4
    lr: float = 2e-3
    token_weighting: bool = True
    keep_ratio: float = 1.0
    mix: float = 1.0
    rank: int = 4
    train: list[str] = field(default_factory=lambda: ["scales", "extras"])

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0.0 < self.keep_ratio <= 1.0:
            raise ValueError(f"keep_ratio must be in (0, 1], got {self.keep_ratio}")
        if not 0.0 <= self.mix <= 1.0:
            raise ValueError(f"mix must be in [0, 1], got {self.mix}")
        if self.rank < 0:
            raise ValueError(f"rank must be >= 0, got {self.rank}")


def attention_weights(attn: torch.Tensor, keep_ratio: float = 1.0, mix: float = 1.0) -> torch.Tensor:
    """Token weights (B, S) with mean 1 from the attention each token receives (B, S)."""
    a = attn.float().clamp(min=0)
    w = a / a.mean(-1, keepdim=True).clamp(min=1e-12)
    if keep_ratio < 1.0:
        k = max(1, int(round(keep_ratio * w.shape[-1])))
        thresh = w.topk(k, dim=-1).values[..., -1:]
        w = torch.where(w >= thresh, w, torch.zeros_like(w))
        w = w / w.mean(-1, keepdim=True).clamp(min=1e-12)
    return (1.0 - mix) + mix * w


def attention_token_fn(session: Session, keep_ratio: float, mix: float) -> Callable:
    """token_weights callback of run_distillation: FP self-attention received per token, as weights."""
    from workbench.models.adapters import adapter_for, attention_modules, video_token_slice
    from workbench.quant.attention import AttentionSpec, capturing_attention, wrap_attention
    from workbench.stages.distill.rows import chunk_rows, output_tensor

    adapter = adapter_for(session.fp_transformer)
    self_att = list(attention_modules(session.fp_transformer, kinds=("self", "joint", "temporal")))
    raw: dict[str, torch.Tensor] = {}

    @torch.no_grad()
    def fn(unit: str, fp_block: nn.Module, batch_fn: Callable, n: int) -> torch.Tensor:
        names = [a[len(unit) + 1:] for a in self_att if a.startswith(unit + ".")]
        if not names:
            raise ValueError(f"no self-attention module found in {unit}; token weighting needs one")
        blk = copy.deepcopy(fp_block)
        for a in names:
            wrap_attention(blk.get_submodule(a), AttentionSpec.capture_only())
        outs = []
        with capturing_attention(blk) as cap:
            for idx in torch.arange(n).split(chunk_rows(batch_fn)):
                for lst in cap.values():
                    lst.clear()
                blk(**batch_fn(idx))
                per = [torch.cat(cap[a]).float().mean(1) for a in names if cap.get(a)]
                outs.append(torch.stack(per).mean(0).cpu())
        attn = torch.cat(outs)
        video = output_tensor(blk(**batch_fn(torch.arange(1)))).shape[1]  # tokens of the block's output
        attn = attn[:, video_token_slice(adapter, attn.shape[1], video)]
        raw[unit] = attn
        return attention_weights(attn, keep_ratio, mix)

    fn.raw = raw  # type: ignore[attr-defined]
    return fn


@stage(SparseTokenSettings, figures=sparse_token_figures)
def sparse_token_distill(session: Session, settings: SparseTokenSettings | None = None) -> StageReport:
    """Block reconstruction with per-token loss weights from the FP attention each token receives."""
    s = settings or SparseTokenSettings()
    ensure_quantized(session, "sparse_token_distill")
    t0 = time.perf_counter()
    layers = block_linears(session.qtransformer, s.blocks)
    if s.rank:
        g = torch.Generator().manual_seed(s.seed + 2)
        for ql in layers.values():
            add_weight_delta(ql, LowRankWeightDelta(ql.out_features, ql.in_features,
                                                    min(s.rank, ql.in_features, ql.out_features), g).to(ql.weight.device))
    fn = attention_token_fn(session, s.keep_ratio, s.mix) if s.token_weighting else None
    if fn is not None and s.mode != "block":
        raise ValueError("attention-guided token weights need mode='block'")
    extra = {k: v for k, v in asdict(s).items() if k not in asdict(s.distill_settings())}
    result = run_distillation(session, s.distill_settings(), name="sparse_token_distill", token_weights=fn,
                              fingerprint_extra=extra)
    bake_weight_deltas(session.qtransformer)
    grid = result.grid or session_grid(session)
    maps, stats = {}, []
    for unit, w in result.token_weights.items():
        raw = fn.raw.get(unit) if fn is not None else None
        mean_w = w.mean(0)
        if grid is not None and mean_w.numel() == grid[0] * grid[1] * grid[2]:
            maps[unit] = {"mean": mean_w.reshape(grid).tolist(), "first": w[0].reshape(grid).tolist()}
        a = raw if raw is not None else w
        top = a.topk(max(1, a.shape[-1] // 10), dim=-1).values.sum(-1) / a.sum(-1).clamp(min=1e-12)
        per_frame = mean_w.reshape(grid[0], -1).mean(-1).tolist() if grid is not None and mean_w.numel() % grid[0] == 0 else []
        stats.append({"block": unit, "top10_attention_share": float(top.mean()), "weight_max": float(w.max()),
                      "weight_min": float(w.min()), "zero_weight_share": float((w == 0).float().mean()),
                      "frame_weights": per_frame})
    summary = {**distill_summary(result), "low_rank_layers": len(layers) if s.rank else 0,
               "mean_top10_attention_share": (sum(r["top10_attention_share"] for r in stats) / len(stats)) if stats else float("nan")}
    report = StageReport(
        name="sparse_token_distill",
        settings=asdict(s),
        summary=summary,
        tables={"blocks": unit_rows(result), "token_weights": stats},
        arrays={"curves": curves_of(result), "token_maps": maps, "grid": list(grid) if grid else None},
        notes=result_notes(result),
        seconds=time.perf_counter() - t0,
    )
    return session.add(report)


# ----------------------------------------------------------------------------------------------------
# figures




__all__ = ["SalientSelectionSettings", "SparseTokenSettings", "attention_weights", "candidates", "saliences",
           "select_salient_calibration", "sparse_token_distill"]
