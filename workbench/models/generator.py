"""The interface every video generator implements: prompts + seeds in, videos out, transformer exposed.

A generator is what the workbench quantizes and evaluates. The bundled tiny model and any local
diffusers video pipeline (``workbench.models.video_pipeline``) sit behind this one interface, so stages,
metrics and reports never need to know which model they are looking at.
"""
from __future__ import annotations

import abc
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields, replace
from pathlib import Path

import torch
from torch import nn

__all__ = [
    "GenerationSettings",
    "Generator",
    "PromptTooLongError",
    "StepCallback",
    "check_prompts_and_seeds",
    "check_sizes",
    "nearest_valid",
    "read_prompt_list",
    "shorten",
]

PROMPT_DIR = Path(__file__).parent / "prompts"

StepCallback = Callable[[int, float, torch.Tensor], None]
"""``on_step(step_index, timestep, latents)``: called once per denoising step, after the scheduler step."""

MAX_STEPS = 1000
MAX_GUIDANCE = 100.0


class PromptTooLongError(ValueError):
    """A prompt has more tokens than the text encoder takes (it would be silently truncated)."""


@dataclass(frozen=True)
class GenerationSettings:
    """How to sample: ``None`` in a field means "the generator's default" (see ``Generator.defaults()``)."""

    steps: int | None = None
    guidance: float | None = None
    frames: int | None = None
    height: int | None = None
    width: int | None = None

    def __post_init__(self) -> None:
        if self.steps is not None:
            if isinstance(self.steps, bool) or not isinstance(self.steps, int):
                raise ValueError(f"steps must be an int between 1 and {MAX_STEPS}, got {self.steps!r}")
            if not 1 <= self.steps <= MAX_STEPS:
                raise ValueError(
                    f"steps={self.steps} is out of range: pass a number of denoising steps between 1 and {MAX_STEPS}"
                )
        if self.guidance is not None:
            if isinstance(self.guidance, bool) or not isinstance(self.guidance, (int, float)):
                raise ValueError(f"guidance must be a number in [0, {MAX_GUIDANCE:g}), got {self.guidance!r}")
            if not 0.0 <= float(self.guidance) < MAX_GUIDANCE:  # also rejects NaN
                raise ValueError(
                    f"guidance={self.guidance} is out of range: pass a classifier-free guidance scale in "
                    f"[0, {MAX_GUIDANCE:g}) (1 or less turns guidance off)"
                )
            object.__setattr__(self, "guidance", float(self.guidance))
        for name in ("frames", "height", "width"):
            value = getattr(self, name)
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"{name} must be a positive int, got {value!r}")
            if value < 1:
                raise ValueError(f"{name}={value} is not a size: pass a positive number of {_UNIT[name]}")

    def resolved(self, defaults: GenerationSettings) -> GenerationSettings:
        """These settings with every ``None`` filled from ``defaults``."""
        filled = {f.name: getattr(defaults, f.name) for f in fields(self) if getattr(self, f.name) is None}
        return replace(self, **filled)

    def is_complete(self) -> bool:
        """True when no field is ``None``."""
        return all(getattr(self, f.name) is not None for f in fields(self))


_UNIT = {"frames": "frames", "height": "pixels", "width": "pixels"}


def nearest_valid(value: int, multiple: int, offset: int = 0) -> list[int]:
    """The valid values ``multiple * k + offset >= max(offset, 1)`` nearest to ``value`` (one or two, ascending)."""
    if multiple < 1:
        raise ValueError(f"multiple must be >= 1, got {multiple}")
    lowest = offset if offset >= 1 else multiple
    k = (value - offset) // multiple
    below = multiple * k + offset
    above = below + multiple
    out = [v for v in (below, above) if v >= lowest]
    return out or [lowest]


def check_sizes(
    settings: GenerationSettings,
    *,
    model: str,
    frame_multiple: int = 1,
    frame_offset: int = 0,
    size_multiple: int = 1,
    frames_exact: int | None = None,
    why_frames: str = "",
    why_size: str = "",
) -> None:
    """Raise ``ValueError`` naming the nearest valid values when frames/height/width do not fit the model.

    Frames must be ``frame_multiple * k + frame_offset`` (or exactly ``frames_exact`` when given); height
    and width must be multiples of ``size_multiple``. ``why_*`` say where the rule comes from.
    """
    problems = []
    frames = settings.frames
    if frames is not None:
        if frames_exact is not None and frames != frames_exact:
            problems.append(
                f"frames={frames}: {model} makes exactly {frames_exact} frames{why_frames}; pass frames={frames_exact}"
            )
        elif frames_exact is None and (frames < max(frame_offset, 1) or (frames - frame_offset) % frame_multiple):
            rule = f"{frame_multiple}k+{frame_offset}" if frame_offset else f"a multiple of {frame_multiple}"
            ok = " or ".join(str(v) for v in nearest_valid(frames, frame_multiple, frame_offset))
            problems.append(f"frames={frames}: {model} needs frames = {rule}{why_frames}; nearest valid: {ok}")
    for name in ("height", "width"):
        value = getattr(settings, name)
        if value is not None and value % size_multiple:
            ok = " or ".join(str(v) for v in nearest_valid(value, size_multiple))
            problems.append(
                f"{name}={value}: {model} needs a multiple of {size_multiple}{why_size}; nearest valid: {ok}"
            )
    if problems:
        raise ValueError("Unsupported video size. " + "; ".join(problems) + ".")


