"""Oracle: read a clip's colour, shape, direction and speed back from its pixels, and score prompt adherence.

This is the project's "did the model draw what the prompt asked for" metric. Every reading starts from
`segment` (robust per-frame object masks, see segment.py), then:

* colour    = palette colour (grammar.COLORS) whose hue is nearest the mean object colour's hue
              (hue survives dimming, blur and mixing with a black background);
* shape     = the shape whose template, rendered with render.shape_coverage at the object's centroid,
              has the highest soft IoU with the object's coverage map, averaged over frames (each shape
              is tried at the world radius and at the scale whose area matches the object's, sharp and
              3x3-blurred, best kept);
* direction = dominant axis and sign of the centroid velocity (least-squares line over frames);
* speed     = |velocity| along that axis, "slow" below the midpoint of the two speeds, else "fast".

A clip with fewer than two frames holding an object reads `found=False` with every attribute None,
which the scores count as wrong.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import lru_cache

import torch

from workbench.metrics._checks import check_videos
from workbench.metrics.segment import Segmentation, segment, segment_batch
from workbench.world.grammar import ATTRIBUTES, COLORS, DIRECTIONS, SHAPES, SPEEDS, Scene
from workbench.world.render import WorldConfig, shape_coverage

_SUPERSAMPLE = 4
_SCALE_RANGE = (0.6, 1.6)
_SCALES = torch.linspace(_SCALE_RANGE[0], _SCALE_RANGE[1], 21)  # template scales tried, steps of 0.05
_PHASES = 8  # sub-pixel centroid positions per pixel in the template bank


@dataclass
class OracleReading:
    """What the oracle reads from one clip; attributes are None when no object was found."""

    color: str | None
    shape: str | None
    direction: str | None
    speed: str | None
    found: bool
    confidence: float  # fraction of frames with an object x best mean shape IoU, in [0, 1]
    centroid: torch.Tensor  # (F, 2) (y, x) pixels, NaN in frames without an object
    area: torch.Tensor  # (F,) soft object area in pixels
    object_color: torch.Tensor  # (F, 3) mean object colour (background subtracted), NaN without an object
    velocity: torch.Tensor  # (2,) (dy, dx) pixels per frame from a straight-line fit, zeros if not found
    shape_scores: dict[str, float] = field(default_factory=dict)  # mean soft IoU per shape over found frames
    segmentation: Segmentation | None = field(default=None, repr=False)

    def as_dict(self) -> dict[str, str | None]:
        """The four attributes, keyed like Scene.as_dict()."""
        return {"color": self.color, "shape": self.shape, "direction": self.direction, "speed": self.speed}


@dataclass
class OracleScores:
    """Per-video correctness of each attribute, and the summary accuracies over a set of videos."""

    correct: dict[str, torch.Tensor]  # attribute -> (B,) bool
    readings: list[OracleReading]
    oracle_accuracy: float  # mean over videos and the four attributes
    exact_match: float  # fraction of videos with all four attributes right
    per_attribute: dict[str, float]  # attribute -> accuracy


def _hue(rgb: torch.Tensor) -> float:
    """Hue in degrees [0, 360) of one RGB triple (standard HSV hue)."""
    r, g, b = (float(c) for c in rgb)
    mx, mn = max(r, g, b), min(r, g, b)
    d = mx - mn
    if d <= 0:
        return 0.0
    if mx == r:
        h = ((g - b) / d) % 6.0
    elif mx == g:
        h = (b - r) / d + 2.0
    else:
        h = (r - g) / d + 4.0
    return 60.0 * h


_PALETTE_HUES = {name: _hue(torch.tensor(rgb)) for name, rgb in COLORS.items()}


def nearest_color(rgb: torch.Tensor) -> str:
    """Palette colour whose hue is nearest (circular distance) to this RGB triple's hue."""
    h = _hue(rgb)
    return min(_PALETTE_HUES, key=lambda n: min(abs(h - _PALETTE_HUES[n]), 360.0 - abs(h - _PALETTE_HUES[n])))


