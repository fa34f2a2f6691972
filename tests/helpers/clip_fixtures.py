"""A tiny random CLIP checkpoint built offline (model + tokenizer + image processor), for tests of the CLIP
metrics, the CLI and the app: ``save_tiny_clip(dir)`` writes it with save_pretrained, ``load_clip(dir)`` reads it.

Import the fixtures into a test module (``from clip_fixtures import one_torch_thread, tiny_clip_dir``);
``one_torch_thread`` is autouse for the module that imports it.

The tokenizer is a real CLIPTokenizer (a tokenizers BPE with CLIP's normalizer, pre-tokenizer and
<|startoftext|> ... <|endoftext|> template) over every letter plus whole-word merges for the words of the
world grammar and the test prompts, so any lowercase prompt tokenizes and those words are single tokens.
"""
from __future__ import annotations

import string
from collections.abc import Iterator
from pathlib import Path

import pytest

from workbench.world.grammar import COLORS, DIRECTIONS, FILLER_WORDS, SHAPES, SPEEDS

WORDS: tuple[str, ...] = tuple(sorted({
    *COLORS, *SHAPES, *DIRECTIONS, *SPEEDS, *FILLER_WORDS,
    "small", "big", "falling", "rising", "cat", "dog", "photo", "of",
}))
BOS, EOS = "<|startoftext|>", "<|endoftext|>"
IMAGE_SIZE = 32  # the vision tower's input; the image processor resizes the shortest edge to it and centre-crops


def tiny_clip_vocab() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """(vocab, merges) of a BPE with CLIP's "</w>" end-of-word suffix: every letter, plus each word of WORDS whole."""
    vocab: dict[str, int] = {BOS: 0, EOS: 1}

    def add(token: str) -> None:
        vocab.setdefault(token, len(vocab))

    for c in string.ascii_lowercase:
        add(c)
        add(c + "</w>")
    merges: list[tuple[str, str]] = []
    for word in WORDS:
        symbols = [*word[:-1], word[-1] + "</w>"]
        current = symbols[0]
        for s in symbols[1:]:
            if (current, s) not in merges:
                merges.append((current, s))
            current += s
            add(current)
    return vocab, merges


def save_tiny_clip(directory: str | Path, seed: int = 0, tokenizer: bool = True, image_processor: bool = True) -> Path:
    """Write a tiny random CLIP checkpoint (hidden 32, 2 layers, 32x32 images, patch 8, projection 16) to `directory`.

    tokenizer / image_processor = False leave that part out (to test load_clip's errors). Deterministic in `seed`.
    """
    import torch
    from transformers import CLIPConfig, CLIPImageProcessorPil, CLIPModel, CLIPProcessor, CLIPTokenizer

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    vocab, merges = tiny_clip_vocab()
    tok = CLIPTokenizer(vocab=vocab, merges=merges)
    config = CLIPConfig(
        text_config=dict(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=16,
                         bos_token_id=vocab[BOS], eos_token_id=vocab[EOS], pad_token_id=vocab[EOS]),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           image_size=IMAGE_SIZE, patch_size=8),
        projection_dim=16,
    )
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = CLIPModel(config).eval()
    model.save_pretrained(directory)
    # the PIL twin of CLIPImageProcessor saves the same config ("image_processor_type": "CLIPImageProcessor")
    # and needs no torchvision
    ip = CLIPImageProcessorPil(size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})
    if tokenizer and image_processor:
        CLIPProcessor(image_processor=ip, tokenizer=tok).save_pretrained(directory)
    elif tokenizer:
        tok.save_pretrained(directory)
    elif image_processor:
        ip.save_pretrained(directory)
    return directory


@pytest.fixture(scope="session")
def tiny_clip_dir(tmp_path_factory) -> Path:
    """A tiny CLIP checkpoint saved once per session (import this fixture into the test module)."""
    return save_tiny_clip(tmp_path_factory.mktemp("tiny_clip") / "clip")


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread() -> Iterator[None]:
    """Run the tiny CLIP on one thread: its ops are too small to share, and on a busy 2-core machine a second
    OpenMP thread waits for the core another process holds (100x slower here)."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
