"""CLIP metrics for videos of any model, from a local CLIP checkpoint (no oracle, no network).

* clip_text_video_score: prompt adherence, the video analogue of CLIPScore: per frame
  100 * max(cos(image embedding, text embedding), 0), averaged over the frames of the video (0..100).
* clip_frechet_distance: distribution distance between two sets of videos (e.g. quantized vs FP), the
  Frechet distance between Gaussians fitted to their per-frame CLIP image embeddings (every frame is a
  sample; embeddings unit-normalised, the same vectors the text score uses).

Frames are prepared the way the checkpoint's CLIP image processor prepares images, in torch on the
model's device (no PIL round trip): resize with its size rule (shortest edge -> N keeping the aspect ratio,
or a fixed height x width) and its resample filter (bicubic by default, antialiased, as transformers'
torchvision backend and torchvision.transforms.functional.resize do), centre crop to crop_size (zero
padding if the frame is smaller, as the processor does), then (x - image_mean) / image_std. The processor's
rescale step (uint8 / 255) is already done: videos are floats in [0, 1].

transformers is imported on the first load_clip call, so ``import workbench.metrics`` stays fast.
"""
from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as Fn

from workbench.metrics._checks import check_videos
from workbench.metrics.frechet import frechet_distance

CLIP_SCORE_SCALE = 100.0  # CLIPScore's weight (torchmetrics convention): 100 * max(cos, 0)
DEFAULT_BATCH_FRAMES = 32  # frames per CLIP forward

# PIL resample codes (what image processor configs store) -> torch interpolate modes. LANCZOS (1), BOX (4)
# and HAMMING (5) have no torch mode and use antialiased bicubic, as transformers' torchvision backend does.
_RESAMPLE_MODES = {0: "nearest", 2: "bilinear", 3: "bicubic"}

_FIX_SAVE = (
    "save a CLIP model with its processor into one directory, e.g. "
    "`CLIPModel.from_pretrained(SRC).save_pretrained(DIR); CLIPProcessor.from_pretrained(SRC).save_pretrained(DIR)` "
    "(SRC: a downloaded openai/clip-vit-base-patch32 or similar)"
)


@dataclass(frozen=True)
class ClipPreprocess:
    """The checkpoint's image-processor settings, applied to float frames in [0, 1] with torch ops."""

    do_resize: bool
    shortest_edge: int | None  # resize the shorter side to this, keeping the aspect ratio ...
    longest_edge: int | None  # ... but the longer side to at most this (when set with shortest_edge)
    height: int | None  # ... or resize to exactly height x width
    width: int | None
    mode: str  # torch interpolate mode
    do_center_crop: bool
    crop_height: int | None
    crop_width: int | None
    do_normalize: bool
    image_mean: tuple[float, float, float]
    image_std: tuple[float, float, float]

    @classmethod
    def from_image_processor(cls, proc: Any) -> ClipPreprocess:
        """Read the settings from a transformers image processor (CLIPImageProcessor or its PIL twin)."""
        size = proc.size if getattr(proc, "do_resize", True) else {}
        crop = getattr(proc, "crop_size", None) or {}
        mean = tuple(float(m) for m in _triple(proc.image_mean))
        std = tuple(float(s) for s in _triple(proc.image_std))
        pre = cls(
            do_resize=bool(getattr(proc, "do_resize", True)),
            shortest_edge=size.get("shortest_edge"), longest_edge=size.get("longest_edge"),
            height=size.get("height"), width=size.get("width"),
            mode=_resample_mode(getattr(proc, "resample", None)),
            do_center_crop=bool(getattr(proc, "do_center_crop", False)),
            crop_height=crop.get("height"), crop_width=crop.get("width"),
            do_normalize=bool(getattr(proc, "do_normalize", True)),
            image_mean=mean, image_std=std,  # type: ignore[arg-type]
        )
        if pre.do_resize and pre.shortest_edge is None and (pre.height is None or pre.width is None):
            raise ValueError(f"unsupported CLIP image processor size {dict(size)!r}: expected shortest_edge or height and width")
        if pre.do_center_crop and (pre.crop_height is None or pre.crop_width is None):
            raise ValueError(f"unsupported CLIP image processor crop_size {dict(crop)!r}: expected height and width")
        return pre

    def output_size(self, height: int, width: int) -> tuple[int, int]:
        """(height, width) after the resize, by transformers' rules (get_resize_output_image_size, or
        get_size_with_aspect_ratio when longest_edge is set), int() truncation included."""
        h, w = height, width
        if not self.do_resize:
            return h, w
        if self.shortest_edge is None:
            return int(self.height), int(self.width)  # type: ignore[arg-type]
        size = self.shortest_edge
        if self.longest_edge is not None:
            raw = None
            lo, hi = float(min(h, w)), float(max(h, w))
            if hi / lo * size > self.longest_edge:
                raw = self.longest_edge * lo / hi
                size = int(round(raw))
            if (h <= w and h == size) or (w <= h and w == size):
                return h, w
            s = raw if raw is not None else size
            return (int(s * h / w), size) if w < h else (size, int(s * w / h))
        short, long = (w, h) if w <= h else (h, w)
        new_long = int(size * long / short)
        return (new_long, size) if w <= h else (size, new_long)

    def __call__(self, frames: torch.Tensor) -> torch.Tensor:
        """Pixel values (N, 3, h, w) for CLIP from frames (N, 3, H, W) in [0, 1]."""
        x = frames.float()
        out = self.output_size(x.shape[-2], x.shape[-1])
        if out != tuple(x.shape[-2:]):
            kw = {"antialias": True, "align_corners": False} if self.mode in ("bilinear", "bicubic") else {}
            x = Fn.interpolate(x, size=out, mode=self.mode, **kw)
        if self.do_center_crop:
            x = _center_crop(x, int(self.crop_height), int(self.crop_width))  # type: ignore[arg-type]
        if self.do_normalize:
            mean = torch.tensor(self.image_mean, device=x.device).view(1, 3, 1, 1)
            std = torch.tensor(self.image_std, device=x.device).view(1, 3, 1, 1)
            x = (x - mean) / std
        return x


