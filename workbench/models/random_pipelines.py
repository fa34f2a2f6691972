"""Diffusers video pipelines with random weights, built offline from configs.

Two sizes per family:

* ``"tiny"``: every component shrunk (1-2 transformer layers, a few channels, a 2-layer text encoder, a
  small-vocabulary tokenizer) but with the published *compression ratios and patch sizes*, so a tiny
  pipeline has the same frame/size rules as the real one and runs in well under a second on a CPU.
* ``"full"``: the published architectures (CogVideoX-2B, Wan2.1-T2V-1.3B, LTX-Video 0.9) for GPU timing.
  Weights are created directly on the target device; only the tokenizer is a stand-in (the real
  sentencepiece vocabularies cannot be downloaded here), with the text encoder keeping the real vocab size.

Weights are deterministic in ``seed``. Parameters that the default init leaves constant (zero-initialised
output layers, unit norm weights) get a small seeded perturbation so that no path is trivially zero.
Tokenizers are made with the ``tokenizers`` library through the transformers classes the pipelines use
(T5 Unigram, Llama BPE, CLIP BPE) over a small English vocabulary plus single characters, so any prompt
tokenizes (unknown words fall back to characters).
"""
from __future__ import annotations

import copy
import functools
import os
import re
import string
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .generator import PROMPT_DIR, GenerationSettings, read_prompt_list

__all__ = [
    "FAMILIES",
    "FULL_FAMILIES",
    "PIPELINE_CLASSES",
    "SIZES",
    "build_pipeline",
    "build_transformer",
    "component_configs",
    "count_parameters",
    "full_config",
    "save_random_pipeline",
    "tiny_defaults",
    "wan_14b_transformer_config",
]

FAMILIES: tuple[str, ...] = ("cogvideox", "wan", "ltx-video", "hunyuanvideo", "mochi", "latte")
SIZES: tuple[str, ...] = ("tiny", "full")
FULL_FAMILIES: tuple[str, ...] = ("cogvideox", "wan", "ltx-video")

# Every family's pipeline class and the class of each component (diffusers unless noted).
PIPELINE_CLASSES: dict[str, str] = {
    "cogvideox": "CogVideoXPipeline",
    "wan": "WanPipeline",
    "ltx-video": "LTXPipeline",
    "hunyuanvideo": "HunyuanVideoPipeline",
    "mochi": "MochiPipeline",
    "latte": "LattePipeline",
}
_CLASSES: dict[str, dict[str, str]] = {
    "cogvideox": dict(transformer="CogVideoXTransformer3DModel", vae="AutoencoderKLCogVideoX",
                      text_encoder="T5EncoderModel", scheduler="CogVideoXDDIMScheduler"),
    "wan": dict(transformer="WanTransformer3DModel", vae="AutoencoderKLWan", text_encoder="UMT5EncoderModel",
                scheduler="UniPCMultistepScheduler"),
    "ltx-video": dict(transformer="LTXVideoTransformer3DModel", vae="AutoencoderKLLTXVideo",
                      text_encoder="T5EncoderModel", scheduler="FlowMatchEulerDiscreteScheduler"),
    "hunyuanvideo": dict(transformer="HunyuanVideoTransformer3DModel", vae="AutoencoderKLHunyuanVideo",
                         text_encoder="LlamaModel", text_encoder_2="CLIPTextModel",
                         scheduler="FlowMatchEulerDiscreteScheduler"),
    "mochi": dict(transformer="MochiTransformer3DModel", vae="AutoencoderKLMochi", text_encoder="T5EncoderModel",
                  scheduler="FlowMatchEulerDiscreteScheduler"),
    "latte": dict(transformer="LatteTransformer3DModel", vae="AutoencoderKL", text_encoder="T5EncoderModel",
                  scheduler="DDIMScheduler"),
}  # fmt: skip

# Generation defaults of the tiny pipelines (written next to them as generation_defaults.json).
_TINY_DEFAULTS: dict[str, GenerationSettings] = {
    "cogvideox": GenerationSettings(steps=2, guidance=6.0, frames=9, height=32, width=32),
    "wan": GenerationSettings(steps=2, guidance=5.0, frames=5, height=32, width=32),
    "ltx-video": GenerationSettings(steps=2, guidance=3.0, frames=9, height=32, width=32),
    "hunyuanvideo": GenerationSettings(steps=2, guidance=6.0, frames=5, height=32, width=32),
    "mochi": GenerationSettings(steps=2, guidance=4.5, frames=7, height=32, width=32),
    "latte": GenerationSettings(steps=2, guidance=7.5, frames=4, height=32, width=32),
}

