"""Latent-space error per denoising step: how far the quantized run's latents drift from the FP run's.

Run the FP and the quantized model on the same prompts and seeds, each with its own ``LatentRecorder`` as
``on_step`` (generators call ``on_step(step, timestep, latents)`` once per step), then compare:

    fp_rec, q_rec = LatentRecorder(), LatentRecorder()
    gen.generate(prompts, seeds, on_step=fp_rec)
    gen.generate(prompts, seeds, transformer=quantized, on_step=q_rec)
    latent_errors(fp_rec, q_rec).as_dict()   # {"latent_rel_l2_mean": ..., "latent_rel_l2_per_step": [...]}

Where the error grows along the steps shows whether quantization error compounds through sampling.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch


class LatentRecorder:
    """An ``on_step`` callback that keeps CPU float32 copies of each step's latents (bounded memory).

    With ``max_elements``, a step whose latents hold more elements keeps only ``max_elements`` of them,
    always at the same flat positions: a random subset drawn once from ``seed`` and the element count,
    so an FP and a quantized recorder with the same settings keep the same elements of every step.
    """

    def __init__(self, max_elements: int | None = None, seed: int = 0) -> None:
        if max_elements is not None and (not isinstance(max_elements, int) or max_elements < 1):
            raise ValueError(f"max_elements must be a positive int or None (keep everything), got {max_elements!r}")
        self.max_elements = max_elements
        self.seed = seed
        self.steps: list[int] = []
        self.timesteps: list[float] = []
        self.latents: list[torch.Tensor] = []  # per step: a copy of the latents, or the flat kept elements
        self.shapes: list[tuple[int, ...]] = []  # per step: the shape of the full latents
        self._index: dict[int, torch.Tensor] = {}  # element count -> sorted kept flat positions

    def __call__(self, step: int, timestep: float, latents: torch.Tensor) -> None:
        """Record one denoising step (the signature generators use for ``on_step``)."""
        x = latents.detach()
        n = x.numel()
        if self.max_elements is not None and n > self.max_elements:
            idx = self._positions(n)
            kept = x.reshape(-1)[idx.to(x.device)].to("cpu", torch.float32)
        else:
            kept = x.to("cpu", torch.float32, copy=True)
        self.steps.append(int(step))
        self.timesteps.append(float(timestep))
        self.latents.append(kept)
        self.shapes.append(tuple(x.shape))

    def _positions(self, n: int) -> torch.Tensor:
        """The kept flat positions for latents of n elements: fixed by (seed, n, max_elements)."""
        if n not in self._index:
            g = torch.Generator().manual_seed(self.seed)
            self._index[n] = torch.randperm(n, generator=g)[: self.max_elements].sort().values
        return self._index[n]

    @property
    def subsampled(self) -> bool:
        """Whether any recorded step kept only part of its latents."""
        return any(t.numel() != _numel(s) for t, s in zip(self.latents, self.shapes))

    def clear(self) -> None:
        """Forget the recorded steps (e.g. before reusing the recorder for another run)."""
        self.steps.clear()
        self.timesteps.clear()
        self.latents.clear()
        self.shapes.clear()

    def __len__(self) -> int:
        return len(self.latents)


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


@dataclass
class LatentErrors:
    """Relative L2 error ||q - fp|| / ||fp|| of the latents at each denoising step, and its mean over steps."""

    per_step: list[float]
    mean: float
    timesteps: list[float] | None = None  # the FP run's timesteps, when recorders were compared

    def as_dict(self) -> dict[str, float | list[float]]:
        """JSON-ready: latent_rel_l2_mean (float) and latent_rel_l2_per_step (list of floats)."""
        return {"latent_rel_l2_mean": self.mean, "latent_rel_l2_per_step": list(self.per_step)}


def latent_errors(
    fp: LatentRecorder | Sequence[torch.Tensor], quantized: LatentRecorder | Sequence[torch.Tensor]
) -> LatentErrors:
    """Per-step relative L2 error ||q_s - fp_s|| / ||fp_s|| (over all elements of the step, whole batch) and its mean.

    Takes two ``LatentRecorder``s or two lists of per-step latent tensors from runs with the same prompts
    and seeds. Recorders that saw several generate calls (a prompt set in batches) pool each step index
    over the calls: sqrt(sum ||q_s - fp_s||^2 / sum ||fp_s||^2). Raises ValueError for different step
    counts or shapes, recorders that kept different elements, NaN / infinite latents, or an all-zero FP
    step (relative error undefined).
    """
    fp_steps, q_steps = _steps(fp, "fp"), _steps(quantized, "quantized")
    recorders = isinstance(fp, LatentRecorder) and isinstance(quantized, LatentRecorder)
    if recorders:
        if (fp.max_elements, fp.seed) != (quantized.max_elements, quantized.seed) and (fp.subsampled or quantized.subsampled):
            raise ValueError(
                f"the recorders kept different elements (max_elements, seed) = {(fp.max_elements, fp.seed)} vs "
                f"{(quantized.max_elements, quantized.seed)}; record both runs with the same max_elements and seed"
            )
        if fp.shapes != quantized.shapes or fp.steps != quantized.steps:
            raise ValueError(f"the runs recorded different steps or shapes: steps {fp.steps} vs {quantized.steps}, "
                             f"shapes {fp.shapes} vs {quantized.shapes}; record both runs with the same prompts, "
                             "seeds, batches and generation settings")
    if len(fp_steps) == 0:
        raise ValueError("no steps recorded; pass the recorder as on_step=recorder to the generator before comparing")
    if len(fp_steps) != len(q_steps):
        raise ValueError(f"the FP run has {len(fp_steps)} steps but the quantized run {len(q_steps)}; "
                         "run both with the same number of steps")
    keys = list(fp.steps) if recorders else list(range(len(fp_steps)))  # type: ignore[union-attr]
    sums: dict[int, list[float]] = {}  # step -> [sum ||q - fp||^2, sum ||fp||^2], in order of first appearance
    for i, (key, a, b) in enumerate(zip(keys, fp_steps, q_steps)):
        if a.shape != b.shape:
            raise ValueError(f"step {i}: FP latents have shape {tuple(a.shape)} but quantized {tuple(b.shape)}; "
                             "record both runs with the same prompts, seeds and settings")
        a, b = a.detach().double().cpu(), b.detach().double().cpu()
        for name, t in (("FP", a), ("quantized", b)):
            if not torch.isfinite(t).all():
                raise ValueError(f"step {i}: {name} latents have NaN or infinite values; a diverged run cannot be scored")
        acc = sums.setdefault(key, [0.0, 0.0])
        acc[0] += float((b - a).pow(2).sum())
        acc[1] += float(a.pow(2).sum())
    errors = []
    for key, (num, den) in sums.items():
        if den == 0:
            raise ValueError(f"step {key}: the FP latents are all zero, so the relative error is undefined")
        errors.append(math.sqrt(num / den))
    timesteps = None
    if recorders:
        first = {}
        for key, t in zip(fp.steps, fp.timesteps):  # type: ignore[union-attr]
            first.setdefault(key, t)
        timesteps = [first[k] for k in sums]
    return LatentErrors(per_step=errors, mean=sum(errors) / len(errors), timesteps=timesteps)


def _steps(x: LatentRecorder | Sequence[torch.Tensor], name: str) -> list[torch.Tensor]:
    if isinstance(x, LatentRecorder):
        return list(x.latents)
    if not isinstance(x, Sequence) or not all(isinstance(t, torch.Tensor) for t in x):
        raise ValueError(f"{name} must be a LatentRecorder or a list of per-step latent tensors, got {type(x).__name__}")
    return list(x)