def _resample_mode(resample: Any) -> str:
    """Torch interpolate mode for a PIL resample code (None -> bicubic, CLIP's default)."""
    return "bicubic" if resample is None else _RESAMPLE_MODES.get(int(resample), "bicubic")


def _triple(v: Any) -> list[float]:
    v = [v] * 3 if isinstance(v, (int, float)) else list(v)
    if len(v) != 3:
        raise ValueError(f"CLIP image_mean / image_std must have 3 values (RGB), got {v!r}")
    return v


def _center_crop(x: torch.Tensor, ch: int, cw: int) -> torch.Tensor:
    """Centre crop as transformers' image processors do: zero-pad first when the frame is smaller."""
    h, w = x.shape[-2:]
    if ch > h or cw > w:
        pl, pt = max(cw - w, 0) // 2, max(ch - h, 0) // 2
        pr, pb = (max(cw - w, 0) + 1) // 2, (max(ch - h, 0) + 1) // 2
        x = Fn.pad(x, (pl, pr, pt, pb), value=0.0)
        h, w = x.shape[-2:]
    top, left = int((h - ch) / 2.0), int((w - cw) / 2.0)
    return x[..., top : top + ch, left : left + cw]


@dataclass
class LoadedClip:
    """A loaded CLIP checkpoint: the model (eval mode, no grad), its tokenizer and image preprocessing."""

    model: Any  # transformers.CLIPModel
    tokenizer: Any  # the checkpoint's tokenizer
    preprocess: ClipPreprocess
    device: torch.device
    path: Path
    batch_frames: int = DEFAULT_BATCH_FRAMES

    @property
    def max_text_tokens(self) -> int:
        """Longest tokenized prompt the text encoder takes (longer prompts are truncated, as CLIPScore does)."""
        return int(self.model.config.text_config.max_position_embeddings)

    @torch.inference_mode()
    def text_embeddings(self, prompts: Sequence[str]) -> torch.Tensor:
        """Unit-norm CLIP text embeddings (P, D) on the CPU, float32."""
        tok = self.tokenizer(list(prompts), padding=True, truncation=True, max_length=self.max_text_tokens,
                             return_tensors="pt")
        out = self.model.text_model(input_ids=tok["input_ids"].to(self.device),
                                    attention_mask=tok["attention_mask"].to(self.device))
        emb = self.model.text_projection(out.pooler_output)
        return Fn.normalize(emb.float(), dim=-1).cpu()

    @torch.inference_mode()
    def frame_embeddings(self, videos: torch.Tensor) -> torch.Tensor:
        """Unit-norm CLIP image embeddings (B, F, D) on the CPU of every frame of checked videos (B, 3, F, H, W).

        Frames go through the model batch_frames at a time; only one batch of frames is copied at once.
        """
        B, _, F = videos.shape[:3]
        dtype = next(self.model.parameters()).dtype
        index = [(b, f) for b in range(B) for f in range(F)]
        chunks = []
        for i in range(0, len(index), self.batch_frames):
            frames = torch.stack([videos[b, :, f] for b, f in index[i : i + self.batch_frames]])
            px = self.preprocess(frames.to(self.device))
            out = self.model.vision_model(pixel_values=px.to(dtype))
            chunks.append(Fn.normalize(self.model.visual_projection(out.pooler_output).float(), dim=-1).cpu())
        return torch.cat(chunks).reshape(B, F, -1)


