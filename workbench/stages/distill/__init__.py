"""Distillation shared by the Q-VDiT, S2Q-VDiT and MPQ-DMv2 recipes, one file per kind of code:

settings (`DistillSettings`), rows (calibration calls as training rows), losses (relative MSE, extra terms),
trainable (what is trained), loop (`run_distillation`, phases, on one process or several ranks), checkpoint
(the loop's checkpoints: `workbench.io.checkpoint` files, or distributed checkpoints under torchrun) and stage
(the plain `distill` stage and report helpers). The modules a trained model carries (TQE, LoRA,
binary residual, weight deltas) live in `workbench.quant.compensation`.
"""

from workbench.io.checkpoint import CheckpointError
from workbench.stages.distill.loop import DistillResult, UnitResult, run_distillation
from workbench.stages.distill.losses import Term, TermContext, frame_similarity, relation_kl, weighted_rel_mse
from workbench.stages.distill.settings import DistillDivergedError, DistillSettings
from workbench.stages.distill.stage import curves_of, distill, distill_summary, result_notes, unit_rows
from workbench.stages.distill.trainable import make_scales_learnable, param_groups

__all__ = [
    "CheckpointError", "DistillDivergedError", "DistillResult", "DistillSettings", "Term", "TermContext",
    "UnitResult", "curves_of", "distill", "distill_summary", "frame_similarity", "make_scales_learnable",
    "param_groups", "relation_kl", "result_notes", "run_distillation", "unit_rows", "weighted_rel_mse",
]
