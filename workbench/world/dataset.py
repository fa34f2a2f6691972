"""Datasets of ground-truth clips drawn from the scene grammar, reproducible from a seed."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from workbench.world.grammar import Scene, training_scenes
from workbench.world.render import WorldConfig, render, sample_starts


@dataclass
class WorldBatch:
    videos: torch.Tensor  # (B, 3, F, H, W) in [0, 1]
    scenes: list[Scene]
    starts: torch.Tensor  # (B, 2) start centres (y, x)

    @property
    def prompts(self) -> list[str]:
        return [s.prompt for s in self.scenes]


def random_batch(
    batch_size: int,
    generator: torch.Generator,
    scenes: list[Scene] | None = None,
    cfg: WorldConfig = WorldConfig(),
    device: str | torch.device = "cpu",
) -> WorldBatch:
    """A batch of random scenes (from `scenes`, default the training split) at random start positions."""
    pool = scenes if scenes is not None else training_scenes()
    idx = torch.randint(len(pool), (batch_size,), generator=generator)
    chosen = [pool[int(i)] for i in idx]
    starts = sample_starts(chosen, generator, cfg)
    return WorldBatch(render(chosen, starts, cfg, device=device), chosen, starts)


class WorldDataset(torch.utils.data.Dataset):
    """A fixed, indexable set: every scene in `scenes` x `per_scene` start positions, seeded."""

    def __init__(self, scenes: list[Scene] | None = None, per_scene: int = 1, seed: int = 0, cfg: WorldConfig = WorldConfig()):
        self.scenes = [s for s in (scenes if scenes is not None else training_scenes()) for _ in range(per_scene)]
        self.cfg = cfg
        self.starts = sample_starts(self.scenes, torch.Generator().manual_seed(seed), cfg)

    def __len__(self) -> int:
        return len(self.scenes)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, str]:
        clip = render([self.scenes[i]], self.starts[i : i + 1], self.cfg)[0]
        return clip, self.scenes[i].prompt