@lru_cache(maxsize=None)
def _shape_geometry(shape: str) -> tuple[float, float, float]:
    """(centroid dy, centroid dx, area) of a shape in radius units, from a fine grid."""
    n = 801
    t = torch.linspace(-1.2, 1.2, n)
    v, u = torch.meshgrid(t, t, indexing="ij")
    cov = shape_coverage(shape, u, v)
    a = cov.sum()
    cell = (t[1] - t[0]) ** 2
    return float((cov * v).sum() / a), float((cov * u).sum() / a), float(a * cell)


def shape_templates(
    shape: str, centroid: torch.Tensor, radius: torch.Tensor, height: int, width: int,
    origin: torch.Tensor | None = None,
) -> torch.Tensor:
    """Anti-aliased coverage (F, height, width) of `shape` with its area centroid at `centroid` (F, 2), radius (F,).

    `origin` (F, 2) is the frame position of the window's top-left pixel (default 0: the whole frame),
    so a small window around the object can be rendered instead of the whole frame.
    """
    oy, ox, _ = _shape_geometry(shape)
    ss = _SUPERSAMPLE
    sub = (torch.arange(ss, dtype=torch.float32) + 0.5) / ss
    ys = (torch.arange(height, dtype=torch.float32)[:, None] + sub[None, :]).reshape(-1)
    xs = (torch.arange(width, dtype=torch.float32)[:, None] + sub[None, :]).reshape(-1)
    if origin is None:
        origin = torch.zeros(centroid.shape[0], 2)
    r = radius[:, None, None]
    cy = centroid[:, 0, None, None] - oy * r - origin[:, 0, None, None]
    cx = centroid[:, 1, None, None] - ox * r - origin[:, 1, None, None]
    v = (ys[None, :, None] - cy) / r
    u = (xs[None, None, :] - cx) / r
    cov = shape_coverage(shape, u.expand(-1, v.shape[1], -1), v.expand(-1, -1, u.shape[2]))
    return torch.nn.functional.avg_pool2d(cov[:, None], ss)[:, 0]


def _box3(t: torch.Tensor) -> torch.Tensor:
    """3x3 box blur of (N, H, W) maps, zero padded: a template as a blurry generator would draw it."""
    return torch.nn.functional.avg_pool2d(t[:, None], 3, stride=1, padding=1, count_include_pad=True)[:, 0]


@lru_cache(maxsize=None)
def _template_bank(shape: str, radius: float, size: int) -> torch.Tensor:
    """Precomputed templates (2 sharp/blurred, n_scales, Q, Q, size, size) of a shape, centroid at window
    pixel (size/2 + qy/Q, size/2 + qx/Q) for each sub-pixel phase (qy, qx) and each scale of _SCALES."""
    q = _PHASES
    phase = torch.arange(q, dtype=torch.float32) / q
    py, px = torch.meshgrid(phase, phase, indexing="ij")
    cen = torch.stack([py.reshape(-1), px.reshape(-1)], dim=1) + size // 2  # (Q*Q, 2)
    out = []
    for scale in _SCALES:
        rad = torch.full((q * q,), float(scale) * radius)
        out.append(shape_templates(shape, cen, rad, size, size))
    sharp = torch.stack(out).reshape(len(_SCALES), q, q, size, size)
    blurred = _box3(sharp.reshape(-1, size, size)).reshape(sharp.shape)
    return torch.stack([sharp, blurred])


