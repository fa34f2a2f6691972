"""`qvdit_distill`: Q-VDiT (arXiv 2505.22167): Token-aware Quantization Estimator + Temporal Maintenance Distillation.

    from workbench.stages.qvdit import QVDiTSettings, qvdit_distill
    qvdit_distill(session, QVDiTSettings(iters=150))

Token-aware Quantization Estimator (TQE), per quantized linear layer, as in the public Q-VDiT code:
- feature dimension, inside the quantizer: a low-rank estimate of the weight quantization error is
  learned, W_q = Q(W + B_in A_in) (rank `tqe_rank`, B_in zero at start, so training starts from plain
  quantization). After training it is folded into W: no cost at inference.
- token dimension, outside the quantizer: a low-rank branch on the layer's quantized input with a
  learnable scale per frame (or per token) of the video token grid,
  y = Q(x) W_q^T + m_token * (Q(x) A_out^T B_out^T) (rank `tqe_out_rank`, B_out zero at start, m = 1),
  so the error estimate can differ between frames (Q-VDiT's temporal-token mask). Layers whose input
  is not the video token sequence (cross-attention keys / values read the text) get no token scale.
Temporal Maintenance Distillation (TMD): besides the reconstruction loss, the output is compared frame
to frame: S = cos(f_i, f_j) over the frames i, j of a video (f: all values of a frame), and the loss
KL(softmax(S_fp / tau) || softmax(S_q / tau)) keeps the quantized model's inter-frame relations those of
the FP model (every frame optimised with the whole video as context). The public code trains all TQE
parameters and weight scales together on the transformer's output video (`mode="e2e"`, what the
q-vdit recipes use); `mode="block"` applies the same loss to each block's tokens instead.

The report holds the training curves, the TQE magnitude per layer (||B_in A_in|| / ||W|| and the
token branch's ||m|| ||B_out A_out|| / ||W||), the learned token scales, and the frame-similarity
matrices of the transformer output (FP vs quantized before vs after), on a few calibration rows.
Ablations: `tqe: false` (no estimator: only the weight scales are trained), `tmd: false`.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from workbench.quant import QuantLinear, quantized_linears
from workbench.session import Session
from workbench.models.adapters import token_grid
from workbench.quant.compensation import (
    TOKEN_MODES,
    Compensation,
    LowRankWeightDelta,
    TokenAwareEstimator,
    add_weight_delta,
    bake_weight_deltas,
    compensations,
    weight_deltas,
)
from workbench.stages.distill import (
    DistillSettings,
    Term,
    TermContext,
    curves_of,
    distill_summary,
    frame_similarity,
    relation_kl,
    result_notes,
    run_distillation,
    unit_rows,
)
from workbench.stages.registry import stage
from workbench.stages.report import StageReport
from workbench.viz.stage_figures import qvdit_figures



class TemporalRelationLoss:
    """Q-VDiT's TMD: KL between the frame-to-frame cosine-similarity distributions of FP and quantized."""

    def __init__(self, tau: float = 1.0) -> None:
        self.tau = float(tau)

    def __call__(self, ctx: TermContext) -> torch.Tensor:
        return relation_kl(frame_similarity(ctx.frames(ctx.pred)), frame_similarity(ctx.frames(ctx.target)), self.tau)


@dataclass
class QVDiTSettings(DistillSettings):
    """Distillation settings (DistillSettings) plus Q-VDiT's components.

    tqe: attach the Token-aware Quantization Estimator. tqe_rank: rank of the in-quantizer feature
    estimate (0: none). tqe_out_rank: rank of the token-aware branch (0: none). tqe_tokens: "frame"
    (one scale per frame), "token" (one per token) or "none".
    tmd: add Temporal Maintenance Distillation with weight `tmd_weight` and temperature `tmd_tau`.
    similarity_rows: calibration rows (evenly spaced) for the frame-similarity matrices of the report.
    """

    iters: int = 120
    batch_size: int = 4
    lr: float = 2e-3
    tqe: bool = True
    tqe_rank: int = 8
    tqe_out_rank: int = 4
    tqe_tokens: str = "frame"
    tmd: bool = True
    tmd_weight: float = 10.0
    tmd_tau: float = 1.0
    similarity_rows: int = 8

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.tqe_tokens not in TOKEN_MODES:
            raise ValueError(f"unknown tqe_tokens {self.tqe_tokens!r}; choose one of {list(TOKEN_MODES)}")
        if self.tqe_rank < 0 or self.tqe_out_rank < 0:
            raise ValueError("tqe_rank and tqe_out_rank must be >= 0")
        if self.tmd_weight < 0 or self.tmd_tau <= 0:
            raise ValueError("tmd_weight must be >= 0 and tmd_tau > 0")