# ---------------------------------------------------------------------------
# configs
# ---------------------------------------------------------------------------

_T5_XXL = dict(
    vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
    relative_attention_num_buckets=32, relative_attention_max_distance=128, dropout_rate=0.1,
    layer_norm_epsilon=1e-6, feed_forward_proj="gated-gelu", tie_word_embeddings=False,
)  # google/t5-v1_1-xxl (the encoder of CogVideoX, LTX-Video, Mochi, Latte)
_UMT5_XXL = dict(_T5_XXL, vocab_size=256384)  # google/umt5-xxl (Wan2.1)


def _tiny_t5(vocab_size: int, d_model: int) -> dict[str, Any]:
    return dict(
        vocab_size=vocab_size, d_model=d_model, d_kv=8, d_ff=2 * d_model, num_layers=2, num_heads=d_model // 8,
        relative_attention_num_buckets=8, relative_attention_max_distance=32, dropout_rate=0.0,
        layer_norm_epsilon=1e-6, feed_forward_proj="gated-gelu", tie_word_embeddings=False,
    )  # fmt: skip


_COGVIDEOX_2B_SCHEDULER = dict(
    beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False, num_train_timesteps=1000,
    prediction_type="v_prediction", rescale_betas_zero_snr=True, set_alpha_to_one=True, snr_shift_scale=3.0,
    steps_offset=0, timestep_spacing="trailing",
)  # fmt: skip
_WAN_SCHEDULER = dict(
    num_train_timesteps=1000, prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0,
    solver_order=2, solver_type="bh2", predict_x0=True, lower_order_final=True, final_sigmas_type="zero",
)  # fmt: skip  (Wan2.1-T2V-1.3B-Diffusers: UniPC with flow sigmas, shift 3)
_LTX_SCHEDULER = dict(
    num_train_timesteps=1000, shift=1.0, use_dynamic_shifting=True, base_shift=0.95, max_shift=2.05,
    base_image_seq_len=1024, max_image_seq_len=4096, shift_terminal=0.1,
)  # fmt: skip


def _cogvideox(size: str, vocab: int) -> dict[str, dict[str, Any]]:
    if size == "full":  # THUDM/CogVideoX-2b
        return dict(
            transformer=dict(
                num_attention_heads=30, attention_head_dim=64, in_channels=16, out_channels=16, flip_sin_to_cos=True,
                freq_shift=0, time_embed_dim=512, text_embed_dim=4096, num_layers=30, dropout=0.0,
                attention_bias=True, sample_width=90, sample_height=60, sample_frames=49, patch_size=2,
                temporal_compression_ratio=4, max_text_seq_length=226, activation_fn="gelu-approximate",
                timestep_activation_fn="silu", norm_elementwise_affine=True, norm_eps=1e-5,
                spatial_interpolation_scale=1.875, temporal_interpolation_scale=1.0,
                use_rotary_positional_embeddings=False, use_learned_positional_embeddings=False,
            ),
            vae=dict(
                block_out_channels=(128, 256, 256, 512), latent_channels=16, layers_per_block=3, norm_num_groups=32,
                norm_eps=1e-6, temporal_compression_ratio=4, sample_height=480, sample_width=720,
                scaling_factor=1.15258426, force_upcast=True, use_quant_conv=False, use_post_quant_conv=False,
            ),
            text_encoder=dict(_T5_XXL),
            scheduler=dict(_COGVIDEOX_2B_SCHEDULER),
            tokenizer=dict(model_max_length=226),
        )  # fmt: skip
    # Tiny: rotary position embeddings (as in CogVideoX-5B) so the transformer call carries
    # image_rotary_emb; sample_* give a 9 x 32 x 32 default video (4x4 latents, 2x2 patches).
    return dict(
        transformer=dict(
            num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4, time_embed_dim=16,
            text_embed_dim=32, num_layers=2, sample_width=4, sample_height=4, sample_frames=9, patch_size=2,
            temporal_compression_ratio=4, max_text_seq_length=32, use_rotary_positional_embeddings=True,
        ),
        vae=dict(
            block_out_channels=(8, 8, 16, 16), latent_channels=4, layers_per_block=1, norm_num_groups=4,
            temporal_compression_ratio=4, sample_height=32, sample_width=32,
        ),
        text_encoder=_tiny_t5(vocab, 32),
        scheduler=dict(_COGVIDEOX_2B_SCHEDULER),
        tokenizer=dict(model_max_length=32),
    )  # fmt: skip


