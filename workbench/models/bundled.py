"""The bundled tiny text-to-video model: a trained Wan DiT + our text encoder + a diffusers scheduler.

Weights ship inside the package (`workbench/models/weights/<name>/`) in diffusers' own layout, so
`WanTransformer3DModel.from_pretrained` reads the transformer directly. `TinyWorldModel` is one
`Generator` among others: what sets it apart is only that its prompts follow the scene grammar and its
videos can be checked by the world's oracle (`oracle_scenes`).
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from diffusers import WanTransformer3DModel
from safetensors.torch import load_file
from torch import nn

from workbench.models.generator import GenerationSettings, Generator, StepCallback, check_prompts_and_seeds
from workbench.models.sampler import SamplingConfig, sample
from workbench.models.text_encoder import TextEncoder, TextEncoderConfig
from workbench.world.grammar import Scene, heldout_scenes, parse_prompt
from workbench.world.render import WorldConfig

WEIGHTS_ROOT = Path(__file__).parent / "weights"
BUNDLED = ("tiny-world",)
DEFAULT_STEPS, DEFAULT_GUIDANCE = 16, 3.0


class TinyWorldModel(Generator):
    """Everything needed to turn prompts into videos of the world; `transformer` is what gets quantized."""

    def __init__(self, transformer: nn.Module, text_encoder: TextEncoder, scheduler_config: dict,
                 world: WorldConfig | None = None, name: str = "tiny-world") -> None:
        self._transformer = transformer
        self.text_encoder = text_encoder
        self.scheduler_config = scheduler_config
        self.world = world or WorldConfig()
        self.name = name

    @property
    def transformer(self) -> nn.Module:
        return self._transformer

    @transformer.setter
    def transformer(self, module: nn.Module) -> None:
        self._transformer = module

    @property
    def device(self) -> torch.device:  # type: ignore[override]
        return next(self._transformer.parameters()).device

    @property
    def dtype(self) -> torch.dtype:  # type: ignore[override]
        return next(self._transformer.parameters()).dtype

    def to(self, device: str | torch.device | None = None, dtype: torch.dtype | None = None) -> TinyWorldModel:
        """Move the transformer (and the text encoder) to `device`, the transformer's weights to `dtype`."""
        if device is not None:
            from workbench.models.video_pipeline import parse_device

            dev = parse_device(device)
            self._transformer.to(dev)
            self.text_encoder.to(dev)
        if dtype is not None:
            self._transformer.to(dtype=dtype)
        return self

    # -- the Generator interface ------------------------------------------------------------------

    def defaults(self) -> GenerationSettings:
        w = self.world
        return GenerationSettings(steps=DEFAULT_STEPS, guidance=DEFAULT_GUIDANCE, frames=w.frames, height=w.height,
                                  width=w.width)

    def check_settings(self, settings: GenerationSettings) -> None:
        w = self.world
        wrong = [f"{k}={getattr(settings, k)}" for k, v in (("frames", w.frames), ("height", w.height), ("width", w.width))
                 if getattr(settings, k) not in (None, v)]
        if wrong:
            raise ValueError(f"{self.name} makes exactly {w.frames} frames of {w.height}x{w.width} pixels (its world); "
                             f"{', '.join(wrong)} is not possible: leave frames/height/width unset")

    def check_prompts(self, prompts: list[str]) -> None:
        for p in prompts:
            parse_prompt(p)  # a PromptError listing the vocabulary for any word outside the grammar

    def calibration_prompts(self, n: int, seed: int = 0) -> list[str]:
        """n training-scene prompts (never held out), seeded, covering every word of the grammar as early as
        possible (greedy: each pick adds the most unseen words)."""
        from workbench.world.grammar import training_scenes

        scenes = training_scenes()
        order = torch.randperm(len(scenes), generator=torch.Generator().manual_seed(seed)).tolist()
        pool = [scenes[i] for i in order]
        seen: set[tuple[str, str]] = set()
        out = []
        while pool and len(out) < n:
            best = max(range(len(pool)), key=lambda i: len({(k, v) for k, v in pool[i].as_dict().items()} - seen))
            scene = pool.pop(best)
            seen |= set(scene.as_dict().items())
            out.append(scene.prompt)
        return out

    def eval_prompts(self) -> list[str]:
        return [s.prompt for s in heldout_scenes()]

    def oracle_scenes(self, prompts: list[str]) -> list[Scene]:
        return [parse_prompt(p) for p in prompts]

    def describe(self) -> dict:
        return {"name": self.name, "class": type(self).__name__, "world": self.world.__dict__}

    @torch.no_grad()
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
    ) -> torch.Tensor:
        """Clips (B, 3, F, H, W) in [0, 1]; `transformer` swaps in another (e.g. quantized) copy. The world
        model works in pixel space, so `decode` changes nothing (the clips cost no decoding)."""
        prompts, seeds = check_prompts_and_seeds(prompts, seeds)
        s = (settings or GenerationSettings()).resolved(self.defaults())
        self.check_settings(s)
        self.check_prompts(prompts)
        emb = self.text_encoder.encode(prompts)
        null = self.text_encoder.encode([""])
        return sample(transformer if transformer is not None else self._transformer, emb, null, seeds, self.world,
                      self.scheduler_config, SamplingConfig(steps=s.steps, guidance=s.guidance), progress=progress,
                      on_step=on_step)

    def save(self, directory: str | Path) -> None:
        """Write the bundled layout: transformer/ (diffusers), text_encoder.*, scheduler.json, world.json."""
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        self._transformer.save_pretrained(d / "transformer", safe_serialization=True)
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in self.text_encoder.state_dict().items()}, str(d / "text_encoder.safetensors"))
        (d / "text_encoder.json").write_text(json.dumps(self.text_encoder.config_dict(), indent=2))
        (d / "scheduler.json").write_text(json.dumps(self.scheduler_config, indent=2))
        (d / "world.json").write_text(json.dumps(self.world.__dict__, indent=2))