def _read_json(file: Path) -> dict:
    """A JSON object from `file`; ValueError naming the file when it is not one."""
    try:
        data = json.loads(file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{file} is not a readable JSON file ({e}); {_FIX_SAVE}") from e
    if not isinstance(data, dict):
        raise ValueError(f"{file} does not hold a JSON object; {_FIX_SAVE}")
    return data


def _check_clip_dir(path: Path) -> None:
    """Raise ValueError naming the fix when `path` is not a complete local CLIP checkpoint."""
    if not path.is_dir():
        raise ValueError(f"CLIP checkpoint {str(path)!r} is not a directory; pass a local directory (nothing is "
                         f"downloaded): {_FIX_SAVE}")
    config = path / "config.json"
    if not config.is_file():
        raise ValueError(f"{str(path)!r} has no config.json, so it is not a saved transformers model; {_FIX_SAVE}")
    model_type = _read_json(config).get("model_type")
    if model_type != "clip":
        raise ValueError(f"{str(path)!r} is not a CLIP model (config.json model_type is {model_type!r}, expected "
                         f"'clip'); pass the directory of a transformers CLIPModel: {_FIX_SAVE}")
    if not ((path / "tokenizer.json").is_file() or ((path / "vocab.json").is_file() and (path / "merges.txt").is_file())):
        raise ValueError(f"{str(path)!r} has no tokenizer (tokenizer.json, or vocab.json + merges.txt); save the "
                         "checkpoint's tokenizer next to the model: `CLIPProcessor.from_pretrained(SRC).save_pretrained(DIR)`")
    has_processor = (path / "preprocessor_config.json").is_file()
    if not has_processor and (path / "processor_config.json").is_file():
        has_processor = "image_processor" in _read_json(path / "processor_config.json")
    if not has_processor:
        raise ValueError(f"{str(path)!r} has no image processor config (preprocessor_config.json, or processor_config.json "
                         "with an image_processor entry); save the checkpoint's processor next to the model: "
                         "`CLIPProcessor.from_pretrained(SRC).save_pretrained(DIR)`")


def load_clip(path: str | Path, device: str | torch.device = "cpu", batch_frames: int = DEFAULT_BATCH_FRAMES) -> LoadedClip:
    """Load a CLIP checkpoint saved with save_pretrained (model + tokenizer + image processor) from local files only.

    Raises ValueError naming the fix when the directory is missing, is not a CLIP model, or lacks its
    tokenizer or image processor config. The model runs in eval mode in its saved dtype on `device`.
    """
    path = Path(path)
    if not isinstance(batch_frames, int) or batch_frames < 1:
        raise ValueError(f"batch_frames must be a positive int (frames per CLIP forward), got {batch_frames!r}")
    _check_clip_dir(path)
    device = torch.device(device)
    from workbench.models.loading import hub_offline

    with hub_offline():
        from transformers import AutoImageProcessor, AutoTokenizer, CLIPModel

        try:
            tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
            image_processor = AutoImageProcessor.from_pretrained(path, local_files_only=True)
            model = CLIPModel.from_pretrained(path, local_files_only=True)
        except (OSError, ValueError) as e:
            raise ValueError(f"could not load the CLIP checkpoint in {str(path)!r}: {e}; {_FIX_SAVE}") from e
    model = model.to(device).eval().requires_grad_(False)
    return LoadedClip(model=model, tokenizer=tokenizer, preprocess=ClipPreprocess.from_image_processor(image_processor),
                     device=device, path=path, batch_frames=batch_frames)


def _check_clip(clip: Any) -> LoadedClip:
    if not isinstance(clip, LoadedClip):
        raise ValueError(f"clip must be a LoadedClip from workbench.metrics.load_clip(DIR), got {type(clip).__name__}")
    return clip


def _check_prompts(prompts: Sequence[str] | str, n_videos: int) -> list[str]:
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    if not all(isinstance(p, str) for p in prompts):
        raise ValueError("prompts must be a list of strings, one per video")
    if len(prompts) != n_videos:
        raise ValueError(f"got {n_videos} videos but {len(prompts)} prompts; pass one prompt per video "
                         "(the prompt each video was generated from), in the same order")
    return prompts


def clip_similarity(videos: torch.Tensor, prompts: Sequence[str] | str, clip: LoadedClip) -> torch.Tensor:
    """Raw cosine similarity (B, F) between each frame's CLIP image embedding and its video's prompt embedding."""
    clip = _check_clip(clip)
    v = check_videos(videos)
    prompts = _check_prompts(prompts, v.shape[0])
    return _cosines(clip.frame_embeddings(v), clip.text_embeddings(prompts))


def _cosines(frame_emb: torch.Tensor, text_emb: torch.Tensor) -> torch.Tensor:
    """(B, F) cosines of unit frame embeddings (B, F, D) with unit text embeddings (B, D)."""
    return torch.einsum("bfd,bd->bf", frame_emb, text_emb)


def _score(cos: torch.Tensor) -> torch.Tensor:
    """(B,) text-video scores from (B, F) cosines: mean over frames of 100 * max(cos, 0)."""
    return (CLIP_SCORE_SCALE * cos.clamp(min=0.0)).mean(dim=1)


def clip_text_video_score(videos: torch.Tensor, prompts: Sequence[str] | str, clip: LoadedClip) -> torch.Tensor:
    """CLIP text-video score per video, (B,) or 0-d for one (3, F, H, W) clip: mean over frames of 100 * max(cos, 0).

    Higher = frames closer to the prompt in CLIP space; compare models on the same prompts and checkpoint.
    """
    batched = isinstance(videos, torch.Tensor) and videos.dim() == 5
    out = _score(clip_similarity(videos, prompts, clip))
    return out if batched else out[0]


def clip_frame_features(videos: torch.Tensor, clip: LoadedClip) -> torch.Tensor:
    """Unit-norm CLIP image embeddings of every frame of a batch, one row per frame: (B * F, D)."""
    v = check_videos(videos)
    return _check_clip(clip).frame_embeddings(v).flatten(0, 1)


def clip_frechet_distance(videos_a: torch.Tensor, videos_b: torch.Tensor, clip: LoadedClip) -> float:
    """Frechet distance between the per-frame CLIP image embeddings of two sets of videos (frames as samples).

    ~0 for identical sets, grows as the frames' content drifts; the sets may differ in size and resolution.
    Uses workbench.metrics.frechet.frechet_distance (eps * I regularised covariances).
    """
    return frechet_distance(clip_frame_features(videos_a, clip), clip_frame_features(videos_b, clip))


def clip_metrics(
    videos: torch.Tensor, clip: LoadedClip, prompts: Sequence[str] | str | None = None, reference: torch.Tensor | None = None,
) -> dict[str, float]:
    """The CLIP keys of evaluate_videos, embedding each frame once: clip_score (mean of clip_text_video_score)
    when prompts are given, clip_fd_vs_fp (clip_frechet_distance vs the reference set) when a reference is."""
    clip = _check_clip(clip)
    v = check_videos(videos)
    if prompts is None and reference is None:
        raise ValueError("CLIP metrics need prompts (for clip_score) or a reference (for clip_fd_vs_fp); pass prompts=[...] "
                         "and/or reference=fp_videos")
    emb = clip.frame_embeddings(v)
    out: dict[str, float] = {}
    if prompts is not None:
        out["clip_score"] = float(_score(_cosines(emb, clip.text_embeddings(_check_prompts(prompts, v.shape[0])))).mean())
    if reference is not None:
        out["clip_fd_vs_fp"] = frechet_distance(emb.flatten(0, 1), clip_frame_features(reference, clip))
    return out