def _frame_shape_iou(alpha: torch.Tensor, cen: torch.Tensor, area: torch.Tensor, cfg: WorldConfig) -> torch.Tensor:
    """Best soft IoU (N, n_shapes) of each shape's template with each frame's coverage map (N, H, W).

    Each shape is tried at the world radius and at the area-matched scale, each sharp and 3x3-box
    blurred (generated video is often soft), and the best kept. Templates come from a precomputed bank
    (scales in steps of 0.05, centroid phase in steps of 1/8 px) in a window around the centroid that
    holds every tried template; the IoU still counts coverage outside the window (as unmatched), so a
    sprawling blob scores low.
    """
    n = alpha.shape[0]
    half = math.ceil(1.35 * _SCALE_RANGE[1] * cfg.radius) + 1
    size = 2 * half
    cq = (cen * _PHASES).round() / _PHASES
    base = cq.floor()
    phase = ((cq - base) * _PHASES).round().long().clamp(0, _PHASES - 1)  # (n, 2)
    origin = base.long() - half  # (n, 2) integer frame position of each window's top-left pixel
    padded = torch.nn.functional.pad(alpha, (size, size, size, size))
    steps = torch.arange(size)
    rows = (origin[:, 0] + size)[:, None] + steps[None, :]
    cols = (origin[:, 1] + size)[:, None] + steps[None, :]
    window = padded[torch.arange(n)[:, None, None], rows[:, :, None], cols[:, None, :]]  # (n, size, size)
    outside = alpha.sum(dim=(1, 2)) - window.sum(dim=(1, 2))
    step = float(_SCALES[1] - _SCALES[0])
    unit = torch.full((n,), int(round((1.0 - _SCALE_RANGE[0]) / step)), dtype=torch.long)
    out = torch.zeros(n, len(SHAPES))
    for j, s in enumerate(SHAPES):
        bank = _template_bank(s, float(cfg.radius), size)
        unit_area = _shape_geometry(s)[2]
        matched = ((area / (unit_area * cfg.radius**2)).sqrt() - _SCALE_RANGE[0]) / step
        matched = matched.round().long().clamp(0, len(_SCALES) - 1)
        for k in (unit, matched):
            for blur in (0, 1):
                t = bank[blur, k, phase[:, 0], phase[:, 1]]  # (n, size, size)
                inter = torch.minimum(window, t).sum(dim=(1, 2))
                union = torch.maximum(window, t).sum(dim=(1, 2)) + outside
                out[:, j] = torch.maximum(out[:, j], inter / union.clamp(min=1e-6))
    return out


def _shape_scores(segs: list[Segmentation], cfg: WorldConfig, chunk: int = 1024) -> list[dict[str, float]]:
    """Per clip, the mean over its object frames of each shape's best soft IoU (all clips' frames batched)."""
    if not segs:
        return []
    alpha = torch.cat([g.alpha[g.found] for g in segs])
    cen = torch.cat([g.centroid[g.found] for g in segs])
    area = torch.cat([g.area[g.found] for g in segs])
    iou = torch.cat([_frame_shape_iou(alpha[i:i + chunk], cen[i:i + chunk], area[i:i + chunk], cfg)
                     for i in range(0, alpha.shape[0], chunk)]) if alpha.shape[0] else torch.zeros(0, len(SHAPES))
    out, i = [], 0
    for g in segs:
        k = int(g.found.sum())
        mean = iou[i:i + k].mean(dim=0) if k else torch.zeros(len(SHAPES))
        out.append({s: float(mean[j]) for j, s in enumerate(SHAPES)})
        i += k
    return out


def _fit_velocity(centroid: torch.Tensor, found: torch.Tensor) -> torch.Tensor:
    """Least-squares (dy, dx) per frame of the centroid track over the frames that hold an object."""
    t = found.nonzero().flatten().float()
    c = centroid[found]
    tc = t - t.mean()
    return (tc[:, None] * (c - c.mean(dim=0))).sum(dim=0) / (tc * tc).sum()


