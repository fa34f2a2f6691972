"""random_pipelines: published full-size configs (checked by parameter counts from meta-device builds),
tiny pipelines (deterministic, small, offline tokenizers) and their save/reload round trip."""
from __future__ import annotations

import json
import time

import pytest
import torch
from pipeline_fixtures import network_refused, one_torch_thread, quiet, saved_pipelines  # noqa: F401

from workbench.models.random_pipelines import (
    FAMILIES,
    FULL_FAMILIES,
    PIPELINE_CLASSES,
    build_pipeline,
    build_transformer,
    component_configs,
    count_parameters,
    full_config,
    tiny_defaults,
    wan_14b_transformer_config,
)
from workbench.models.video_pipeline import DEFAULTS_FILE, PipelineGenerator

# ---------------------------------------------------------------------------
# full-size configs
# ---------------------------------------------------------------------------


def test_cogvideox_2b_config():
    cfg = full_config("cogvideox")
    t = cfg["transformer"]
    assert (t["num_layers"], t["num_attention_heads"], t["attention_head_dim"]) == (30, 30, 64)
    assert (t["in_channels"], t["text_embed_dim"], t["max_text_seq_length"], t["patch_size"]) == (16, 4096, 226, 2)
    assert (t["sample_frames"], t["sample_height"], t["sample_width"]) == (49, 60, 90)
    assert t["use_rotary_positional_embeddings"] is False
    assert cfg["vae"]["block_out_channels"] == (128, 256, 256, 512) and cfg["vae"]["scaling_factor"] == 1.15258426
    te = cfg["text_encoder"]
    assert (te["num_layers"], te["d_model"], te["num_heads"], te["d_ff"]) == (24, 4096, 64, 10240)
    assert te["vocab_size"] == 32128
    assert cfg["scheduler"]["prediction_type"] == "v_prediction" and cfg["scheduler"]["snr_shift_scale"] == 3.0


def test_wan_configs():
    t = full_config("wan")["transformer"]
    assert (t["num_layers"], t["num_attention_heads"], t["attention_head_dim"], t["ffn_dim"]) == (30, 12, 128, 8960)
    assert t["patch_size"] == (1, 2, 2) and t["text_dim"] == 4096 and t["qk_norm"] == "rms_norm_across_heads"
    big = wan_14b_transformer_config()
    assert (big["num_layers"], big["num_attention_heads"], big["attention_head_dim"]) == (40, 40, 128)
    assert big["ffn_dim"] == 13824
    assert full_config("wan")["text_encoder"]["vocab_size"] == 256384
    assert full_config("wan")["scheduler"]["flow_shift"] == 3.0


def test_full_parameter_counts_match_the_published_sizes():
    # meta-device builds: no memory, no init. Published: CogVideoX-2B 1.69B, Wan2.1 1.3B (1.42B counted),
    # Wan2.1 14B, T5-XXL encoder 4.76B.
    assert count_parameters("cogvideox") == 1_693_783_872
    assert count_parameters("wan") == 1_418_996_800
    assert count_parameters("wan", config=wan_14b_transformer_config()) == 14_288_491_584
    assert count_parameters("cogvideox", component="vae") == 215_583_907
    assert 1.9e9 < count_parameters("ltx-video") < 2.0e9


def test_full_size_only_for_published_families():
    assert FULL_FAMILIES == ("cogvideox", "wan", "ltx-video")
    for family in ("hunyuanvideo", "mochi", "latte"):
        with pytest.raises(ValueError, match=f"size='full' is not available for '{family}'.*size='tiny'"):
            component_configs(family, "full")


