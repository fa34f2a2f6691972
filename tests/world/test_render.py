import torch

from workbench.world import Scene, WorldConfig, all_scenes, random_batch, render, render_prompt, sample_starts
from workbench.world.dataset import WorldDataset


def test_render_is_deterministic_and_in_range():
    a, b = render_prompt("a red circle moving left", seed=3), render_prompt("a red circle moving left", seed=3)
    assert a.shape == (3, 8, 32, 32) and torch.equal(a, b)
    assert a.min() >= 0 and a.max() <= 1


def test_objects_stay_inside_the_frame_and_move_the_right_way():
    cfg = WorldConfig()
    scenes = all_scenes()
    clips = render(scenes, sample_starts(scenes, torch.Generator().manual_seed(0), cfg), cfg)
    ys = torch.arange(cfg.height, dtype=torch.float32)[:, None]
    xs = torch.arange(cfg.width, dtype=torch.float32)[None, :]
    for s, clip in zip(scenes, clips):
        mass = clip.sum(0)  # (F, H, W)
        # nothing touches the border
        assert mass[:, 0].sum() == 0 and mass[:, -1].sum() == 0 and mass[:, :, 0].sum() == 0 and mass[:, :, -1].sum() == 0
        cy = (mass * ys).sum((1, 2)) / mass.sum((1, 2))
        cx = (mass * xs).sum((1, 2)) / mass.sum((1, 2))
        d = {"left": -(cx[-1] - cx[0]), "right": cx[-1] - cx[0], "up": -(cy[-1] - cy[0]), "down": cy[-1] - cy[0]}[s.direction]
        assert d > 5.0, s


def test_colour_is_the_named_colour():
    v = render_prompt("a blue square moving up", seed=0)
    obj = v.sum(0) > 1.0
    mean = v[:, obj].mean(1)
    assert mean[2] > 0.8 and mean[0] < 0.3


def test_batches_and_dataset_are_seeded():
    a = random_batch(4, torch.Generator().manual_seed(1))
    b = random_batch(4, torch.Generator().manual_seed(1))
    assert torch.equal(a.videos, b.videos) and a.prompts == b.prompts
    ds = WorldDataset([Scene("red", "cross", "down")], per_scene=3, seed=2)
    clip, prompt = ds[1]
    assert len(ds) == 3 and clip.shape == (3, 8, 32, 32) and prompt == "a red cross moving down"