def read_segmentations(segs: list[Segmentation], cfg: WorldConfig = WorldConfig()) -> list[OracleReading]:
    """Oracle readings from existing segmentations (lets other metrics reuse one segmentation)."""
    segs_found = [g if int(g.found.sum()) >= 2 else None for g in segs]
    scores = iter(_shape_scores([g for g in segs_found if g is not None], cfg))
    return [_read(g, next(scores), cfg) if g is not None else _not_found(seg) for g, seg in zip(segs_found, segs)]


def _not_found(seg: Segmentation) -> OracleReading:
    """The reading of a clip without an object: every attribute None (counted wrong)."""
    return OracleReading(None, None, None, None, False, 0.0, seg.centroid, seg.area, seg.color,
                         torch.zeros(2), {s: 0.0 for s in SHAPES}, seg)


def _read(seg: Segmentation, scores: dict[str, float], cfg: WorldConfig) -> OracleReading:
    """Attributes of a clip with an object in at least two frames, given its shape scores."""
    color = nearest_color(seg.color[seg.found].mean(dim=0))
    shape = max(scores, key=scores.get)
    vel = _fit_velocity(seg.centroid, seg.found)
    axis = int(vel.abs().argmax())
    sign = 1 if float(vel[axis]) >= 0 else -1
    step = (sign, 0) if axis == 0 else (0, sign)
    direction = next(d for d, v in DIRECTIONS.items() if v == step)
    slow, fast = SPEEDS["slow"], SPEEDS["fast"]
    speed = "slow" if abs(float(vel[axis])) < (slow + fast) / 2 else "fast"
    confidence = float(seg.found.float().mean()) * scores[shape]
    return OracleReading(color, shape, direction, speed, True, confidence, seg.centroid, seg.area, seg.color,
                         vel, scores, seg)


def read_video(video: torch.Tensor, cfg: WorldConfig = WorldConfig()) -> OracleReading:
    """Read colour, shape, direction and speed of the object in one clip (3, F, H, W) in [0, 1]."""
    return read_segmentations([segment(video)], cfg)[0]


def read_videos(videos: torch.Tensor, cfg: WorldConfig = WorldConfig()) -> list[OracleReading]:
    """Oracle readings for a batch (B, 3, F, H, W) (segmentation and template matching batched)."""
    return read_segmentations(segment_batch(videos), cfg)


def oracle_scores(videos: torch.Tensor, scenes: list[Scene], cfg: WorldConfig = WorldConfig()) -> OracleScores:
    """Score a batch (B, 3, F, H, W) against the scenes its prompts asked for; unfound objects count as wrong."""
    videos = check_videos(videos)
    if len(scenes) != videos.shape[0]:
        raise ValueError(f"got {videos.shape[0]} videos but {len(scenes)} scenes; need one scene per video")
    readings = read_videos(videos, cfg)
    return score_readings(readings, scenes)


def score_readings(readings: list[OracleReading], scenes: list[Scene]) -> OracleScores:
    """Compare oracle readings with the scenes asked for and summarise the accuracies."""
    correct = {
        a: torch.tensor([getattr(r, a) == getattr(s, a) for r, s in zip(readings, scenes)], dtype=torch.bool)
        for a in ATTRIBUTES
    }
    per_attribute = {a: float(c.float().mean()) for a, c in correct.items()}
    all_right = torch.stack([correct[a] for a in ATTRIBUTES]).all(dim=0)
    accuracy = float(torch.stack([correct[a].float() for a in ATTRIBUTES]).mean())
    return OracleScores(correct, readings, accuracy, float(all_right.float().mean()), per_attribute)


def oracle_accuracy(videos: torch.Tensor, scenes: list[Scene], cfg: WorldConfig = WorldConfig()) -> float:
    """Mean correctness over videos and the four attributes (1.0 = every attribute of every video right)."""
    return oracle_scores(videos, scenes, cfg).oracle_accuracy


__all__ = ["OracleReading", "OracleScores", "read_video", "read_videos", "read_segmentations", "oracle_scores",
           "oracle_accuracy", "score_readings", "nearest_color", "shape_templates"]