def _wan_transformer(num_heads: int, ffn_dim: int, num_layers: int) -> dict[str, Any]:
    return dict(
        patch_size=(1, 2, 2), num_attention_heads=num_heads, attention_head_dim=128, in_channels=16,
        out_channels=16, text_dim=4096, freq_dim=256, ffn_dim=ffn_dim, num_layers=num_layers, cross_attn_norm=True,
        qk_norm="rms_norm_across_heads", eps=1e-6, image_dim=None, added_kv_proj_dim=None, rope_max_seq_len=1024,
    )  # fmt: skip


def wan_14b_transformer_config() -> dict[str, Any]:
    """The WanTransformer3DModel config of Wan2.1-T2V-14B (40 layers, 40 heads x 128, ffn 13824)."""
    return _wan_transformer(num_heads=40, ffn_dim=13824, num_layers=40)


def _wan(size: str, vocab: int) -> dict[str, dict[str, Any]]:
    if size == "full":  # Wan-AI/Wan2.1-T2V-1.3B-Diffusers
        return dict(
            transformer=_wan_transformer(num_heads=12, ffn_dim=8960, num_layers=30),
            vae=dict(base_dim=96, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2, attn_scales=[],
                     temperal_downsample=[False, True, True], dropout=0.0),  # latents_mean/std: class defaults
            text_encoder=dict(_UMT5_XXL),
            scheduler=dict(_WAN_SCHEDULER),
            tokenizer=dict(model_max_length=512),
        )  # fmt: skip
    return dict(
        transformer=dict(
            patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=4, out_channels=4,
            text_dim=32, freq_dim=16, ffn_dim=32, num_layers=2, cross_attn_norm=True,
            qk_norm="rms_norm_across_heads", rope_max_seq_len=32,
        ),
        vae=dict(base_dim=8, z_dim=4, dim_mult=[1, 1, 2, 2], num_res_blocks=1, attn_scales=[],
                 temperal_downsample=[False, True, True], latents_mean=[0.1, -0.1, 0.2, 0.0],
                 latents_std=[1.5, 2.0, 1.0, 2.5]),
        text_encoder=_tiny_t5(vocab, 32),
        scheduler=dict(_WAN_SCHEDULER),
        tokenizer=dict(model_max_length=32),
    )  # fmt: skip


def _ltx(size: str, vocab: int) -> dict[str, dict[str, Any]]:
    if size == "full":  # Lightricks/LTX-Video (0.9.0): the diffusers class defaults are its config
        return dict(
            transformer=dict(
                in_channels=128, out_channels=128, patch_size=1, patch_size_t=1, num_attention_heads=32,
                attention_head_dim=64, cross_attention_dim=2048, num_layers=28, activation_fn="gelu-approximate",
                qk_norm="rms_norm_across_heads", norm_elementwise_affine=False, norm_eps=1e-6, caption_channels=4096,
                attention_bias=True, attention_out_bias=True,
            ),
            vae=dict(),
            text_encoder=dict(_T5_XXL),
            scheduler=dict(_LTX_SCHEDULER),
            tokenizer=dict(model_max_length=128),
        )  # fmt: skip
    # Tiny VAE keeps the 32x spatial (patch 4 x 3 downsamples) and 8x temporal compression.
    return dict(
        transformer=dict(
            in_channels=8, out_channels=8, patch_size=1, patch_size_t=1, num_attention_heads=2,
            attention_head_dim=8, cross_attention_dim=16, num_layers=2, caption_channels=32,
        ),
        vae=dict(
            latent_channels=8, block_out_channels=(8, 8, 8, 8), decoder_block_out_channels=(8, 8, 8, 8),
            layers_per_block=(1, 1, 1, 1, 1), decoder_layers_per_block=(1, 1, 1, 1, 1),
        ),
        text_encoder=_tiny_t5(vocab, 32),
        scheduler=dict(_LTX_SCHEDULER),
        tokenizer=dict(model_max_length=32),
    )  # fmt: skip


