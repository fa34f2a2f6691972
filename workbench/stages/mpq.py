"""`mpq_distill`: MPQ-DMv2 (arXiv 2507.04290): Z-order residual quantization, object-oriented LoRA init,
memory-based temporal relation distillation.

    from workbench.stages.mpq import MPQSettings, mpq_distill
    mpq_distill(session, MPQSettings(iters=120))

Flexible Z-order residual mixed quantization. A uniform quantizer handles salient outliers badly. After
the weight is quantized, the residual R = W - Q(W) of the salient part is binarised with its own scale
and added back as a branch on the same quantized input:
    W_hat = Q(W) + alpha (.) sign(R) (.) M,    alpha_i = mean |R_ij| over the salient entries of row i,
so salient weights get flexible steps (the sum of a uniform grid and a +-alpha zig-zag: the "Z" order),
about one extra bit where M is set. Salience is the output error an entry causes, R_ij^2 h_j with
h_j = E[x_j^2] (the diagonal of the layer Hessian X^T X from FP calibration inputs): the top
`residual_ratio` entries ("element") or input channels ("channel"). alpha is trained afterwards.
Object-oriented low-rank initialisation. A LoRA branch B A (rank `lora_rank`) on the quantized input
starts from the quantization error it should correct instead of zero: the truncated SVD of
E = W - Q(W) - residual branch ("error"), or of E diag(sqrt h) with the scaling undone
("act_error": the rank-r optimum of the layer's output error ||X E^T - X (BA)^T||). "zero" is the usual
LoRA start (B = 0), the ablation.
Memory-based temporal relation distillation. An online, time-aware queue keeps FP token features
("pixels") sampled from past iterations across the denoising timesteps (one FIFO per timestep bucket, so
every stage of denoising stays represented). Each step, sampled tokens of the quantized and the FP block
output are related to the queue, p = softmax(cos(f, queue) / tau), and KL(p_fp || p_q) is added to the
reconstruction loss: the quantized model keeps the FP model's relations to features of other timesteps
(long-term temporal information of the denoising trajectory), then the FP tokens are enqueued.

Ablations: `residual: false`, `lora_init: zero`, `trd: false` (and `lora: false`).
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from workbench.quant import QuantLinear
from workbench.session import Session
from workbench.stages.calibration import capturing_inputs
from workbench.quant.compensation import BinaryResidual, Compensation, LoRABranch
from workbench.stages.distill import (
    DistillSettings,
    Term,
    TermContext,
    curves_of,
    distill_summary,
    result_notes,
    run_distillation,
    unit_rows,
)
from workbench.stages.qvdit import ensure_quantized, block_linears
from workbench.stages.registry import stage
from workbench.stages.report import StageReport
from workbench.viz.stage_figures import mpq_figures

RESIDUAL_MODES = ("element", "channel")
LORA_INITS = ("error", "act_error", "zero")


# ----------------------------------------------------------------------------------------------------
# the branches


# ----------------------------------------------------------------------------------------------------
# the quantizer side, as functions (tests call them on plain weights)


def binary_residual(w: torch.Tensor, wq: torch.Tensor, ratio: float, mode: str = "element",
                    h: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(alpha (out,), signs (out, in) in {-1, 0, +1}) of the binary residual of the salient part of w - wq.

    Salience: R_ij^2 h_j (h: per-input-channel second moment, the Hessian diagonal; None: ones).
    mode "element": the top `ratio` entries; "channel": the top `ratio` input channels (whole columns).
    """
    if mode not in RESIDUAL_MODES:
        raise ValueError(f"unknown residual mode {mode!r}; choose one of {list(RESIDUAL_MODES)}")
    r = (w - wq).float()
    hh = torch.ones(r.shape[1]) if h is None else h.float().to(r.device).clamp(min=0)
    sal = r.pow(2) * hh[None, :]
    mask = torch.zeros_like(r, dtype=torch.bool)
    if ratio > 0:
        if mode == "element":
            k = max(1, int(round(ratio * r.numel())))
            idx = sal.flatten().topk(k).indices
            mask.view(-1)[idx] = True
        else:
            k = max(1, int(round(ratio * r.shape[1])))
            cols = sal.sum(0).topk(k).indices
            mask[:, cols] = True
    signs = torch.where(mask, torch.sign(r), torch.zeros_like(r))
    signs = torch.where(mask & (signs == 0), torch.ones_like(signs), signs)
    cnt = mask.sum(1).clamp(min=1)
    alpha = (r.abs() * mask).sum(1) / cnt
    return alpha, signs.to(torch.int8)


