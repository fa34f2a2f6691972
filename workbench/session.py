"""`Session`: the state a quantization run carries from stage to stage.

    from workbench.models import load_bundled
    from workbench.session import Session
    from workbench.stages import collect_calibration, apply_quantization, calibrate_ranges

    session = Session.start(load_bundled(), seed=0)
    collect_calibration(session)                 # FP trajectories, replayable
    apply_quantization(session)                  # session.qtransformer now holds QuantLinear layers
    calibrate_ranges(session)                    # static ranges, channel balancing
    session.reports                              # one StageReport per stage, in order

The session owns the full-precision model (never modified), `qtransformer` (a deep copy of the FP
transformer that stages quantize in place), the calibration cache, the current `QuantConfig`
(including per-layer mixed-precision rules) and the list of stage reports.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from workbench.quant import QuantConfig

if TYPE_CHECKING:
    from workbench.stages.report import StageReport


@dataclass
class Session:
    """What stages read and write (see module docstring).

    fp_model: a `workbench.models.Generator` (the bundled model or a diffusers pipeline: stages can generate
        videos) or a bare diffusers video transformer (stages that need videos then ask for calibration inputs).
    qtransformer: deep copy of the FP transformer, quantized in place by the stages.
    calibration: a `workbench.stages.calibration.CalibrationCache` once collected.
    quant_config: the QuantConfig applied to qtransformer (mixed precision adds per-layer rules).
    reports: one StageReport per stage run, in order.
    recipe: {"name": ..., "recipe": full recipe dict} when the session runs a recipe.
    state: stage-to-stage values that are not reports (e.g. the sensitivity ranking).
    """

    fp_model: Any
    qtransformer: nn.Module
    seed: int = 0
    calibration: Any = None
    quant_config: QuantConfig | None = None
    reports: list[StageReport] = field(default_factory=list)
    recipe: dict[str, Any] | None = None
    progress: bool = False
    state: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def start(cls, model: Any, seed: int = 0, progress: bool = False) -> Session:
        """A session on `model`: a Generator, a `workbench.models.LoadedModel` or a diffusers transformer.

        The FP model is left untouched; `qtransformer` is a deep copy of its transformer in eval mode.
        """
        model = cls.unwrap(model)
        transformer = getattr(model, "transformer", model)
        if not isinstance(transformer, nn.Module):
            raise TypeError(
                f"Session.start needs a Generator, a LoadedModel or a diffusers transformer (nn.Module), "
                f"got {type(model).__name__}"
            )
        q = copy.deepcopy(transformer).eval()
        for p in q.parameters():
            p.requires_grad_(False)
        return cls(fp_model=model, qtransformer=q, seed=int(seed), progress=progress)

    @staticmethod
    def unwrap(model: Any) -> Any:
        """The model a session holds for `model`: a LoadedModel's bundle (or bare transformer), else itself."""
        from workbench.models.loading import LoadedModel

        if isinstance(model, LoadedModel):
            return model.bundle if model.bundle is not None else model.transformer
        return model

    # ---- what the model is ---------------------------------------------------------------------------

    @property
    def fp_transformer(self) -> nn.Module:
        """The full-precision transformer (never modified by stages)."""
        return getattr(self.fp_model, "transformer", self.fp_model)

    @property
    def can_generate(self) -> bool:
        """True when the FP model is a `Generator` (turns prompts into videos: the bundled model, a pipeline)."""
        from workbench.models.generator import Generator

        return isinstance(self.fp_model, Generator)

    @property
    def model_name(self) -> str:
        name = getattr(self.fp_model, "name", None)
        return str(name) if name else type(self.fp_transformer).__name__

    @property
    def adapter(self):
        from workbench.models.adapters import adapter_for

        return adapter_for(self.fp_transformer)

    def require_generator(self, stage: str) -> None:
        if not self.can_generate:
            raise ValueError(
                f"{stage} generates videos, which needs a text-to-video model (the bundled tiny-world model or a "
                f"diffusers pipeline directory); this session holds a bare {type(self.fp_model).__name__}: load the "
                "whole pipeline (its folder with model_index.json), not only its transformer")

    # ---- reports -------------------------------------------------------------------------------------

    def add(self, report: StageReport) -> StageReport:
        """Append a report (stages call this) and return it."""
        self.reports.append(report)
        return report

    def last_report(self, name: str, table: str | None = None) -> StageReport | None:
        """The most recent report of the stage called `name` (holding table `table`, if given), or None.

        `table` lets a stage find e.g. the latest sensitivity ranking even when a later, partial run of
        the same stage (weights only, say) produced a report without it."""
        for r in reversed(self.reports):
            if r.name == name and (table is None or table in r.tables):
                return r
        return None

    def rng(self, offset: int = 0) -> torch.Generator:
        """A torch generator seeded from the session seed (stages pass distinct offsets)."""
        return torch.Generator().manual_seed(self.seed * 1_000_003 + offset)

    def __repr__(self) -> str:
        cal = "none" if self.calibration is None else repr(self.calibration)
        stages = ", ".join(r.name for r in self.reports) or "none"
        return f"Session(model={self.model_name}, seed={self.seed}, calibration={cal}, stages=[{stages}])"
