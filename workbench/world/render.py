"""Deterministic renderer: Scene + start position -> RGB clip, batched in torch (CPU or GPU).

Clips are float tensors in [0, 1] laid out (B, C=3, F, H, W), the layout diffusers video
transformers take. Shapes are anti-aliased by supersampling so that edges are smooth and the
oracle can read them back exactly.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from workbench.world.grammar import COLORS, DIRECTIONS, SHAPES, SPEEDS, Scene


@dataclass(frozen=True)
class WorldConfig:
    """Geometry of the world; the bundled model is trained on the defaults."""

    frames: int = 8
    height: int = 32
    width: int = 32
    radius: float = 5.0  # half the object's extent in pixels
    supersample: int = 4
    margin: float = 1.0  # pixels kept free between the object and the frame edge

    def travel(self, speed: str) -> float:
        """Pixels the object moves from the first frame to the last."""
        return SPEEDS[speed] * (self.frames - 1)


def shape_coverage(shape: str, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """1 inside the shape, 0 outside, on coordinates normalised by the radius (u right, v down)."""
    if shape == "circle":
        inside = u * u + v * v <= 1.0
    elif shape == "square":
        inside = torch.maximum(u.abs(), v.abs()) <= 0.85
    elif shape == "triangle":  # apex up
        inside = (v <= 0.85) & (u.abs() <= 0.95 * (v + 0.95) / 1.8)
    elif shape == "cross":
        inside = ((u.abs() <= 0.33) & (v.abs() <= 0.95)) | ((v.abs() <= 0.33) & (u.abs() <= 0.95))
    else:
        raise ValueError(f"unknown shape {shape!r}; known: {', '.join(SHAPES)}")
    return inside.to(u.dtype)


def trajectory(scene: Scene, start: torch.Tensor, cfg: WorldConfig) -> torch.Tensor:
    """Object centre (y, x) for every frame, shape (F, 2), from its start centre."""
    dy, dx = DIRECTIONS[scene.direction]
    step = SPEEDS[scene.speed] * torch.tensor([dy, dx], dtype=torch.float32, device=start.device)
    f = torch.arange(cfg.frames, dtype=torch.float32, device=start.device)[:, None]
    return start.float()[None, :] + f * step[None, :]


def start_bounds(scene: Scene, cfg: WorldConfig) -> tuple[tuple[float, float], tuple[float, float]]:
    """((y_lo, y_hi), (x_lo, x_hi)) for start centres whose whole trajectory stays inside the frame."""
    dy, dx = DIRECTIONS[scene.direction]
    t = cfg.travel(scene.speed)
    lo_y, hi_y = cfg.radius + cfg.margin, cfg.height - cfg.radius - cfg.margin
    lo_x, hi_x = cfg.radius + cfg.margin, cfg.width - cfg.radius - cfg.margin
    if dy < 0:
        lo_y += t
    elif dy > 0:
        hi_y -= t
    if dx < 0:
        lo_x += t
    elif dx > 0:
        hi_x -= t
    if lo_y > hi_y or lo_x > hi_x:
        raise ValueError(f"{scene.prompt!r} cannot fit in a {cfg.height}x{cfg.width} frame over {cfg.frames} frames")
    return (lo_y, hi_y), (lo_x, hi_x)


def sample_starts(scenes: list[Scene], generator: torch.Generator, cfg: WorldConfig = WorldConfig()) -> torch.Tensor:
    """Uniform random start centres (B, 2) that keep every trajectory inside the frame."""
    r = torch.rand(len(scenes), 2, generator=generator)
    out = torch.empty(len(scenes), 2)
    for i, s in enumerate(scenes):
        (y0, y1), (x0, x1) = start_bounds(s, cfg)
        out[i, 0] = y0 + r[i, 0] * (y1 - y0)
        out[i, 1] = x0 + r[i, 1] * (x1 - x0)
    return out


def render(scenes: list[Scene], starts: torch.Tensor, cfg: WorldConfig = WorldConfig(), device: str | torch.device = "cpu") -> torch.Tensor:
    """Render clips (B, 3, F, H, W) in [0, 1]: each scene's object on a black background (one batched pass)."""
    if starts.shape != (len(scenes), 2):
        raise ValueError(f"starts must have shape ({len(scenes)}, 2), got {tuple(starts.shape)}")
    ss = cfg.supersample
    sub = (torch.arange(ss, device=device, dtype=torch.float32) + 0.5) / ss
    ys = (torch.arange(cfg.height, device=device, dtype=torch.float32)[:, None] + sub[None, :]).reshape(-1)
    xs = (torch.arange(cfg.width, device=device, dtype=torch.float32)[:, None] + sub[None, :]).reshape(-1)
    step = torch.tensor(
        [[DIRECTIONS[s.direction][0] * SPEEDS[s.speed], DIRECTIONS[s.direction][1] * SPEEDS[s.speed]] for s in scenes],
        dtype=torch.float32,
        device=device,
    )  # (B, 2)
    f = torch.arange(cfg.frames, dtype=torch.float32, device=device)
    centres = starts.to(device).float()[:, None, :] + f[None, :, None] * step[:, None, :]  # (B, F, 2)
    v = (ys[None, None, :, None] - centres[..., 0, None, None]) / cfg.radius  # (B, F, H*ss, 1)
    u = (xs[None, None, None, :] - centres[..., 1, None, None]) / cfg.radius  # (B, F, 1, W*ss)
    u, v = torch.broadcast_tensors(u, v)
    shape_idx = torch.tensor([SHAPES.index(s.shape) for s in scenes], device=device)
    cov = torch.zeros_like(u)
    for k, name in enumerate(SHAPES):
        sel = shape_idx == k
        if sel.any():
            cov[sel] = shape_coverage(name, u[sel], v[sel])
    b = len(scenes)
    alpha = cov.reshape(b, cfg.frames, cfg.height, ss, cfg.width, ss).mean(dim=(3, 5))  # (B, F, H, W)
    color = torch.tensor([COLORS[s.color] for s in scenes], device=device)  # (B, 3)
    return color[:, :, None, None, None] * alpha[:, None]


def render_prompt(prompt: str, seed: int = 0, cfg: WorldConfig = WorldConfig()) -> torch.Tensor:
    """Ground-truth clip (3, F, H, W) for a prompt, start position drawn from the seed."""
    from workbench.world.grammar import parse_prompt

    scene = parse_prompt(prompt)
    g = torch.Generator().manual_seed(seed)
    return render([scene], sample_starts([scene], g, cfg), cfg)[0]