def low_rank_init(err: torch.Tensor, rank: int, h: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(B (out, r), A (r, in)) with B A the best rank-r approximation of `err` (weighted by sqrt(h) per input
    channel when h is given: the rank-r minimiser of the output error on inputs with second moments h)."""
    e = err.float()
    if h is not None:
        s = h.float().to(e.device).clamp(min=1e-8).sqrt()
        e = e * s[None, :]
    u, sv, vh = torch.linalg.svd(e, full_matrices=False)
    r = min(rank, sv.numel())
    root = sv[:r].sqrt()
    b = u[:, :r] * root[None, :]
    a = root[:, None] * vh[:r]
    if h is not None:
        a = a / s[None, :]
    return b, a


def rel_error(w: torch.Tensor, approx: torch.Tensor, h: torch.Tensor | None = None) -> float:
    """||w - approx||^2 / ||w||^2 (columns weighted by h when given: the output-error form)."""
    d = (w - approx).float().pow(2)
    n = w.float().pow(2)
    if h is not None:
        d, n = d * h[None, :], n * h[None, :]
    return float(d.sum() / n.sum().clamp(min=1e-12))


@torch.no_grad()
def input_second_moments(session: Session, layers: dict[str, QuantLinear], calls: int = 4) -> dict[str, torch.Tensor]:
    """E[x'_j^2] per input channel of every layer (in its input basis) over FP calibration calls."""
    cal = session.calibration
    entries = cal.select(min(calls, len(cal.entries)))
    fp = session.fp_transformer
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}

    def fn(name: str, x: torch.Tensor, out: torch.Tensor) -> None:
        xt = layers[name].transform_input(x.detach().float()).reshape(-1, x.shape[-1])
        sums[name] = sums.get(name, 0) + xt.pow(2).sum(0).cpu()
        counts[name] = counts.get(name, 0) + xt.shape[0]

    with capturing_inputs(fp, list(layers), fn):
        cal.replay(fp, entries)
    return {n: sums[n] / counts[n] for n in sums}


# ----------------------------------------------------------------------------------------------------
# memory-based temporal relation distillation


class MemoryRelationLoss:
    """Time-aware queue of FP token features and the relation KL against it (module docstring)."""

    def __init__(self, queue_size: int = 1024, tokens: int = 64, tau: float = 0.1, buckets: int = 4,
                 max_timestep: float = 1000.0) -> None:
        self.queue_size, self.tokens, self.tau, self.buckets = int(queue_size), int(tokens), float(tau), int(buckets)
        self.max_timestep = float(max_timestep)
        self.per_bucket = max(1, self.queue_size // self.buckets)
        self.queues: dict[int, torch.Tensor] = {}
        self.unit: str | None = None

    def reset(self, unit: str) -> None:
        self.queues, self.unit = {}, unit

    def state_dict(self) -> dict[str, Any]:
        return {"unit": self.unit, "queues": {k: v.clone() for k, v in self.queues.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.unit = state["unit"]
        self.queues = {int(k): v.clone() for k, v in state["queues"].items()}

    def memory(self) -> torch.Tensor | None:
        if not self.queues:
            return None
        return torch.cat([self.queues[k] for k in sorted(self.queues)])

    def sizes(self) -> dict[int, int]:
        return {k: int(v.shape[0]) for k, v in sorted(self.queues.items())}

    def __call__(self, ctx: TermContext) -> torch.Tensor:
        p, t = ctx.tokens(ctx.pred), ctx.tokens(ctx.target)
        b, s, d = p.shape
        k = min(self.tokens, s)
        idx = torch.stack([torch.randperm(s, generator=ctx.generator)[:k] for _ in range(b)]).to(p.device)
        ps = F.normalize(p.gather(1, idx[..., None].expand(-1, -1, d)).reshape(-1, d).float(), dim=-1)
        ts = F.normalize(t.gather(1, idx[..., None].expand(-1, -1, d)).reshape(-1, d).float(), dim=-1)
        mem = self.memory()
        if mem is None:
            loss = p.sum() * 0.0
        else:
            mem = mem.to(p.device)
            logit_p = ps @ mem.T / self.tau
            logit_t = ts @ mem.T / self.tau
            lt = F.log_softmax(logit_t, -1)
            loss = (lt.exp() * (lt - F.log_softmax(logit_p, -1))).sum(-1).mean()
        # enqueue the FP tokens of each row under its timestep bucket (FIFO per bucket)
        feats = ts.detach().reshape(b, k, d).cpu()
        for row in range(b):
            bucket = min(max(int(float(ctx.timesteps[row]) / self.max_timestep * self.buckets), 0), self.buckets - 1)
            q = torch.cat([self.queues.get(bucket, torch.empty(0, d)), feats[row]])
            self.queues[bucket] = q[-self.per_bucket:]
        return loss


# ----------------------------------------------------------------------------------------------------
# the stage


@dataclass
class MPQSettings(DistillSettings):
    """Distillation settings plus MPQ-DMv2's components.

    residual / residual_mode / residual_ratio: the binary residual branch on the most salient
        `residual_ratio` of the entries ("element") or input channels ("channel").
    lora / lora_rank / lora_init: the LoRA branch and its initialisation ("error", "act_error", "zero").
    trd / trd_weight / trd_queue / trd_tokens / trd_tau / trd_buckets: memory-based temporal relation
        distillation (queue size in tokens, tokens sampled per row, temperature, timestep buckets).
    stat_calls: calibration calls used for the input second moments (the Hessian diagonal).
    """

    iters: int = 120
    batch_size: int = 4
    lr: float = 2e-3
    residual: bool = True
    residual_mode: str = "element"
    residual_ratio: float = 0.05
    lora: bool = True
    lora_rank: int = 8
    lora_init: str = "act_error"
    trd: bool = True
    trd_weight: float = 0.1
    trd_queue: int = 1024
    trd_tokens: int = 32
    trd_tau: float = 0.1
    trd_buckets: int = 4
    stat_calls: int = 4

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.residual_mode not in RESIDUAL_MODES:
            raise ValueError(f"unknown residual_mode {self.residual_mode!r}; choose one of {list(RESIDUAL_MODES)}")
        if self.lora_init not in LORA_INITS:
            raise ValueError(f"unknown lora_init {self.lora_init!r}; choose one of {list(LORA_INITS)}")
        if not 0.0 <= self.residual_ratio <= 1.0:
            raise ValueError(f"residual_ratio must be in [0, 1], got {self.residual_ratio}")
        if self.lora_rank < 1 or self.trd_queue < 1 or self.trd_tokens < 1 or self.trd_buckets < 1:
            raise ValueError("lora_rank, trd_queue, trd_tokens and trd_buckets must be >= 1")
        if self.trd_weight < 0 or self.trd_tau <= 0:
            raise ValueError("trd_weight must be >= 0 and trd_tau > 0")


@torch.no_grad()
def attach_branches(session: Session, s: MPQSettings, layers: dict[str, QuantLinear]) -> list[dict[str, Any]]:
    """Attach the residual and LoRA branches; returns per-layer weight errors (plain / +residual / +LoRA)."""
    need_h = (s.residual or (s.lora and s.lora_init == "act_error"))
    hs = input_second_moments(session, layers, s.stat_calls) if need_h else {}
    g = torch.Generator().manual_seed(s.seed + 3)
    rows = []
    for name, ql in layers.items():
        w = ql.effective_weight().detach().float()
        wq = ql.quantized_weight().detach().float()
        h = hs.get(name)
        row = {"layer": name, "err_plain": rel_error(w, wq), "err_plain_out": rel_error(w, wq, h) if h is not None else None}
        approx = wq.clone()
        if s.residual:
            alpha, signs = binary_residual(w, wq, s.residual_ratio, s.residual_mode, h)
            br = BinaryResidual(**Compensation.layer_kwargs(ql)).adopt_input_side(ql)
            br.signs.copy_(signs)
            br.alpha.copy_(alpha)
            ql.extras["residual"] = br.to(ql.weight.device)
            approx = approx + br.weight_delta().detach().to(approx.device)
            row["err_residual"] = rel_error(w, approx)
            row["salient_share"] = br.salient_entries / signs.numel()
        if s.lora:
            rank = min(s.lora_rank, ql.in_features, ql.out_features)
            lb = LoRABranch(**Compensation.layer_kwargs(ql), rank=rank).adopt_input_side(ql)
            if s.lora_init == "zero":
                bound = 1.0 / math.sqrt(ql.in_features)
                lb.A.uniform_(-bound, bound, generator=g)
            else:
                b, a = low_rank_init(w - approx, rank, h if s.lora_init == "act_error" else None)
                lb.B.copy_(b)
                lb.A.copy_(a)
            ql.extras["lora"] = lb.to(ql.weight.device)
            approx = approx + lb.weight_delta().detach().to(approx.device)
            row["err_lora_init"] = rel_error(w, approx)
        row["err_init_out"] = rel_error(w, approx, h) if h is not None else None
        rows.append(row)
    return rows


def branch_errors(model: nn.Module, layers: list[str], rows: list[dict[str, Any]]) -> None:
    """Add the weight error after training (Q(W) + branches vs W) to the rows."""
    by = {r["layer"]: r for r in rows}
    with torch.no_grad():
        for name in layers:
            ql = model.get_submodule(name)
            w = ql.effective_weight().detach().float()
            approx = ql.quantized_weight().detach().float()
            for key in ("residual", "lora"):
                if key in ql.extras:
                    approx = approx + ql.extras[key].weight_delta().detach().float()
            by[name]["err_trained"] = rel_error(w, approx)


@stage(MPQSettings, figures=mpq_figures)
def mpq_distill(session: Session, settings: MPQSettings | None = None) -> StageReport:
    """Attach the binary residual and LoRA branches to every quantized linear of the blocks, initialise
    them from the quantization error and distill with the memory-based temporal relation loss."""
    s = settings or MPQSettings()
    ensure_quantized(session, "mpq_distill")
    t0 = time.perf_counter()
    layers = block_linears(session.qtransformer, s.blocks)
    rows = attach_branches(session, s, layers)
    term = MemoryRelationLoss(s.trd_queue, s.trd_tokens, s.trd_tau, s.trd_buckets,
                              getattr(session.quant_config, "max_timestep", 1000.0))
    terms = [Term("trd", s.trd_weight, term)] if s.trd and s.trd_weight > 0 else []
    extra = {k: v for k, v in asdict(s).items() if k not in asdict(s.distill_settings())}
    result = run_distillation(session, s.distill_settings(), name="mpq_distill", terms=terms, fingerprint_extra=extra)
    branch_errors(session.qtransformer, list(layers), rows)
    n_w = sum(ql.weight.numel() for ql in layers.values())
    salient = sum(ql.extras["residual"].salient_entries for ql in layers.values() if "residual" in ql.extras)
    lora_params = sum(ql.extras["lora"].A.numel() + ql.extras["lora"].B.numel() for ql in layers.values()
                      if "lora" in ql.extras)
    share = salient / n_w if n_w else 0.0
    index_bits = 0.0 if s.residual_mode == "channel" else share * math.log2(max(2, max(
        (ql.weight.numel() for ql in layers.values()), default=2)))
    summary = {
        **distill_summary(result),
        "layers": len(layers),
        "salient_share": share,
        "residual_bits_per_weight": share + index_bits,
        "lora_params": lora_params,
        "lora_bits_per_weight": 16.0 * lora_params / n_w if n_w else 0.0,
        "mean_err_plain": _mean(r["err_plain"] for r in rows),
        "mean_err_residual": _mean(r.get("err_residual") for r in rows),
        "mean_err_lora_init": _mean(r.get("err_lora_init") for r in rows),
        "mean_err_trained": _mean(r.get("err_trained") for r in rows),
    }
    report = StageReport(
        name="mpq_distill",
        settings=asdict(s),
        summary=summary,
        tables={"blocks": unit_rows(result), "weights": rows},
        arrays={"curves": curves_of(result), "queue_sizes": {str(k): v for k, v in term.sizes().items()}},
        notes=result_notes(result),
        seconds=time.perf_counter() - t0,
    )
    return session.add(report)


def _mean(values) -> float:  # noqa: ANN001
    vals = [v for v in values if v is not None]
    return sum(vals) / len(vals) if vals else float("nan")




__all__ = ["BinaryResidual", "LoRABranch", "MPQSettings", "MemoryRelationLoss", "binary_residual", "low_rank_init",
           "mpq_distill", "mpq_figures", "rel_error"]