def _hunyuan(size: str, vocab: int) -> dict[str, dict[str, Any]]:
    _require_tiny("hunyuanvideo", size)
    return dict(
        transformer=dict(
            in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8, num_layers=1,
            num_single_layers=1, num_refiner_layers=1, mlp_ratio=2.0, patch_size=2, patch_size_t=1,
            guidance_embeds=True, text_embed_dim=32, pooled_projection_dim=16, rope_axes_dim=(2, 2, 4),
        ),
        vae=dict(latent_channels=4, block_out_channels=(8, 8, 8, 8), layers_per_block=1, norm_num_groups=4,
                 spatial_compression_ratio=8, temporal_compression_ratio=4),
        # hidden_states[-3] is the prompt embedding (num_hidden_layers_to_skip=2): 3 layers at least
        text_encoder=dict(vocab_size=_llama_vocab_size(), hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                          bos_token_id=1, eos_token_id=2, pad_token_id=3),
        text_encoder_2=dict(vocab_size=len(_clip_vocab()), hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                            num_attention_heads=2, max_position_embeddings=77, projection_dim=16,
                            bos_token_id=0, eos_token_id=1, pad_token_id=1),
        scheduler=dict(shift=7.0),
        tokenizer=dict(model_max_length=1024),
        tokenizer_2=dict(model_max_length=77),
    )  # fmt: skip


def _mochi(size: str, vocab: int) -> dict[str, dict[str, Any]]:
    _require_tiny("mochi", size)
    # MochiPipeline hard-codes 8x spatial and 6x temporal compression and 12 latent channels; the
    # VAE's group norms have 32 groups, so its channels stay at 32.
    return dict(
        transformer=dict(
            patch_size=2, num_attention_heads=2, attention_head_dim=8, num_layers=2, pooled_projection_dim=16,
            in_channels=12, text_embed_dim=32, time_embed_dim=4, max_sequence_length=32,
        ),
        vae=dict(
            encoder_block_out_channels=(32, 32, 32, 32), decoder_block_out_channels=(32, 32, 32, 32),
            latent_channels=12,
            layers_per_block=(1, 1, 1, 1, 1), temporal_expansions=(1, 2, 3), spatial_expansions=(2, 2, 2),
            add_attention_block=(False, False, False, False, False),
        ),
        text_encoder=_tiny_t5(vocab, 32),
        scheduler=dict(),
        tokenizer=dict(model_max_length=32),
    )  # fmt: skip


def _latte(size: str, vocab: int) -> dict[str, dict[str, Any]]:
    _require_tiny("latte", size)
    # Latte's temporal position table makes the frame count fixed (video_length); out = 2 x in (learned sigma).
    return dict(
        transformer=dict(
            num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8, num_layers=2,
            cross_attention_dim=16, sample_size=4, patch_size=2, norm_type="ada_norm_single",
            num_embeds_ada_norm=1000, caption_channels=32, video_length=4,
        ),
        vae=dict(
            down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
            block_out_channels=(8, 8, 8, 8), layers_per_block=1, latent_channels=4, norm_num_groups=4,
            sample_size=32,
        ),
        text_encoder=_tiny_t5(vocab, 32),
        scheduler=dict(beta_start=0.0001, beta_end=0.02, beta_schedule="linear", clip_sample=False),
        tokenizer=dict(model_max_length=120),
    )  # fmt: skip


_CONFIGS = {"cogvideox": _cogvideox, "wan": _wan, "ltx-video": _ltx, "hunyuanvideo": _hunyuan, "mochi": _mochi,
            "latte": _latte}  # fmt: skip


def _require_tiny(family: str, size: str) -> None:
    if size != "tiny":
        raise ValueError(
            f"size={size!r} is not available for {family!r}: full-size configs exist for "
            f"{', '.join(FULL_FAMILIES)}; use size='tiny' for {family!r}"
        )


def _check(family: str, size: str) -> None:
    if family not in FAMILIES:
        raise ValueError(f"Unknown family {family!r}; choose one of: {', '.join(FAMILIES)}")
    if size not in SIZES:
        raise ValueError(f"Unknown size {size!r}; choose 'tiny' (CPU tests) or 'full' (published configs)")


def component_configs(family: str, size: str = "tiny") -> dict[str, dict[str, Any]]:
    """``{component: constructor kwargs}`` for every component of ``family`` at ``size`` (a fresh copy)."""
    _check(family, size)
    return copy.deepcopy(_CONFIGS[family](size, len(_tokenizer_vocab())))


