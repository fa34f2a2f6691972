"""CLIP metrics on a tiny random CLIP checkpoint built offline: preprocessing as the CLIP processor does it,
scores equal to CLIPModel's own forward, Frechet distance ~0 for identical sets and growing with noise,
clear errors for incomplete checkpoints and mismatched prompts."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from clip_fixtures import IMAGE_SIZE, one_torch_thread, save_tiny_clip, tiny_clip_dir, tiny_clip_vocab  # noqa: F401
from metrics_helpers import add_noise

from workbench.metrics import (
    LoadedClip, clip_frame_features, clip_frechet_distance, clip_similarity, clip_text_video_score, load_clip,
)
from workbench.metrics.clip_scores import ClipPreprocess
from workbench.world import all_scenes, render, sample_starts

# OpenAI CLIP's normalisation, written out (the tiny checkpoint's image processor keeps the CLIP defaults)
MEAN, STD = [0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711]
CLIP_MEAN, CLIP_STD = torch.tensor(MEAN).view(1, 3, 1, 1), torch.tensor(STD).view(1, 3, 1, 1)
PROMPTS = ["a red circle moving left", "a blue square moving up", "a cat", "a photo of a dog",
           "a fast yellow triangle moving down", "a green cross"]


@pytest.fixture(scope="module")
def clip(tiny_clip_dir) -> LoadedClip:
    return load_clip(tiny_clip_dir)


@pytest.fixture(scope="module")
def world() -> tuple[list[str], torch.Tensor]:
    """Six rendered world clips (6, 3, 8, 32, 32) and their prompts."""
    scenes = all_scenes()[::32]
    return [s.prompt for s in scenes], render(scenes, sample_starts(scenes, torch.Generator().manual_seed(4)))


def _uint8_frames(n: int, h: int, w: int, seed: int = 0) -> torch.Tensor:
    """Smooth frames (n, 3, h, w) on the 8-bit grid (k / 255), so a PIL round trip is exact."""
    base = torch.rand(n, 3, 5, 5, generator=torch.Generator().manual_seed(seed))
    x = torch.nn.functional.interpolate(base, size=(h, w), mode="bilinear", align_corners=False)
    return (x * 255).round() / 255


def _processor_pixels(directory, frames: torch.Tensor) -> torch.Tensor:
    """pixel_values from the checkpoint's own image processor, fed 8-bit PIL images as usual."""
    from PIL import Image
    from transformers import AutoImageProcessor

    proc = AutoImageProcessor.from_pretrained(directory, local_files_only=True)
    images = [Image.fromarray((f.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)) for f in frames]
    return proc(images=images, return_tensors="pt")["pixel_values"]


def test_load_clip_reads_the_processor(clip, tiny_clip_dir):
    assert isinstance(clip, LoadedClip) and clip.path == tiny_clip_dir and not clip.model.training
    p = clip.preprocess
    assert (p.shortest_edge, p.crop_height, p.crop_width, p.mode) == (IMAGE_SIZE, IMAGE_SIZE, IMAGE_SIZE, "bicubic")
    assert all(not q.requires_grad for q in clip.model.parameters())


