"""The bundled model's architecture: a tiny diffusers `WanTransformer3DModel` in pixel space.

No VAE: the transformer denoises 8x32x32 RGB clips directly with 1x4x4 patches (512 tokens),
so one video takes about a second on a laptop CPU while the network is a real Wan DiT
(self-attention with 3D RoPE, cross-attention to text, AdaLN timestep modulation).
"""
from __future__ import annotations

from diffusers import FlowMatchEulerDiscreteScheduler, WanTransformer3DModel

TRANSFORMER_CONFIG: dict = dict(
    patch_size=(1, 4, 4),
    num_attention_heads=4,
    attention_head_dim=32,
    in_channels=3,
    out_channels=3,
    text_dim=64,
    freq_dim=64,
    ffn_dim=512,
    num_layers=6,
    cross_attn_norm=True,
    qk_norm="rms_norm_across_heads",
    eps=1e-6,
    rope_max_seq_len=64,
)

SCHEDULER_CONFIG: dict = dict(num_train_timesteps=1000, shift=1.0)


def build_transformer(**overrides) -> WanTransformer3DModel:
    """A freshly initialised transformer with the bundled config (overrides for experiments)."""
    return WanTransformer3DModel(**{**TRANSFORMER_CONFIG, **overrides})


def build_scheduler() -> FlowMatchEulerDiscreteScheduler:
    return FlowMatchEulerDiscreteScheduler(**SCHEDULER_CONFIG)
