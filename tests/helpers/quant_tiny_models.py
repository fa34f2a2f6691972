"""Tiny random configs of the six supported diffusers video transformers, with matching inputs.

Each builder returns (model, kwargs) so a test can call `model(**kwargs)` and compare outputs.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn


def _wan(g: torch.Generator) -> tuple[nn.Module, dict]:
    from diffusers import WanTransformer3DModel

    model = WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4,
        text_dim=16, freq_dim=16, ffn_dim=32, num_layers=1, rope_max_seq_len=32,
    )
    kwargs = dict(
        hidden_states=torch.randn(2, 4, 2, 4, 4, generator=g),
        timestep=torch.tensor([500, 500]),
        encoder_hidden_states=torch.randn(2, 6, 16, generator=g),
    )
    return model, kwargs


def _cogvideox(g: torch.Generator) -> tuple[nn.Module, dict]:
    from diffusers import CogVideoXTransformer3DModel

    model = CogVideoXTransformer3DModel(
        num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4, time_embed_dim=16,
        text_embed_dim=16, num_layers=1, sample_width=8, sample_height=8, sample_frames=9, patch_size=2,
        max_text_seq_length=6, temporal_compression_ratio=4,
    )
    kwargs = dict(
        hidden_states=torch.randn(2, 3, 4, 8, 8, generator=g),
        encoder_hidden_states=torch.randn(2, 6, 16, generator=g),
        timestep=torch.tensor([500, 500]),
    )
    return model, kwargs


def _latte(g: torch.Generator) -> tuple[nn.Module, dict]:
    from diffusers import LatteTransformer3DModel

    model = LatteTransformer3DModel(
        num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8, num_layers=1,
        cross_attention_dim=16, sample_size=8, patch_size=2, norm_type="ada_norm_single", caption_channels=16,
        video_length=2,
    )
    kwargs = dict(
        hidden_states=torch.randn(2, 4, 2, 8, 8, generator=g),
        timestep=torch.tensor([500, 500]),
        encoder_hidden_states=torch.randn(2, 6, 16, generator=g),
    )
    return model, kwargs


def _hunyuan(g: torch.Generator) -> tuple[nn.Module, dict]:
    from diffusers import HunyuanVideoTransformer3DModel

    model = HunyuanVideoTransformer3DModel(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8, num_layers=1,
        num_single_layers=1, num_refiner_layers=1, patch_size=1, patch_size_t=1, text_embed_dim=16,
        pooled_projection_dim=8, rope_axes_dim=(2, 2, 4), guidance_embeds=False,
    )
    mask = torch.ones(2, 6, dtype=torch.bool)
    mask[1, 4:] = False
    kwargs = dict(
        hidden_states=torch.randn(2, 4, 2, 4, 4, generator=g),
        timestep=torch.tensor([500, 500]),
        encoder_hidden_states=torch.randn(2, 6, 16, generator=g),
        encoder_attention_mask=mask,
        pooled_projections=torch.randn(2, 8, generator=g),
    )
    return model, kwargs


def _ltx(g: torch.Generator) -> tuple[nn.Module, dict]:
    from diffusers import LTXVideoTransformer3DModel

    model = LTXVideoTransformer3DModel(
        in_channels=4, out_channels=4, patch_size=1, patch_size_t=1, num_attention_heads=2, attention_head_dim=8,
        cross_attention_dim=16, num_layers=1, caption_channels=16,
    )
    frames, height, width = 2, 4, 4
    mask = torch.ones(2, 6)
    mask[1, 4:] = 0
    kwargs = dict(
        hidden_states=torch.randn(2, frames * height * width, 4, generator=g),
        encoder_hidden_states=torch.randn(2, 6, 16, generator=g),
        timestep=torch.tensor([500, 500]),
        encoder_attention_mask=mask,
        num_frames=frames, height=height, width=width,
    )
    return model, kwargs


def _mochi(g: torch.Generator) -> tuple[nn.Module, dict]:
    from diffusers import MochiTransformer3DModel

    model = MochiTransformer3DModel(
        patch_size=2, num_attention_heads=2, attention_head_dim=8, num_layers=1, pooled_projection_dim=16,
        in_channels=4, text_embed_dim=16, time_embed_dim=4, max_sequence_length=6,
    )
    mask = torch.ones(2, 6, dtype=torch.bool)
    mask[1, 4:] = False
    kwargs = dict(
        hidden_states=torch.randn(2, 4, 2, 8, 8, generator=g),
        encoder_hidden_states=torch.randn(2, 6, 16, generator=g),
        timestep=torch.tensor([500, 500]),
        encoder_attention_mask=mask,
    )
    return model, kwargs


BUILDERS: dict[str, Callable[[torch.Generator], tuple[nn.Module, dict]]] = {
    "wan": _wan,
    "cogvideox": _cogvideox,
    "latte": _latte,
    "hunyuan": _hunyuan,
    "ltx": _ltx,
    "mochi": _mochi,
}


def build(name: str, seed: int = 0) -> tuple[nn.Module, dict]:
    """A tiny random model of the named class (eval mode, fixed seed) and inputs for one forward."""
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed + 1)
    model, kwargs = BUILDERS[name](g)
    _randomize(model, g)
    return model.eval(), kwargs


def _randomize(model: nn.Module, g: torch.Generator) -> None:
    """Give zero-initialised parameters (adaLN-zero, output projections) random values so every path matters."""
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim >= 2:
                p.copy_(torch.randn(p.shape, generator=g) / p.shape[-1] ** 0.5)
            else:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1 + (1.0 if torch.all(p == 1) else 0.0))


def output(model: nn.Module, kwargs: dict) -> torch.Tensor:
    """The first output tensor of a forward call (diffusers models return a tuple or an output object)."""
    with torch.no_grad():
        out = model(**kwargs, return_dict=False)
    return out[0]
