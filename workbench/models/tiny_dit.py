"""The bundled model's architecture: a tiny diffusers `WanTransformer3DModel` in pixel space.

No VAE: the transformer denoises 8x32x32 RGB clips directly with 1x4x4 patches (512 tokens),
so one video takes a few seconds on a laptop CPU while the network is a real Wan DiT
(self-attention with 3D RoPE, cross-attention to text, AdaLN timestep modulation).

`in_channels = 4`: RGB plus a frame-index ramp (-1 at the first frame, +1 at the last). Wan's
RoPE is relative, and a model trained without an absolute time signal learned the motion axis but
not its sign (a left-moving and a right-moving video scored the same loss); the ramp breaks that
time-reversal symmetry. Weights trained with `in_channels = 3` still load and sample.
"""
from __future__ import annotations

from diffusers import FlowMatchEulerDiscreteScheduler, WanTransformer3DModel

TRANSFORMER_CONFIG: dict = dict(
    patch_size=(1, 4, 4),
    num_attention_heads=4,
    attention_head_dim=32,
    in_channels=4,
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


def with_time_channel(x: "torch.Tensor", in_channels: int) -> "torch.Tensor":
    """Append the frame-index ramp channel when the transformer expects one more channel than RGB."""
    import torch

    if in_channels == x.shape[1]:
        return x
    if in_channels != x.shape[1] + 1:
        raise ValueError(f"transformer expects {in_channels} input channels; clips have {x.shape[1]} (+1 time channel allowed)")
    f = x.shape[2]
    ramp = torch.linspace(-1.0, 1.0, f, device=x.device, dtype=x.dtype).view(1, 1, f, 1, 1)
    return torch.cat([x, ramp.expand(x.shape[0], 1, f, x.shape[3], x.shape[4])], dim=1)


def build_scheduler() -> FlowMatchEulerDiscreteScheduler:
    return FlowMatchEulerDiscreteScheduler(**SCHEDULER_CONFIG)