def full_config(family: str) -> dict[str, dict[str, Any]]:
    """The published configs of ``family`` (CogVideoX-2B, Wan2.1-T2V-1.3B, LTX-Video 0.9)."""
    return component_configs(family, "full")


def tiny_defaults(family: str) -> GenerationSettings:
    """What a tiny pipeline of ``family`` generates by default (2 steps, 32x32, a few frames)."""
    _check(family, "tiny")
    return _TINY_DEFAULTS[family]


# ---------------------------------------------------------------------------
# tokenizers (offline, small vocabulary)
# ---------------------------------------------------------------------------

_WORDS = tuple(dict.fromkeys((
    "a an the and or of in on at to with from into over under behind front near far up down left right "
    "moving moves move walking runs running flying falling rolling turning spinning jumping slowly quickly "
    "fast slow big small large tiny red green blue yellow purple orange white black gray brown pink "
    "circle square triangle cross star ball box cube shape object cat dog bird fish horse car boat "
    "plane train person man woman child people street city road forest tree trees river sea ocean beach "
    "mountain sky sun moon cloud clouds rain snow night day light dark water fire field garden house "
    "room table window camera view shot close scene video is are background sunset motion"
).split()))
# ... plus every word of the packaged calibration / evaluation prompt lists, so those prompts tokenize to
# about one token a word and fit the tiny text encoders
_WORDS = tuple(dict.fromkeys(_WORDS + tuple(
    w for name in ("calibration.txt", "evaluation.txt")
    for p in read_prompt_list(PROMPT_DIR / name) for w in re.findall(r"[a-z]+", p.lower()))))
_CHARS = string.ascii_lowercase + string.ascii_uppercase + string.digits + string.punctuation


def _tokenizer_vocab() -> list[str]:
    """Token strings of the T5-style Unigram vocabulary (specials first: <pad>=0, </s>=1, <unk>=2)."""
    return ["<pad>", "</s>", "<unk>", "\u2581"] + ["\u2581" + w for w in _WORDS] + list(_CHARS)


def _t5_tokenizer(model_max_length: int) -> Any:
    from transformers import T5Tokenizer

    scored = [(tok, 0.0 if i < 3 else -2.0 if i == 3 else -3.0 if tok.startswith("\u2581") else -6.0)
              for i, tok in enumerate(_tokenizer_vocab())]  # fmt: skip
    return T5Tokenizer(vocab=scored, extra_ids=0, model_max_length=model_max_length)


