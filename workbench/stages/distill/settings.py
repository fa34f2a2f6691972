"""`DistillSettings`: how the shared distillation loop trains (the method stages extend them)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

MODES = ("block", "e2e")
INPUTS = ("quant", "fp")
TRAINABLE = ("scales", "extras", "weights")
SCHEDULES = ("cosine", "constant")


class DistillDivergedError(FloatingPointError):
    """The distillation loss became NaN or infinite (the message names the block and the iteration)."""


@dataclass
class DistillSettings:
    """How to train (the method stages extend these settings with their own components).

    mode: "block" (block-wise reconstruction) or "e2e" (the transformer's final output).
    iters: optimizer steps per block ("block") or in total ("e2e").
    batch_size: calibration rows per step. rows: rows used (evenly spaced; None: all).
    lr / scale_lr / weight_lr: AdamW learning rates of the extras, the weight scales and the weights
        (None: lr / 10 for scales, lr / 100 for weights). weight_decay applies to the extras only.
    schedule: "cosine" (decay to 0) or "constant". grad_clip: max gradient norm (None: no clipping).
    inputs: "quant" (block inputs from the quantized model's previous blocks) or "fp".
    train: what is trained: any of "scales", "extras", "weights".
    blocks: names of the blocks to train (None: all; the others are only propagated).
    seed: seed of the batch sampling and of the terms' randomness.
    eval_rows: fixed rows on which each block's error is measured before and after training.
    checkpoint_dir / checkpoint_every / resume: see `workbench.stages.distill.loop` (0: only when a block ends).
    device: where blocks train (None: where the model is). In block mode a device other than the model's
        streams the blocks: the models stay where they are (e.g. the CPU) and each block's teacher and student
        move to `device` while they train, so a model whose weights fit on one GPU once is distilled there.
    grad_checkpoint: e2e mode, recompute each transformer block in the backward pass instead of keeping its
        activations and fake-quantized weights (None: on when the model is on a GPU, where memory is what limits
        e2e on large models; the result is the same, a step costs about one more forward).
    train_chunk_tokens: tokens per forward + backward pass of a training step (0: never chunk). A step whose rows
        hold more runs them in chunks: the same gradient with one chunk's activations alive instead of the batch's
        (4 rows of Wan2.1's 32,760 tokens kept ~30 GB of block activations). The reconstruction loss alone is a
        sum over rows, so each chunk back-propagates its share; extra terms that mix rows (Q-VDiT's relation,
        MPQ-DMv2's memory) first need a no-grad forward of all rows for the loss's gradient (one more forward).
    """

    mode: str = "block"
    iters: int = 100
    batch_size: int = 4
    rows: int | None = None
    lr: float = 1e-3
    scale_lr: float | None = None
    weight_lr: float | None = None
    weight_decay: float = 0.0
    schedule: str = "cosine"
    grad_clip: float | None = 1.0
    inputs: str = "quant"
    train: list[str] = field(default_factory=lambda: ["scales", "extras"])
    blocks: list[str] | None = None
    seed: int = 0
    eval_rows: int = 8
    checkpoint_dir: str | None = None
    checkpoint_every: int = 50
    resume: bool = True
    device: str | None = None
    grad_checkpoint: bool | None = None
    train_chunk_tokens: int = 32768

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"unknown mode {self.mode!r}; choose one of {list(MODES)}")
        if self.inputs not in INPUTS:
            raise ValueError(f"unknown inputs {self.inputs!r}; choose one of {list(INPUTS)}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"unknown schedule {self.schedule!r}; choose one of {list(SCHEDULES)}")
        unknown = [t for t in self.train if t not in TRAINABLE]
        if unknown:
            raise ValueError(f"unknown trainable {unknown[0]!r} in train; choose from {list(TRAINABLE)}")
        if self.iters < 0 or self.batch_size < 1 or self.eval_rows < 0 or self.checkpoint_every < 0:
            raise ValueError("iters, eval_rows and checkpoint_every must be >= 0 and batch_size >= 1")
        if self.train_chunk_tokens < 0:
            raise ValueError(f"train_chunk_tokens must be >= 0 (0: never chunk), got {self.train_chunk_tokens}")
        if self.rows is not None and self.rows < 1:
            raise ValueError(f"rows must be >= 1 or None, got {self.rows}")
        if self.device is not None:
            import torch

            try:
                torch.device(self.device)
            except (RuntimeError, TypeError):
                raise ValueError(f"device {self.device!r} is not a torch device; pass 'cpu' or 'cuda'") from None
        for name in ("lr", "scale_lr", "weight_lr"):
            v = getattr(self, name)
            if v is not None and not (v > 0 and math.isfinite(v)):
                raise ValueError(f"{name} must be a positive number, got {v}")

    def distill_settings(self) -> DistillSettings:
        """The plain DistillSettings part of (a subclass of) these settings."""
        names = [f.name for f in DistillSettings.__dataclass_fields__.values()]
        return DistillSettings(**{n: getattr(self, n) for n in names})