# ----------------------------------------------------------------------------------------------------
# helpers shared with the other method stages


def block_linears(model: nn.Module, blocks: list[str] | None = None) -> dict[str, QuantLinear]:
    """QuantLinears with a weight quantizer inside the transformer blocks (or the named blocks)."""
    from workbench.models.adapters import named_transformer_blocks

    return quantized_linears(model, within=blocks or [b for b, _ in named_transformer_blocks(model)],
                             weight_quantized=True)


@torch.no_grad()
def layer_token_counts(session: Session, layers: dict[str, nn.Module]) -> dict[str, int]:
    """The sequence length each layer sees on one calibration call (its input's dim -2)."""
    entry = session.calibration.select(1, rows=1)[0]
    seen: dict[str, int] = {}

    def hook(mod, args, name):  # noqa: ANN001
        x = args[0]
        seen.setdefault(name, int(x.shape[-2]) if x.dim() >= 2 else 1)

    handles = [m.register_forward_pre_hook(lambda mod, args, n=n: hook(mod, args, n)) for n, m in layers.items()]
    try:
        session.calibration.replay(session.qtransformer, [entry])
    finally:
        for h in handles:
            h.remove()
    return seen


def session_grid(session: Session) -> tuple[int, int, int] | None:
    """(frames, height, width) of the session's token grid, from its calibration inputs."""
    from workbench.stages.calibration import hidden_states_of

    e = session.calibration.entries[0]
    return token_grid(session.fp_transformer, tuple(hidden_states_of(e).shape))


@torch.no_grad()
def output_frame_similarity(session: Session, transformer: nn.Module, rows: int) -> torch.Tensor:
    """Mean (F, F) cosine similarity between the frames of `transformer`'s output on `rows` calibration rows."""
    cal = session.calibration
    n_entries = max(1, min(len(cal.entries), math.ceil(rows / 2)))
    entries = cal.select(n_entries, rows=2)
    outs = cal.replay(transformer, entries)
    sims = [frame_similarity(o.transpose(1, 2).reshape(o.shape[0], o.shape[2], -1)) for o in outs]
    return torch.cat(sims).mean(0)


def ensure_quantized(session: Session, stage: str) -> None:
    if session.calibration is None:
        raise ValueError(f"{stage} needs calibration data: run collect_calibration(session) first")
    if not any(isinstance(m, QuantLinear) for m in session.qtransformer.modules()):
        raise ValueError(f"{stage} needs a quantized model: run apply_quantization(session) first")


# ----------------------------------------------------------------------------------------------------
# the stage


def attach_tqe(session: Session, s: QVDiTSettings, layers: dict[str, QuantLinear]) -> dict[str, Any]:
    """Attach the TQE parts to `layers`; returns {layer: (inner delta, branch)}."""
    g = torch.Generator().manual_seed(s.seed + 1)
    grid = session_grid(session)
    tokens = 0 if grid is None else grid[0] * grid[1] * grid[2]
    counts = layer_token_counts(session, layers) if tokens else {}
    attached: dict[str, Any] = {}
    for name, ql in layers.items():
        inner = branch = None
        if s.tqe_rank:
            inner = LowRankWeightDelta(ql.out_features, ql.in_features, min(s.tqe_rank, ql.in_features, ql.out_features), g)
            add_weight_delta(ql, inner.to(ql.weight.device))
        if s.tqe_out_rank:
            video = tokens and counts.get(name) == tokens
            branch = TokenAwareEstimator(
                **Compensation.layer_kwargs(ql), rank=min(s.tqe_out_rank, ql.in_features, ql.out_features),
                tokens=tokens if video else 0, frames=grid[0] if video else 0,
                token_mode=s.tqe_tokens if video else "none").adopt_input_side(ql)
            branch.reset_parameters(g)
            ql.extras["tqe"] = branch.to(ql.weight.device)
        attached[name] = (inner, branch)
    return attached


