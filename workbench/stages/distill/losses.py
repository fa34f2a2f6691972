"""Distillation losses: the weighted relative MSE every unit is trained on, and extra terms
(`Term(name, weight, fn)` computed from a `TermContext`: Q-VDiT's temporal relation, MPQ-DMv2's memory)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F


@dataclass
class TermContext:
    """What an extra loss term sees at one step.

    pred / target: the unit's output (block: (B, S, D) tokens; e2e: the transformer output).
    token_weights: (B, S) or None. grid: (frames, height, width) of the token grid or None.
    generator: the loop's generator (use it for any randomness, so resuming is exact).
    """

    pred: torch.Tensor
    target: torch.Tensor
    unit: str
    iteration: int
    timesteps: torch.Tensor
    token_weights: torch.Tensor | None
    grid: tuple[int, int, int] | None
    mode: str
    generator: torch.Generator

    def tokens(self, x: torch.Tensor) -> torch.Tensor:
        """x as (B, S, D) tokens (e2e outputs (B, C, F, H, W) become one token per pixel)."""
        if self.mode == "block":
            return x
        b, c = x.shape[:2]
        return x.reshape(b, c, -1).transpose(1, 2)

    def frames(self, x: torch.Tensor) -> torch.Tensor:
        """x as (B, F, N): one feature vector per frame."""
        if self.mode == "e2e":
            return x.transpose(1, 2).reshape(x.shape[0], x.shape[2], -1)
        if self.grid is None:
            raise ValueError("frame relations need the token grid (frames x height x width); this model's "
                             "grid is unknown (supported: Wan-style transformers with a 3D patch_size)")
        f = self.grid[0]
        if x.shape[1] % f:
            raise ValueError(f"{x.shape[1]} tokens do not split into {f} frames")
        return x.reshape(x.shape[0], f, -1)


@dataclass
class Term:
    """An extra loss term: `weight * fn(ctx)`; fn may have reset(unit) / state_dict() / load_state_dict()."""

    name: str
    weight: float
    fn: Callable[[TermContext], torch.Tensor]


def frame_similarity(frames: torch.Tensor) -> torch.Tensor:
    """(B, F, N) -> (B, F, F) cosine similarity between the frames."""
    f = F.normalize(frames.float(), dim=-1)
    return f @ f.transpose(1, 2)


def relation_kl(pred_sim: torch.Tensor, target_sim: torch.Tensor, tau: float = 1.0) -> torch.Tensor:
    """KL(softmax(target / tau) || softmax(pred / tau)) over the last dim, mean over rows."""
    logp = F.log_softmax(pred_sim / tau, dim=-1)
    logt = F.log_softmax(target_sim / tau, dim=-1)
    return (logt.exp() * (logt - logp)).sum(-1).mean()


def rel_mse_denominator(target: torch.Tensor) -> torch.Tensor:
    """sum ||target||^2 over all tokens of a batch, the denominator of `weighted_rel_mse`."""
    return target.float().pow(2).sum().clamp(min=1e-12)


def weighted_rel_mse(pred: torch.Tensor, target: torch.Tensor, weights: torch.Tensor | None = None,
                     den: torch.Tensor | None = None) -> torch.Tensor:
    """sum_s w_s ||pred_s - target_s||^2 / sum_s ||target_s||^2 over tokens (B, S, D); w: (B, S) or None.
    den: the denominator of a whole batch when pred / target hold some of its rows (the loss is then a sum over
    the batch's row chunks)."""
    err = (pred.float() - target.float()).pow(2)
    den = rel_mse_denominator(target) if den is None else den
    if weights is None:
        return err.sum() / den
    return (err.sum(-1) * weights).sum() / den
