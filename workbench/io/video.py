"""Write clips as mp4 or gif (and embeddable data URIs for the HTML report)."""
from __future__ import annotations

import base64
import io
from pathlib import Path

import numpy as np
import torch

from workbench.metrics._checks import check_video


def default_fps(video: torch.Tensor) -> int:
    """Frames per second to show a clip at: 4 for the world's 8 frames, about 8 and 13 for 49 and 81 frames."""
    return max(4, round(video.shape[-3] / 6))


VISIBLE_PX = 128  # small clips are upscaled until their longer side reaches this


def to_frames(video: torch.Tensor, scale: int | None = None) -> np.ndarray:
    """(3, F, H, W) in [0, 1] -> uint8 (F, H*scale, W*scale, 3), nearest-neighbour upscaled to be visible
    (scale None: 4 for the 32x32 world, 1 for real videos)."""
    v = check_video(video.detach().float().cpu())
    if scale is None:
        scale = max(1, VISIBLE_PX // max(v.shape[-2:]))
    frames = (v.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 3, 0).numpy()
    if scale > 1:
        frames = frames.repeat(scale, axis=1).repeat(scale, axis=2)
    return frames


VIDEO_SUFFIXES = (".mp4", ".webm", ".gif")


def check_video_path(path: str | Path, overwrite: bool = False) -> Path:
    """`path` as a Path if a clip can be written there (known extension, no file to overwrite unless asked,
    a writable folder); called before generating, so a bad --out costs nothing."""
    from workbench.io.outdir import check_writable

    p = Path(path)
    if p.suffix.lower() not in VIDEO_SUFFIXES:
        raise ValueError(f"unsupported video extension {p.suffix!r} for {p}; use .mp4, .webm or .gif")
    if p.is_dir():
        raise ValueError(f"{p} is a directory; give a file name ending in .mp4, .webm or .gif")
    if p.exists() and not overwrite:
        raise FileExistsError(f"{p} exists; choose another path or pass overwrite (CLI: --force)")
    check_writable(p.parent if str(p.parent) else Path("."))
    return p


def save_video(video: torch.Tensor, path: str | Path, fps: int | None = None, scale: int | None = None,
               overwrite: bool = False) -> Path:
    """Write a clip to .mp4, .webm (VP9, plays in any browser) or .gif; refuses to overwrite an existing file unless asked."""
    import imageio.v2 as imageio

    p = check_video_path(path, overwrite)
    p.parent.mkdir(parents=True, exist_ok=True)
    fps = default_fps(video) if fps is None else fps
    frames = to_frames(video, scale)
    if p.suffix.lower() == ".gif":
        imageio.mimsave(p, list(frames), duration=1000 / fps, loop=0)
    else:
        codec = "libvpx-vp9" if p.suffix.lower() == ".webm" else "libx264"
        with imageio.get_writer(p, fps=fps, codec=codec, quality=8, macro_block_size=1,
                                ffmpeg_log_level="error") as w:
            for f in frames:
                w.append_data(f)
    return p


def gif_data_uri(video: torch.Tensor, fps: int | None = None, scale: int | None = None) -> str:
    """A looping GIF of the clip as a data URI, so an HTML page carries its videos inside it (a real video
    is shown at every n-th pixel, so the page stays light)."""
    import imageio.v2 as imageio

    if video.shape[-1] > 2 * VISIBLE_PX:
        step = video.shape[-1] // (2 * VISIBLE_PX)
        video = video[..., ::step, ::step]
    fps = default_fps(video) if fps is None else fps
    buf = io.BytesIO()
    imageio.mimsave(buf, list(to_frames(video, scale)), format="GIF", duration=1000 / fps, loop=0)
    return "data:image/gif;base64," + base64.b64encode(buf.getvalue()).decode()
