"""Shared ground-truth clips for the metrics tests (rendered once per session)."""
from __future__ import annotations

import pytest
import torch

from workbench.world import all_scenes, render, sample_starts


@pytest.fixture(scope="session")
def gt_all():
    """Every scene of the grammar x 3 random starts: (scenes, clips (576, 3, 8, 32, 32))."""
    scenes = all_scenes() * 3
    starts = sample_starts(scenes, torch.Generator().manual_seed(1234))
    return scenes, render(scenes, starts)


@pytest.fixture(scope="session")
def gt_one():
    """Every scene of the grammar once, at other random starts: (scenes, clips (192, 3, 8, 32, 32))."""
    scenes = all_scenes()
    starts = sample_starts(scenes, torch.Generator().manual_seed(7))
    return scenes, render(scenes, starts)


@pytest.fixture(scope="session")
def gt_small(gt_one):
    """A 48-clip subset covering every colour, shape, direction and speed."""
    scenes, clips = gt_one
    idx = list(range(0, len(scenes), 4))
    return [scenes[i] for i in idx], clips[idx]