def _bpe_word_vocab(prefix: str, specials: list[str]) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Character vocabulary plus one merge chain per word (``prefix`` marks a word start, e.g. Llama's ▁)."""
    vocab = {tok: i for i, tok in enumerate(specials)}
    for ch in [prefix, *_CHARS]:
        vocab.setdefault(ch, len(vocab))
    merges = []
    for word in _WORDS:
        current = prefix
        for ch in word:
            merges.append((current, ch))
            current += ch
            vocab.setdefault(current, len(vocab))
    return vocab, merges


def _llama_vocab() -> tuple[dict[str, int], list[tuple[str, str]]]:
    return _bpe_word_vocab("\u2581", ["<unk>", "<s>", "</s>", "<pad>"])


def _llama_vocab_size() -> int:
    """An upper bound of the tiny Llama tokenizer's size (BPE vocabulary + template pieces)."""
    return len(_llama_vocab()[0]) + len(set(_hunyuan_template_pieces())) + 1


def _clip_vocab() -> dict[str, int]:
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for ch in _CHARS.lower():
        vocab.setdefault(ch, len(vocab))
        vocab.setdefault(ch + "</w>", len(vocab))
    return vocab


def _cut_prefix_free(text: str, pieces: int, taken: list[str]) -> list[str]:
    """Cut ``text`` into ``pieces`` near-equal substrings such that no piece (nor one of ``taken``) is a
    proper prefix of another: then leftmost-longest added-token matching reproduces exactly this cut."""
    short = len(text) // pieces
    lo, hi = max(1, short - 2), short + 3

    def search(pos: int, k: int, out: list[str]) -> list[str] | None:
        if k == pieces:
            return out if pos == len(text) else None
        left = pieces - k - 1
        for length in (short, short + 1, short - 1, short + 2, short - 2, short + 3):
            if length < lo or not lo * left <= len(text) - pos - length <= hi * left:
                continue
            piece = text[pos : pos + length]
            if all(o == piece or not (o.startswith(piece) or piece.startswith(o)) for o in taken + out):
                found = search(pos + length, k + 1, [*out, piece])
                if found is not None:
                    return found
        return None

    found = search(0, 0, [])
    if found is None:  # pragma: no cover - the template is fixed; tests check the cut
        raise RuntimeError(f"cannot cut {text[:40]!r}... into {pieces} prefix-free pieces")
    return found


@functools.lru_cache(maxsize=1)
def _hunyuan_template_pieces() -> tuple[str, ...]:
    """The HunyuanVideo prompt-template prefix as ``crop_start`` (95) added tokens.

    HunyuanVideoPipeline drops the first ``crop_start`` tokens of the templated prompt, a count made for
    the Llama-3 tokenizer; the tiny tokenizer tokenizes the same prefix into exactly that many tokens
    (Llama-3's header/eot special strings whole, the rest cut into near-equal pieces) so the crop
    removes exactly the template, as with the real model.
    """
    import re

    from diffusers.pipelines.hunyuan_video.pipeline_hunyuan_video import DEFAULT_PROMPT_TEMPLATE

    prefix = DEFAULT_PROMPT_TEMPLATE["template"].split("{}")[0]
    atoms = [a for a in re.split(r"(<\|[a-z_]+\|>|\n\n)", prefix) if a]
    fixed = [a for a in atoms if re.fullmatch(r"<\|[a-z_]+\|>|\n\n", a) or len(a) < 8]
    free = [a for a in atoms if a not in fixed]
    n_free = int(DEFAULT_PROMPT_TEMPLATE["crop_start"]) - (len(atoms) - len(free))
    if len(free) != 1:  # pragma: no cover - guards a diffusers template change
        raise RuntimeError(f"unexpected HunyuanVideo template layout: {atoms!r}")
    pieces: list[str] = []
    for atom in atoms:
        pieces += [atom] if atom in fixed else _cut_prefix_free(atom, n_free, list(dict.fromkeys(fixed)))
    return tuple(pieces)


def _llama_tokenizer(model_max_length: int) -> Any:
    from tokenizers import AddedToken
    from transformers import LlamaTokenizer

    vocab, merges = _llama_vocab()
    tok = LlamaTokenizer(vocab=vocab, merges=merges, pad_token="<pad>", model_max_length=model_max_length)
    pieces = dict.fromkeys([*_hunyuan_template_pieces(), "<|eot_id|>"])
    tok.add_tokens([AddedToken(p, normalized=False, special=False) for p in pieces])
    return tok


def _clip_tokenizer(model_max_length: int) -> Any:
    from transformers import CLIPTokenizer

    return CLIPTokenizer(vocab=_clip_vocab(), merges=[], model_max_length=model_max_length)


# ---------------------------------------------------------------------------
# building
# ---------------------------------------------------------------------------


@contextmanager
def _seeded(seed: int) -> Iterator[None]:
    """Seed torch's global RNG for one component's init, then restore the caller's RNG state."""
    state = torch.random.get_rng_state()
    cuda_states = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    torch.manual_seed(seed)
    try:
        yield
    finally:
        torch.random.set_rng_state(state)
        if cuda_states is not None:
            torch.cuda.set_rng_state_all(cuda_states)


def _perturb_constants(module: nn.Module, seed: int, scale: float) -> None:
    """Add seeded noise to every parameter the init left constant (zeros, ones), so none is trivial."""
    params = [p for p in module.parameters() if p.numel() > 0]
    if not params:
        return
    device = params[0].device
    gen = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for p in params:
            if p.numel() == 1 or bool(p.min() == p.max()):
                p.add_(scale * torch.randn(p.shape, generator=gen, device=p.device, dtype=torch.float32).to(p.dtype))


def _cast(module: nn.Module, dtype: torch.dtype) -> nn.Module:
    """Cast floating parameters and buffers to ``dtype``, except in the submodules diffusers keeps in
    float32 (``_keep_in_fp32_modules``), as ``from_pretrained(torch_dtype=...)`` does."""
    keep = set(getattr(module, "_keep_in_fp32_modules", None) or ())
    for name, sub in module.named_modules():
        if any(part in keep for part in name.split(".")):
            continue
        for p in sub.parameters(recurse=False):
            if p.is_floating_point() and p.dtype != dtype:
                p.data = p.data.to(dtype)
        for bname, b in sub.named_buffers(recurse=False):
            if b is not None and b.is_floating_point() and b.dtype != dtype:
                setattr(sub, bname, b.to(dtype))
    return module


def _make_module(class_name: str, config: dict[str, Any], *, seed: int, size: str, device: torch.device,
                 dtype: torch.dtype) -> nn.Module:  # fmt: skip
    import diffusers
    import transformers

    with _seeded(seed), torch.device(device):
        if hasattr(diffusers, class_name):
            module = getattr(diffusers, class_name)(**config)
        else:
            cls = getattr(transformers, class_name)
            module = cls(cls.config_class(**config))
    _perturb_constants(module, seed + 7, scale=0.05 if size == "tiny" else 0.02)
    return _cast(module, dtype).eval().requires_grad_(False)


def _parse_device(device: str | torch.device) -> torch.device:
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(
            f"device={str(device)!r} asked for CUDA but torch.cuda.is_available() is False on this machine: "
            "pass device='cpu' (--device cpu)"
        )
    return dev


def build_transformer(
    family: str,
    size: str = "tiny",
    seed: int = 0,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    config: dict[str, Any] | None = None,
) -> nn.Module:
    """Only the transformer of ``family`` (``config`` overrides the size's config, e.g. Wan 14B)."""
    _check(family, size)
    cfg = component_configs(family, size)["transformer"] if config is None else dict(config)
    return _make_module(_CLASSES[family]["transformer"], cfg, seed=seed, size=size,
                        device=_parse_device(device), dtype=dtype)  # fmt: skip


def build_pipeline(
    family: str,
    size: str = "tiny",
    seed: int = 0,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
) -> Any:
    """A diffusers pipeline of ``family`` with random weights (deterministic in ``seed``), on ``device``."""
    import diffusers

    _check(family, size)
    dev = _parse_device(device)
    configs = component_configs(family, size)
    classes = _CLASSES[family]
    components: dict[str, Any] = {}
    for offset, name in enumerate(("transformer", "vae", "text_encoder", "text_encoder_2")):
        if name in classes:
            components[name] = _make_module(classes[name], configs[name], seed=seed + 1000 * offset, size=size,
                                            device=dev, dtype=dtype)  # fmt: skip
    components["scheduler"] = getattr(diffusers, classes["scheduler"])(**configs["scheduler"])
    max_len = configs["tokenizer"]["model_max_length"]
    if family == "hunyuanvideo":
        components["tokenizer"] = _llama_tokenizer(max_len)
        components["tokenizer_2"] = _clip_tokenizer(configs["tokenizer_2"]["model_max_length"])
    else:
        components["tokenizer"] = _t5_tokenizer(max_len)
    pipe = getattr(diffusers, PIPELINE_CLASSES[family])(**components)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def save_random_pipeline(family: str, out_dir: str | os.PathLike[str], size: str = "tiny", seed: int = 0) -> Path:
    """Build a random pipeline, ``save_pretrained`` it to ``out_dir`` and return the directory.

    Tiny pipelines also get ``generation_defaults.json`` (their small default sizes and 2 steps), so
    ``PipelineGenerator.from_pretrained(out_dir)`` generates tiny videos by default.
    """
    from .video_pipeline import PipelineGenerator

    pipe = build_pipeline(family, size=size, seed=seed)
    defaults = tiny_defaults(family) if size == "tiny" else None
    return PipelineGenerator(pipe, defaults=defaults).save_pretrained(out_dir)


def count_parameters(family: str, size: str = "full", component: str = "transformer",
                     config: dict[str, Any] | None = None) -> int:  # fmt: skip
    """Parameter count of one component, from a build on the meta device (no memory, no init cost)."""
    _check(family, size)
    if component not in _CLASSES[family] or component == "scheduler":
        raise ValueError(f"{family!r} has no module component {component!r}; choose one of "
                         f"{', '.join(c for c in _CLASSES[family] if c != 'scheduler')}")  # fmt: skip
    import diffusers
    import transformers

    cfg = component_configs(family, size)[component] if config is None else dict(config)
    class_name = _CLASSES[family][component]
    with torch.device("meta"):
        if hasattr(diffusers, class_name):
            module = getattr(diffusers, class_name)(**cfg)
        else:
            cls = getattr(transformers, class_name)
            module = cls(cls.config_class(**cfg))
    return sum(p.numel() for p in module.parameters())
