"""A small text encoder of our own for the world's prompts: words -> (B, L, dim) embeddings.

Prompts are first read by the scene grammar, so any wording of the same scene gives the same
tokens, and a word outside the grammar is an error before the model sees it. The empty prompt
encodes to the unconditional embedding used by classifier-free guidance.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn

from workbench.world.grammar import COLORS, DIRECTIONS, SHAPES, SPEEDS, parse_prompt

SPECIAL = ("<pad>", "<null>")
WORDS = ("a", "fast", "moving") + tuple(COLORS) + SHAPES + tuple(DIRECTIONS) + tuple(SPEEDS)
VOCAB: dict[str, int] = {w: i for i, w in enumerate(SPECIAL + tuple(dict.fromkeys(WORDS)))}


@dataclass(frozen=True)
class TextEncoderConfig:
    dim: int = 64
    layers: int = 2
    heads: int = 4
    max_len: int = 8
    vocab_size: int = len(VOCAB)


def tokenize(prompts: list[str], max_len: int = 8) -> torch.Tensor:
    """Token ids (B, max_len); '' is the unconditional prompt (a single <null> token)."""
    ids = torch.full((len(prompts), max_len), VOCAB["<pad>"], dtype=torch.long)
    for i, p in enumerate(prompts):
        words = ["<null>"] if p == "" else parse_prompt(p).prompt.split()
        for j, w in enumerate(words[:max_len]):
            ids[i, j] = VOCAB[w]
    return ids


class TextEncoder(nn.Module):
    """Token embedding + a small pre-norm transformer encoder; pads are masked out."""

    def __init__(self, config: TextEncoderConfig = TextEncoderConfig()):
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.dim)
        self.pos = nn.Parameter(torch.zeros(1, config.max_len, config.dim))
        layer = nn.TransformerEncoderLayer(
            config.dim, config.heads, 2 * config.dim, dropout=0.0, batch_first=True, norm_first=True
        )
        self.encoder = nn.TransformerEncoder(layer, config.layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(config.dim)
        nn.init.normal_(self.pos, std=0.02)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        pad = ids == VOCAB["<pad>"]
        h = self.embed(ids) + self.pos[:, : ids.shape[1]]
        h = self.encoder(h, src_key_padding_mask=pad)
        return self.norm(h) * (~pad)[..., None]

    def encode(self, prompts: list[str]) -> torch.Tensor:
        """Prompts -> embeddings on this module's device."""
        return self(tokenize(prompts, self.config.max_len).to(self.pos.device))

    def config_dict(self) -> dict:
        return asdict(self.config)