def test_unknown_family_size_component_device():
    with pytest.raises(ValueError, match="Unknown family 'sora'.*cogvideox, wan, ltx-video"):
        build_pipeline("sora")
    with pytest.raises(ValueError, match="Unknown size 'medium'"):
        build_pipeline("wan", size="medium")
    with pytest.raises(ValueError, match="no module component 'unet'"):
        count_parameters("wan", component="unet")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match=r"torch.cuda.is_available\(\) is False.*device='cpu'"):
            build_transformer("wan", device="cuda")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_full_cogvideox_builds_on_the_gpu_quickly():
    start = time.perf_counter()
    with quiet():
        pipe = build_pipeline("cogvideox", size="full", device="cuda", dtype=torch.bfloat16)
    torch.cuda.synchronize()
    assert time.perf_counter() - start < 60
    assert pipe.transformer.dtype == torch.bfloat16 and pipe.transformer.device.type == "cuda"
    assert sum(p.numel() for p in pipe.transformer.parameters()) == 1_693_783_872


# ---------------------------------------------------------------------------
# tiny pipelines
# ---------------------------------------------------------------------------


def state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def test_tiny_build_is_deterministic_in_the_seed():
    with quiet():
        a, b, c = build_pipeline("wan", seed=0), build_pipeline("wan", seed=0), build_pipeline("wan", seed=1)
    for name in ("transformer", "vae", "text_encoder"):
        sa, sb, sc = state(getattr(a, name)), state(getattr(b, name)), state(getattr(c, name))
        assert sa.keys() == sb.keys()
        assert all(torch.equal(sa[k], sb[k]) for k in sa), name
        assert any(not torch.equal(sa[k], sc[k]) for k in sa), name


def test_building_does_not_touch_the_global_rng():
    torch.manual_seed(42)
    expected = torch.rand(3)
    torch.manual_seed(42)
    with quiet():
        build_transformer("cogvideox")
    assert torch.equal(torch.rand(3), expected)


@pytest.mark.parametrize("family", FAMILIES)
def test_tiny_pipelines_are_tiny_and_nontrivial(family):
    with quiet():
        pipe = build_pipeline(family)
    n = sum(p.numel() for p in pipe.transformer.parameters())
    assert n < 100_000, n
    assert type(pipe).__name__ == PIPELINE_CLASSES[family]
    # no parameter left constant by the init (zero-initialised output layers, unit norms)
    for name, p in pipe.transformer.named_parameters():
        assert p.numel() == 1 or p.min() < p.max(), name


def test_tiny_dtype_keeps_diffusers_fp32_modules():
    with quiet():
        pipe = build_pipeline("wan", dtype=torch.bfloat16)
    t = pipe.transformer
    assert t.blocks[0].attn1.to_q.weight.dtype == torch.bfloat16
    assert t.condition_embedder.time_embedder.linear_1.weight.dtype == torch.float32  # _keep_in_fp32_modules
    assert pipe.text_encoder.dtype == torch.bfloat16 and pipe.vae.dtype == torch.bfloat16


def test_t5_tokenizer_words_and_unknown_text():
    with quiet():
        tok = build_pipeline("cogvideox").tokenizer
    assert tok.model_max_length == component_configs("cogvideox")["transformer"]["max_text_seq_length"]
    words = tok("a red circle moving left").input_ids
    assert len(words) == 6 and words[-1] == tok.eos_token_id  # one token a word, then </s>
    odd = tok("Zebra-7!").input_ids
    assert tok.unk_token_id not in odd and len(odd) > 3  # unknown words fall back to characters


@pytest.mark.parametrize("family", FAMILIES)
def test_saved_tiny_pipeline_reloads_with_the_same_weights(saved_pipelines, family):
    directory = saved_pipelines[family]
    assert json.loads((directory / "model_index.json").read_text())["_class_name"] == PIPELINE_CLASSES[family]
    d = json.loads((directory / DEFAULTS_FILE).read_text())
    assert d == {k: getattr(tiny_defaults(family), k) for k in ("steps", "guidance", "frames", "height", "width")}
    with network_refused(), quiet():
        loaded = PipelineGenerator.from_pretrained(directory)
        built = build_pipeline(family, seed=0)
    for name in ("transformer", "vae", "text_encoder"):
        sa, sb = state(getattr(loaded.pipeline, name)), state(getattr(built, name))
        assert sa.keys() == sb.keys(), name
        assert all(torch.equal(sa[k], sb[k]) for k in sa), name
    assert loaded.pipeline.tokenizer("a red circle").input_ids == built.tokenizer("a red circle").input_ids