def test_offline_while_loading_and_restored_after(tiny_clip_dir, monkeypatch):
    import socket

    import huggingface_hub.constants as hub
    from transformers import AutoTokenizer

    seen = []

    def refuse(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args!r}")

    def spy(*args, **kwargs):
        seen.append((os.environ.get("HF_HUB_OFFLINE"), hub.HF_HUB_OFFLINE))
        return original(*args, **kwargs)

    original = AutoTokenizer.from_pretrained
    monkeypatch.setattr(AutoTokenizer, "from_pretrained", spy)
    for name in ("connect", "connect_ex"):
        monkeypatch.setattr(socket.socket, name, refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(hub, "HF_HUB_OFFLINE", False)
    load_clip(tiny_clip_dir)
    assert seen == [("1", True)]
    assert "HF_HUB_OFFLINE" not in os.environ and hub.HF_HUB_OFFLINE is False
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    load_clip(tiny_clip_dir)
    assert os.environ["HF_HUB_OFFLINE"] == "0"


def test_normalisation_by_hand(clip):
    frames = torch.stack([torch.full((3, IMAGE_SIZE, IMAGE_SIZE), c) for c in (0.0, 0.25, 1.0)])
    expected = (frames - CLIP_MEAN) / CLIP_STD
    assert torch.allclose(clip.preprocess(frames), expected, atol=1e-6)


def test_preprocess_equals_the_processor_at_model_size(clip, tiny_clip_dir):
    frames = _uint8_frames(4, IMAGE_SIZE, IMAGE_SIZE)
    assert torch.allclose(clip.preprocess(frames), _processor_pixels(tiny_clip_dir, frames), atol=1e-5)


@pytest.mark.parametrize("size", [(40, 48), (48, 40), (20, 28)])
def test_preprocess_resize_and_crop_follow_the_processor(clip, tiny_clip_dir, size):
    """Other sizes: same shape and crop; values within the 8-bit rounding of PIL's resize (its bicubic
    also differs slightly from torch's antialiased bicubic, which is what the torchvision backend uses)."""
    frames = _uint8_frames(3, *size, seed=1)
    ours, ref = clip.preprocess(frames), _processor_pixels(tiny_clip_dir, frames)
    assert ours.shape == ref.shape == (3, 3, IMAGE_SIZE, IMAGE_SIZE)
    assert float((ours - ref).abs().max()) < 0.03  # in normalised units: ~2 levels of 8 bits
    # the crop is centred: shifting it by one pixel is measurably worse
    shifted = torch.roll(ours, shifts=1, dims=-1 if size[1] > size[0] else -2)
    assert float((shifted - ref).abs().max()) > 0.03


def test_preprocess_sizes_by_hand():
    p = ClipPreprocess(do_resize=True, shortest_edge=224, longest_edge=None, height=None, width=None, mode="bicubic",
                       do_center_crop=True, crop_height=224, crop_width=224, do_normalize=False,
                       image_mean=(0.0, 0.0, 0.0), image_std=(1.0, 1.0, 1.0))
    assert p.output_size(480, 720) == (224, 336) and p.output_size(720, 480) == (336, 224)
    assert p.output_size(33, 57) == (224, 386)  # int(224 * 57 / 33) = int(386.9)
    assert p(torch.rand(2, 3, 480, 720)).shape == (2, 3, 224, 224)
    small = ClipPreprocess(do_resize=True, shortest_edge=None, longest_edge=None, height=6, width=6, mode="bilinear",
                           do_center_crop=True, crop_height=8, crop_width=8, do_normalize=False,
                           image_mean=(0.0, 0.0, 0.0), image_std=(1.0, 1.0, 1.0))
    out = small(torch.ones(1, 3, 10, 10))  # resized to 6x6, zero-padded to 8x8 like the processor
    assert out.shape == (1, 3, 8, 8) and float(out.sum()) == 3 * 36


def test_similarity_equals_clip_forward(clip, tiny_clip_dir):
    """Our cosine (frames through our preprocessing) == CLIPModel's logits / logit_scale via the processor."""
    from transformers import AutoProcessor

    frames = _uint8_frames(3, IMAGE_SIZE, IMAGE_SIZE, seed=2)  # one video of 3 frames
    video = frames.permute(1, 0, 2, 3)[None]
    ours = clip_similarity(video, PROMPTS[:1], clip)[0]  # (3,)
    proc = AutoProcessor.from_pretrained(tiny_clip_dir, local_files_only=True)
    from PIL import Image

    images = [Image.fromarray((f.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)) for f in frames]
    inputs = proc(text=PROMPTS[:1], images=images, return_tensors="pt", padding=True)
    with torch.no_grad():
        out = clip.model(**inputs)
    expected = out.logits_per_image[:, 0] / clip.model.logit_scale.exp()
    assert torch.allclose(ours, expected, atol=1e-5)
    assert float(ours.abs().min()) > 1e-3  # not trivially zero


def test_text_video_score_range_and_prompt_dependence(clip, world):
    prompts, videos = world
    scores = {p: clip_text_video_score(videos[:2], [p, p], clip) for p in PROMPTS}
    values = torch.stack(list(scores.values()))
    assert float(values.min()) >= 0.0 and float(values.max()) <= 100.0
    assert float(values.max()) > 1.0  # some prompt is close to the frames
    assert len({round(float(v[0]), 4) for v in values}) >= 4  # the score depends on the prompt
    cos = clip_similarity(videos[:2], [PROMPTS[0]] * 2, clip)
    assert torch.allclose(scores[PROMPTS[0]], 100 * cos.clamp(min=0).mean(dim=1), atol=1e-5)
    single = clip_text_video_score(videos[0], PROMPTS[0], clip)
    assert single.shape == () and float(single) == pytest.approx(float(scores[PROMPTS[0]][0]), abs=1e-4)


def test_frechet_distance_zero_for_identical_and_grows_with_noise(clip, world):
    _, videos = world
    assert clip_frechet_distance(videos, videos, clip) < 1e-9
    d = [clip_frechet_distance(add_noise(videos, s, seed=3), videos, clip) for s in (0.02, 0.05, 0.1, 0.2)]
    assert d[0] > 1e-9 and d[0] < d[1] < d[2] < d[3]
    feats = clip_frame_features(videos, clip)
    assert feats.shape == (6 * 8, 16) and torch.allclose(feats.norm(dim=1), torch.ones(48), atol=1e-5)


def test_frechet_distance_across_sizes(clip, world):
    _, videos = world
    bigger = torch.nn.functional.interpolate(videos[:3].flatten(1, 2), size=(48, 40), mode="bilinear").view(3, 3, 8, 48, 40)
    d = clip_frechet_distance(bigger, videos, clip)
    assert np.isfinite(d) and d > 0


def test_batching_does_not_change_features(tiny_clip_dir, world):
    _, videos = world
    one = load_clip(tiny_clip_dir, batch_frames=1)
    many = load_clip(tiny_clip_dir, batch_frames=64)
    assert torch.allclose(clip_frame_features(videos[:2], one), clip_frame_features(videos[:2], many), atol=1e-5)


def test_legacy_checkpoint_layout(clip, tmp_path):
    """The layout of hub CLIP checkpoints (openai/clip-vit-*): preprocessor_config.json with int sizes,
    vocab.json + merges.txt without tokenizer.json. Loads to the same preprocessing and the same scores."""
    d = save_tiny_clip(tmp_path / "clip")
    (d / "processor_config.json").unlink()
    (d / "tokenizer.json").unlink()
    (d / "preprocessor_config.json").write_text(json.dumps({
        "crop_size": IMAGE_SIZE, "size": IMAGE_SIZE, "do_center_crop": True, "do_normalize": True, "do_resize": True,
        "feature_extractor_type": "CLIPFeatureExtractor", "resample": 3,
        "image_mean": MEAN, "image_std": STD,
    }))
    vocab, merges = tiny_clip_vocab()
    (d / "vocab.json").write_text(json.dumps(vocab))
    (d / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    legacy = load_clip(d)
    assert legacy.preprocess == clip.preprocess
    x = _uint8_frames(4, 40, 48, seed=3).view(2, 2, 3, 40, 48).transpose(1, 2)
    assert torch.allclose(clip_similarity(x, PROMPTS[:2], legacy), clip_similarity(x, PROMPTS[:2], clip), atol=1e-6)


def test_prompt_count_mismatch(clip, world):
    _, videos = world
    with pytest.raises(ValueError, match="2 videos but 1 prompts.*one prompt per video"):
        clip_text_video_score(videos[:2], PROMPTS[:1], clip)
    with pytest.raises(ValueError, match="load_clip"):
        clip_text_video_score(videos[:1], PROMPTS[:1], str(clip.path))


def test_not_a_directory(tmp_path):
    with pytest.raises(ValueError, match="not a directory.*save_pretrained"):
        load_clip(tmp_path / "missing")


def test_not_a_clip_model(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "t5"}))
    with pytest.raises(ValueError, match="not a CLIP model.*'t5'.*CLIPModel"):
        load_clip(tmp_path)
    (tmp_path / "config.json").unlink()
    with pytest.raises(ValueError, match="no config.json"):
        load_clip(tmp_path)


def test_missing_tokenizer(tmp_path):
    d = save_tiny_clip(tmp_path / "clip", tokenizer=False)
    with pytest.raises(ValueError, match="no tokenizer.*CLIPProcessor.from_pretrained"):
        load_clip(d)


def test_missing_image_processor(tmp_path):
    d = save_tiny_clip(tmp_path / "clip", image_processor=False)
    with pytest.raises(ValueError, match="no image processor config.*CLIPProcessor.from_pretrained"):
        load_clip(d)