def tqe_rows(model: nn.Module, layers: list[str]) -> tuple[list[dict[str, Any]], dict[str, list[float]]]:
    """Per-layer TQE magnitudes (relative to the weight) and the learned token scales."""
    rows, scales = [], {}
    deltas = weight_deltas(model)
    for name in layers:
        ql = model.get_submodule(name)
        w = ql.weight.detach().float()
        wn = float(w.norm()) or 1.0
        inner = deltas.get(name)
        branch = ql.extras["tqe"] if "tqe" in ql.extras else None
        row = {"layer": name, "inner_rel": None if inner is None else float(inner.delta().norm()) / wn,
               "branch_rel": None, "token_scale_mean": None, "token_scale_std": None}
        if branch is not None:
            m = branch.token_scale
            mag = float(branch.weight_delta().norm())
            if m is not None:
                row["token_scale_mean"] = float(m.mean())
                row["token_scale_std"] = float(m.std()) if m.numel() > 1 else 0.0
                mag *= float(m.abs().mean())
                scales[name] = [float(v) for v in m.detach()]
            row["branch_rel"] = mag / wn
        rows.append(row)
    return rows, scales


@stage(QVDiTSettings, figures=qvdit_figures)
def qvdit_distill(session: Session, settings: QVDiTSettings | None = None) -> StageReport:
    """Attach TQE to every quantized linear in the blocks and train it (plus weight scales) with TMD."""
    s = settings or QVDiTSettings()
    ensure_quantized(session, "qvdit_distill")
    t0 = time.perf_counter()
    fp_sim = output_frame_similarity(session, session.fp_transformer, s.similarity_rows)
    before_sim = output_frame_similarity(session, session.qtransformer, s.similarity_rows)
    layers = block_linears(session.qtransformer, s.blocks)
    if s.tqe:
        attach_tqe(session, s, layers)
    terms = [Term("tmd", s.tmd_weight, TemporalRelationLoss(s.tmd_tau))] if s.tmd and s.tmd_weight > 0 else []
    if s.tmd and session_grid(session) is None and s.mode == "block":
        raise ValueError("TMD needs the video token grid (frames x height x width) of the model; it is unknown "
                         "for this architecture: set tmd=false or use mode='e2e'")
    extra = {k: v for k, v in asdict(s).items() if k not in asdict(s.distill_settings())}
    result = run_distillation(session, s.distill_settings(), name="qvdit_distill", terms=terms, fingerprint_extra=extra)
    notes = result_notes(result)
    rows, scales = tqe_rows(session.qtransformer, list(layers)) if s.tqe else ([], {})
    baked = bake_weight_deltas(session.qtransformer)
    after_sim = output_frame_similarity(session, session.qtransformer, s.similarity_rows)
    n_branch = len(compensations(session.qtransformer))
    summary = {
        **distill_summary(result),
        "tqe_layers": len(layers) if s.tqe else 0,
        "tqe_inner_baked": len(baked),
        "tqe_branches": n_branch,
        "frame_sim_err_before": float((before_sim - fp_sim).norm()),
        "frame_sim_err_after": float((after_sim - fp_sim).norm()),
        "mean_tqe_inner_rel": _mean([r["inner_rel"] for r in rows]),
        "mean_tqe_branch_rel": _mean([r["branch_rel"] for r in rows]),
    }
    report = StageReport(
        name="qvdit_distill",
        settings=asdict(s),
        summary=summary,
        tables={"blocks": unit_rows(result), "tqe": rows},
        arrays={
            "curves": curves_of(result),
            "token_scales": scales,
            "frame_similarity": {"fp": fp_sim, "before": before_sim, "after": after_sim},
            "grid": list(result.grid) if result.grid else None,
        },
        notes=notes,
        seconds=time.perf_counter() - t0,
    )
    return session.add(report)


def _mean(values: list[float | None]) -> float:
    vals = [v for v in values if v is not None]
    return sum(vals) / len(vals) if vals else float("nan")




__all__ = ["QVDiTSettings", "TemporalRelationLoss", "TokenAwareEstimator", "attach_tqe", "qvdit_distill",
           "qvdit_figures", "block_linears"]