def check_prompts_and_seeds(prompts: Sequence[str], seeds: Sequence[int]) -> tuple[list[str], list[int]]:
    """Validate the ``generate`` batch: a non-empty list of strings and one int seed per prompt."""
    if isinstance(prompts, str):
        raise ValueError("prompts must be a list of strings, not one string: pass [prompt]")
    prompts = list(prompts)
    if not prompts:
        raise ValueError("prompts is empty: pass at least one prompt")
    for i, p in enumerate(prompts):
        if not isinstance(p, str):
            raise ValueError(f"prompts[{i}] must be a str, got {type(p).__name__}")
    if isinstance(seeds, int):
        raise ValueError("seeds must be a list with one int per prompt, not one int: pass [seed] * len(prompts)")
    seeds = list(seeds)
    if len(seeds) != len(prompts):
        raise ValueError(
            f"got {len(prompts)} prompts but {len(seeds)} seeds: pass one seed per prompt (a (prompt, seed) pair "
            "names one video)"
        )
    for i, s in enumerate(seeds):
        if isinstance(s, bool) or not isinstance(s, int) or not 0 <= s < 2**63:
            raise ValueError(f"seeds[{i}]={s!r} must be an int in [0, 2**63)")
    return prompts, seeds


def read_prompt_list(path: Path) -> list[str]:
    """Prompts of a packaged list, one a line ('#' comments and blank lines skipped)."""
    lines = (line.split("#", 1)[0].strip() for line in path.read_text(encoding="utf-8").splitlines())
    return [line for line in lines if line]


def _choose(pool: list[str], n: int, seed: int) -> list[str]:
    """n prompts of `pool` in a seeded order (cycling when n exceeds the pool)."""
    if n < 1:
        raise ValueError(f"the number of prompts must be >= 1, got {n}")
    order = torch.randperm(len(pool), generator=torch.Generator().manual_seed(seed)).tolist()
    return [pool[order[i % len(pool)]] for i in range(n)]


def shorten(text: str, limit: int = 80) -> str:
    """``text`` cut to ``limit`` characters for an error message."""
    return text if len(text) <= limit else text[: limit - 3] + "..."


class Generator(abc.ABC):
    """A text-to-video model the workbench can sample, quantize and evaluate.

    Attributes:
        name: a short human-readable name (reports, file names).
        transformer: the full-precision denoising transformer, the module that gets quantized.
        device: where it runs. dtype: the dtype of its weights.

    Contract of :meth:`generate`: float32 CPU videos ``(B, 3, F, H, W)`` in [0, 1], one seed per prompt,
    and a (prompt, seed) pair gives the same video whatever else is in the batch.
    """

    name: str
    device: torch.device
    dtype: torch.dtype

    @property
    @abc.abstractmethod
    def transformer(self) -> nn.Module:
        """The full-precision transformer (what gets quantized)."""

    @abc.abstractmethod
    def defaults(self) -> GenerationSettings:
        """The complete settings the model was made for (every field set)."""

    @abc.abstractmethod
    def check_prompts(self, prompts: list[str]) -> None:
        """Raise :class:`PromptTooLongError` for a prompt longer than the text encoder takes."""

    def check_settings(self, settings: GenerationSettings) -> None:
        """Raise ValueError naming the nearest valid values when the settings' sizes do not fit the model."""

    # -- prompt sets: what calibration and evaluation use unless the user passes their own -------------

    def calibration_prompts(self, n: int, seed: int = 0) -> list[str]:
        """n calibration prompts (seeded choice), disjoint from `eval_prompts()`."""
        return _choose(read_prompt_list(PROMPT_DIR / "calibration.txt"), n, seed)

    def eval_prompts(self) -> list[str]:
        """The held-out prompt set of evaluation (never used for calibration)."""
        return read_prompt_list(PROMPT_DIR / "evaluation.txt")

    def oracle_scenes(self, prompts: list[str]) -> list | None:
        """The scenes an oracle can check videos of these prompts against (`workbench.metrics.oracle`), or None
        when the model has no oracle (any real video model): metrics then compare with the FP videos only."""
        return None

    def describe(self) -> dict:
        """Plain data naming the model for manifests and reports."""
        return {"name": self.name, "class": type(self).__name__}

    @abc.abstractmethod
    def generate(
        self,
        prompts: list[str],
        seeds: list[int],
        settings: GenerationSettings | None = None,
        *,
        transformer: nn.Module | None = None,
        progress: bool = False,
        on_step: StepCallback | None = None,
        decode: bool = True,
    ) -> torch.Tensor | None:
        """Videos ``(B, 3, F, H, W)`` float32 on the CPU in [0, 1].

        ``transformer`` swaps in another (e.g. quantized) transformer for this call only; ``on_step`` is
        called once per denoising step as ``on_step(step_index, timestep, latents)``. ``decode=False``:
        the caller needs only the denoising loop (calibration); a model may then skip its VAE and return None.
        """
