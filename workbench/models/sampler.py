"""Text-to-video sampling with a diffusers flow-matching scheduler and classifier-free guidance.

Each video's starting noise comes from its own seed, so a (prompt, seed) pair gives the same
video whatever else is in the batch; that is what lets quantized and full-precision runs be
compared video by video.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from tqdm.auto import tqdm

from workbench.models.tiny_dit import with_coordinate_channels
from workbench.world.render import WorldConfig


@dataclass(frozen=True)
class SamplingConfig:
    steps: int = 16
    guidance: float = 3.0

    def __post_init__(self) -> None:
        if not 1 <= int(self.steps) <= 1000:
            raise ValueError(f"steps must be between 1 and 1000, got {self.steps}")
        if not (self.guidance >= 0.0 and self.guidance < 100.0):
            raise ValueError(f"guidance must be in [0, 100), got {self.guidance}")


def initial_noise(seeds: list[int], world: WorldConfig, channels: int = 3) -> torch.Tensor:
    """Starting noise (B, C, F, H, W), one generator per seed (batch-independent)."""
    out = []
    for s in seeds:
        g = torch.Generator().manual_seed(int(s))
        out.append(torch.randn(channels, world.frames, world.height, world.width, generator=g))
    return torch.stack(out)


StepCallback = Callable[[int, float, torch.Tensor], None]


@torch.no_grad()
def sample(
    transformer: torch.nn.Module,
    text_embeddings: torch.Tensor,
    null_embeddings: torch.Tensor,
    seeds: list[int],
    world: WorldConfig,
    scheduler_config: dict,
    sampling: SamplingConfig = SamplingConfig(),
    progress: bool = False,
    on_step: StepCallback | None = None,
) -> torch.Tensor:
    """Denoise from seeded noise to clips (B, 3, F, H, W) in [0, 1].

    `on_step(i, timestep, latents)` is called after each scheduler step with the new latents (the
    `Generator.generate` contract; calibration records the transformer's own inputs with hooks instead).
    """
    device = next(transformer.parameters()).device
    dtype = next(transformer.parameters()).dtype
    scheduler = FlowMatchEulerDiscreteScheduler.from_config(scheduler_config)
    scheduler.set_timesteps(sampling.steps, device=device)
    x = initial_noise(seeds, world).to(device=device, dtype=torch.float32)
    b = x.shape[0]
    guided = sampling.guidance != 1.0
    cond = torch.cat([text_embeddings, null_embeddings.expand(b, -1, -1)]) if guided else text_embeddings
    cond = cond.to(device=device, dtype=dtype)
    in_channels = int(getattr(getattr(transformer, "config", None), "in_channels", x.shape[1]))
    for i, t in enumerate(tqdm(scheduler.timesteps, desc="sampling", disable=not progress, leave=False)):
        inp = torch.cat([x, x]) if guided else x
        inp = with_coordinate_channels(inp, in_channels).to(dtype)
        v = transformer(inp, t.expand(inp.shape[0]), cond, return_dict=False)[0].float()
        if guided:
            v_c, v_u = v.chunk(2)
            v = v_u + sampling.guidance * (v_c - v_u)
        if not torch.isfinite(v).all():
            raise FloatingPointError(
                f"the transformer produced NaN/inf at step {i} (timestep {float(t):.1f}); "
                "the model or its quantization diverged: check the recipe's bit-widths and ranges"
            )
        x = scheduler.step(v, t, x, return_dict=False)[0]
        if on_step is not None:
            on_step(i, float(t), x)
    return ((x + 1.0) / 2.0).clamp(0.0, 1.0)
