"""The bundled tiny text-to-video model: a trained Wan DiT + our text encoder + a diffusers scheduler.

Weights ship inside the package (`workbench/models/weights/<name>/`) in diffusers' own layout, so
`WanTransformer3DModel.from_pretrained` reads the transformer directly.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from diffusers import WanTransformer3DModel
from safetensors.torch import load_file

from workbench.models.sampler import SamplingConfig, sample
from workbench.models.text_encoder import TextEncoder, TextEncoderConfig
from workbench.world.grammar import parse_prompt
from workbench.world.render import WorldConfig

WEIGHTS_ROOT = Path(__file__).parent / "weights"
BUNDLED = ("tiny-world",)


@dataclass
class TinyWorldModel:
    """Everything needed to turn prompts into videos; `transformer` is what gets quantized."""

    transformer: WanTransformer3DModel
    text_encoder: TextEncoder
    scheduler_config: dict
    world: WorldConfig = field(default_factory=WorldConfig)
    name: str = "tiny-world"

    def generate(self, prompt: str, seed: int = 0, steps: int = 16, guidance: float = 3.0, progress: bool = False) -> torch.Tensor:
        """One clip (3, F, H, W) in [0, 1] for a prompt of the scene grammar."""
        return self.generate_many([prompt], [seed], steps=steps, guidance=guidance, progress=progress)[0]

    @torch.no_grad()
    def generate_many(
        self,
        prompts: list[str],
        seeds: list[int],
        steps: int = 16,
        guidance: float = 3.0,
        progress: bool = False,
        transformer: torch.nn.Module | None = None,
        on_step=None,
    ) -> torch.Tensor:
        """Clips (B, 3, F, H, W); `transformer` swaps in another (e.g. quantized) copy."""
        if len(prompts) != len(seeds):
            raise ValueError(f"got {len(prompts)} prompts but {len(seeds)} seeds; give one seed per prompt")
        for p in prompts:
            parse_prompt(p)  # clear error for words outside the grammar
        emb = self.text_encoder.encode(prompts)
        null = self.text_encoder.encode([""])
        return sample(
            transformer if transformer is not None else self.transformer,
            emb,
            null,
            list(seeds),
            self.world,
            self.scheduler_config,
            SamplingConfig(steps=steps, guidance=guidance),
            progress=progress,
            on_step=on_step,
        )

    def save(self, directory: str | Path) -> None:
        """Write the bundled layout: transformer/ (diffusers), text_encoder.*, scheduler.json, world.json."""
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        self.transformer.save_pretrained(d / "transformer", safe_serialization=True)
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