def load_from_dir(directory: str | Path, name: str = "tiny-world") -> TinyWorldModel:
    """Load the bundled layout from a directory; a missing or corrupt file is a clear error."""
    d = Path(directory)
    needed = ["transformer/config.json", "transformer/diffusion_pytorch_model.safetensors", "text_encoder.safetensors",
              "text_encoder.json", "scheduler.json", "world.json"]
    missing = [n for n in needed if not (d / n).is_file()]
    if missing:
        raise FileNotFoundError(
            f"model directory {d} lacks {', '.join(missing)}; reinstall the package or retrain with "
            "`python -m workbench.models.train --out DIR` and copy DIR there"
        )
    try:
        transformer = WanTransformer3DModel.from_pretrained(d / "transformer", local_files_only=True)
        te = TextEncoder(TextEncoderConfig(**json.loads((d / "text_encoder.json").read_text())))
        te.load_state_dict(load_file(str(d / "text_encoder.safetensors")))
        sched = json.loads((d / "scheduler.json").read_text())
        world = WorldConfig(**json.loads((d / "world.json").read_text()))
    except Exception as e:  # noqa: BLE001 - re-raised with the file named
        raise ValueError(f"could not load model from {d}: {type(e).__name__}: {e}. The files may be corrupt or truncated: "
                         "reinstall the package or re-save the model") from e
    return TinyWorldModel(transformer.eval(), te.eval(), sched, world, name)


def load_bundled(name: str = "tiny-world") -> TinyWorldModel:
    """The model shipped in the package, by name."""
    if name not in BUNDLED:
        raise ValueError(f"unknown bundled model {name!r}; bundled models: {', '.join(BUNDLED)}")
    return load_from_dir(WEIGHTS_ROOT / name, name)
