"""The procedural video world: scene grammar, renderer and datasets."""
from workbench.world.grammar import (
    ATTRIBUTES,
    COLORS,
    DIRECTIONS,
    SHAPES,
    SPEEDS,
    PromptError,
    Scene,
    all_scenes,
    heldout_scenes,
    parse_prompt,
    training_scenes,
    vocabulary,
)
from workbench.world.render import WorldConfig, render, render_prompt, sample_starts
from workbench.world.dataset import WorldBatch, WorldDataset, random_batch

__all__ = [
    "ATTRIBUTES", "COLORS", "DIRECTIONS", "SHAPES", "SPEEDS", "PromptError", "Scene", "all_scenes",
    "heldout_scenes", "parse_prompt", "training_scenes", "vocabulary", "WorldConfig", "render",
    "render_prompt", "sample_starts", "WorldBatch", "WorldDataset", "random_batch",
]
