"""PipelineGenerator: tiny random pipelines of every supported family, saved and reloaded through the
real loader; generation contract, transformer swap, per-step latents, recording/replay of transformer
calls, and every error path."""
from __future__ import annotations

import copy
import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from pipeline_fixtures import (  # noqa: F401 (fixtures)
    PROMPTS,
    SEEDS,
    generators,
    network_refused,
    one_torch_thread,
    quiet,
    saved_pipelines,
)

from workbench.models.generator import GenerationSettings, PromptTooLongError, nearest_valid
from workbench.models.random_pipelines import FAMILIES, build_pipeline, tiny_defaults
from workbench.models.video_pipeline import DEFAULTS_FILE, SUPPORTED_PIPELINES, PipelineError, PipelineGenerator

# What each family's pipeline passes its transformer (all as keyword arguments).
TRANSFORMER_INPUTS = {
    "cogvideox": {"hidden_states", "encoder_hidden_states", "timestep", "image_rotary_emb"},
    "wan": {"hidden_states", "timestep", "encoder_hidden_states"},
    "ltx-video": {"hidden_states", "encoder_hidden_states", "timestep", "encoder_attention_mask", "num_frames",
                  "height", "width", "rope_interpolation_scale"},
    "hunyuanvideo": {"hidden_states", "timestep", "encoder_hidden_states", "encoder_attention_mask",
                     "pooled_projections", "guidance"},
    "mochi": {"hidden_states", "encoder_hidden_states", "timestep", "encoder_attention_mask"},
    "latte": {"hidden_states", "encoder_hidden_states", "timestep", "enable_temporal_attentions"},
}  # fmt: skip


def calls_per_step(family: str, batch: int) -> tuple[int, int]:
    """(transformer calls per denoising step, batch size of each call) with guidance on."""
    if family == "wan":
        return 2, batch  # conditional and unconditional calls
    if family == "hunyuanvideo":
        return 1, batch  # embedded guidance: no unconditional pass
    if family == "latte":
        return batch, 2  # one pipeline call per prompt, cond + uncond concatenated
    return 1, 2 * batch  # cond + uncond concatenated


def clone_tree(x):
    if isinstance(x, torch.Tensor):
        return x.detach().clone()
    if isinstance(x, (tuple, list)):
        return type(x)(clone_tree(v) for v in x)
    if isinstance(x, dict):
        return {k: clone_tree(v) for k, v in x.items()}
    return x


def generate(gen: PipelineGenerator, *args, **kwargs) -> torch.Tensor:
    with network_refused(), quiet():
        return gen.generate(*args, **kwargs)


def copy_pipeline(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


# ---------------------------------------------------------------------------
# the generation contract
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_generate_contract(generators, family):
    gen = generators[family]
    d = gen.defaults()
    assert d == tiny_defaults(family)  # read back from generation_defaults.json
    steps = []
    videos = generate(gen, PROMPTS, SEEDS, on_step=lambda i, t, lat: steps.append((i, t, lat.detach().clone())))

    assert videos.shape == (2, 3, d.frames, d.height, d.width)
    assert videos.dtype == torch.float32 and videos.device.type == "cpu"
    assert torch.isfinite(videos).all() and videos.min() >= 0 and videos.max() <= 1
    assert videos.std() > 0.01
    assert (videos[0] - videos[1]).abs().max() > 1e-3  # different (prompt, seed) pairs differ

    # on_step: once per step, in order, decreasing timesteps, latents of the whole batch
    assert [s[0] for s in steps] == list(range(d.steps))
    assert all(a[1] > b[1] for a, b in zip(steps, steps[1:]))
    assert all(s[2].shape[0] == 2 and torch.isfinite(s[2]).all() for s in steps)
    assert not torch.equal(steps[0][2], steps[-1][2])

    # the same (prompt, seed) alone gives the same video: deterministic and batch-independent
    alone = generate(gen, PROMPTS[1:], SEEDS[1:])
    torch.testing.assert_close(alone[0], videos[1], atol=1e-5, rtol=0)


def test_settings_override_defaults_and_seed_changes_video(generators):
    gen = generators["ltx-video"]
    steps = []
    a = generate(gen, PROMPTS[:1], [0], GenerationSettings(steps=3, frames=17, height=64, width=32),
                 on_step=lambda i, t, latents: steps.append(i))  # fmt: skip
    assert a.shape == (1, 3, 17, 64, 32) and steps == [0, 1, 2]
    b = generate(gen, PROMPTS[:1], [1], GenerationSettings(steps=3, frames=17, height=64, width=32))
    assert (a - b).abs().max() > 1e-3


def test_progress_toggles_the_progress_bar(generators, capsys):
    gen = generators["ltx-video"]
    seen = []
    generate(gen, PROMPTS[:1], [0], progress=True, on_step=lambda *a: seen.append(gen.pipeline._progress_bar_config))
    assert [c.get("disable") for c in seen] == [False] * gen.defaults().steps
    shown = capsys.readouterr().err
    assert f"{gen.defaults().steps}/{gen.defaults().steps}" in shown
    assert gen.pipeline._progress_bar_config.get("disable") is True  # restored after the call
    generate(gen, PROMPTS[:1], [0])
    assert "/" not in capsys.readouterr().err


# ---------------------------------------------------------------------------
# swapping the transformer for one call
# ---------------------------------------------------------------------------


def perturbed_copy(module: torch.nn.Module, scale: float = 0.2) -> torch.nn.Module:
    other = copy.deepcopy(module)
    gen = torch.Generator().manual_seed(123)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(scale * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    return other


@pytest.mark.parametrize("family", FAMILIES)
def test_transformer_swap_is_used_and_restored(generators, family):
    gen = generators[family]
    original = gen.transformer
    config_entry = gen.pipeline.config["transformer"]
    other = perturbed_copy(original)
    calls = {"original": 0, "other": 0}
    h1 = original.register_forward_pre_hook(lambda m, a: calls.__setitem__("original", calls["original"] + 1))
    h2 = other.register_forward_pre_hook(lambda m, a: calls.__setitem__("other", calls["other"] + 1))
    try:
        swapped = generate(gen, PROMPTS[:1], SEEDS[:1], transformer=other)
        assert calls == {"original": 0, "other": gen.defaults().steps * calls_per_step(family, 1)[0]}
        assert gen.transformer is original and gen.pipeline.transformer is original
        assert gen.pipeline.config["transformer"] == config_entry
        reference = generate(gen, PROMPTS[:1], SEEDS[:1])
        assert calls["original"] > 0
    finally:
        h1.remove()
        h2.remove()
    assert (swapped - reference).abs().max() > 1e-3


def test_transformer_restored_when_the_swapped_one_fails(generators):
    gen = generators["cogvideox"]
    original = gen.transformer
    broken = copy.deepcopy(original)

    def boom(module, args):
        raise RuntimeError("boom")

    broken.register_forward_pre_hook(boom)
    with pytest.raises(RuntimeError, match="boom"):
        generate(gen, PROMPTS[:1], [0], transformer=broken)
    assert gen.transformer is original


def test_transformer_of_another_class_is_refused(generators):
    gen = generators["wan"]
    with pytest.raises(PipelineError, match=r"WanTransformer3DModel.*copy\.deepcopy"):
        generate(gen, PROMPTS[:1], [0], transformer=generators["cogvideox"].transformer)
    with pytest.raises(PipelineError, match="WanTransformer3DModel"):
        generate(gen, PROMPTS[:1], [0], transformer=torch.nn.Linear(2, 2))


# ---------------------------------------------------------------------------
# calibration: a forward pre-hook sees every transformer call, and replaying one is exact
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_forward_hooks_record_every_call_and_replay_exactly(generators, family):
    gen = generators[family]
    transformer = gen.transformer
    inputs, outputs = [], []
    pre = transformer.register_forward_pre_hook(
        lambda m, args, kwargs: inputs.append((clone_tree(args), clone_tree(kwargs))), with_kwargs=True
    )
    post = transformer.register_forward_hook(
        lambda m, args, kwargs, out: outputs.append(clone_tree(out)), with_kwargs=True
    )
    try:
        generate(gen, PROMPTS, SEEDS)
    finally:
        pre.remove()
        post.remove()

    per_step, batch = calls_per_step(family, len(PROMPTS))
    assert len(inputs) == len(outputs) == gen.defaults().steps * per_step
    for args, kwargs in inputs:
        assert args == ()  # every pipeline passes keyword arguments only
        assert TRANSFORMER_INPUTS[family] <= set(kwargs), set(kwargs)
        assert kwargs["hidden_states"].shape[0] == batch
    if family == "cogvideox":  # the tiny CogVideoX uses rotary embeddings, like CogVideoX-5B
        cos, sin = inputs[0][1]["image_rotary_emb"]
        assert cos.shape == sin.shape and cos.shape[0] > 0
    if family == "ltx-video":
        kw = inputs[0][1]
        assert (kw["num_frames"], kw["height"], kw["width"]) == (2, 1, 1)  # 9x32x32 video, 8x/32x VAE
    timesteps = [kw["timestep"].flatten()[0].item() for _, kw in inputs]
    runs = len(PROMPTS) if gen.spec.one_prompt_per_call else 1  # Latte: one pipeline call per prompt
    for run in range(runs):
        ts = timesteps[run * len(timesteps) // runs : (run + 1) * len(timesteps) // runs]
        assert ts == sorted(ts, reverse=True) and ts[0] > ts[-1]

    with torch.no_grad(), quiet():
        for (args, kwargs), expected in zip(inputs, outputs):
            replayed = transformer(*args, **kwargs)
            assert torch.equal(replayed[0], expected[0])


# ---------------------------------------------------------------------------
# defaults and saving
# ---------------------------------------------------------------------------


def test_defaults_rule_without_the_defaults_file(saved_pipelines, tmp_path):
    cog = copy_pipeline(saved_pipelines["cogvideox"], tmp_path / "cog")
    wan = copy_pipeline(saved_pipelines["wan"], tmp_path / "wan")
    latte = copy_pipeline(saved_pipelines["latte"], tmp_path / "latte")
    for d in (cog, wan, latte):
        (d / DEFAULTS_FILE).unlink()
    with network_refused(), quiet():
        # CogVideoX and Latte: sizes from the transformer config, steps/guidance as published
        assert PipelineGenerator.from_pretrained(cog).defaults() == GenerationSettings(50, 6.0, 9, 32, 32)
        assert PipelineGenerator.from_pretrained(latte).defaults() == GenerationSettings(50, 7.5, 4, 32, 32)
        # Wan states no sample size: the published Wan2.1 defaults
        assert PipelineGenerator.from_pretrained(wan).defaults() == GenerationSettings(50, 5.0, 81, 480, 832)


def test_partial_defaults_file_and_invalid_one(saved_pipelines, tmp_path):
    wan = copy_pipeline(saved_pipelines["wan"], tmp_path / "wan")
    (wan / DEFAULTS_FILE).write_text(json.dumps({"steps": 3, "height": 64}))
    with network_refused(), quiet():
        assert PipelineGenerator.from_pretrained(wan).defaults() == GenerationSettings(3, 5.0, 81, 64, 832)
        (wan / DEFAULTS_FILE).write_text(json.dumps({"steps": 3, "fps": 8}))
        with pytest.raises(PipelineError, match=r"unknown keys \['fps'\]"):
            PipelineGenerator.from_pretrained(wan)
        (wan / DEFAULTS_FILE).write_text(json.dumps({"steps": 0}))
        with pytest.raises(PipelineError, match="steps=0"):
            PipelineGenerator.from_pretrained(wan)


def test_in_memory_pipeline_saves_and_reloads_to_the_same_videos(tmp_path):
    with network_refused(), quiet():
        built = PipelineGenerator(build_pipeline("ltx-video", seed=5), defaults=tiny_defaults("ltx-video"))
        out = built.save_pretrained(tmp_path / "ltx")
        loaded = PipelineGenerator.from_pretrained(out, name="reloaded")
    assert loaded.name == "reloaded" and loaded.family == "ltx-video"
    assert loaded.defaults() == built.defaults()
    assert loaded.device.type == "cpu" and loaded.dtype == torch.float32
    torch.testing.assert_close(generate(loaded, PROMPTS, SEEDS), generate(built, PROMPTS, SEEDS), atol=0, rtol=0)


def test_bfloat16_load(saved_pipelines):
    with network_refused(), quiet():
        gen = PipelineGenerator.from_pretrained(saved_pipelines["wan"], dtype=torch.bfloat16)
        video = gen.generate(PROMPTS[:1], [0], GenerationSettings(steps=1))
    assert gen.dtype == torch.bfloat16
    assert gen.transformer.blocks[0].attn1.to_q.weight.dtype == torch.bfloat16
    assert video.dtype == torch.float32 and torch.isfinite(video).all()


# ---------------------------------------------------------------------------
# errors
# ---------------------------------------------------------------------------


def test_error_not_a_pipeline_directory(saved_pipelines, tmp_path):
    with pytest.raises(PipelineError, match="does not exist"):
        PipelineGenerator.from_pretrained(tmp_path / "missing")
    with pytest.raises(PipelineError, match="is a file"):
        PipelineGenerator.from_pretrained(saved_pipelines["wan"] / "model_index.json")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(PipelineError, match="not a diffusers pipeline directory"):
        PipelineGenerator.from_pretrained(empty)
    bare = shutil.copytree(saved_pipelines["wan"] / "transformer", tmp_path / "bare")
    with pytest.raises(PipelineError, match=r"bare model.*workbench\.models\.load"):
        PipelineGenerator.from_pretrained(bare)


def test_error_unsupported_pipeline_lists_supported(saved_pipelines, tmp_path):
    d = copy_pipeline(saved_pipelines["wan"], tmp_path / "sd")
    index = json.loads((d / "model_index.json").read_text())
    index["_class_name"] = "StableDiffusionPipeline"
    (d / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(PipelineError) as err:
        PipelineGenerator.from_pretrained(d)
    assert "'StableDiffusionPipeline'" in str(err.value)
    assert all(name in str(err.value) for name in SUPPORTED_PIPELINES)


@pytest.mark.parametrize("component", ["vae", "text_encoder", "tokenizer"])
def test_error_missing_component_folder(saved_pipelines, tmp_path, component):
    d = copy_pipeline(saved_pipelines["cogvideox"], tmp_path / "cog")
    shutil.rmtree(d / component)
    with pytest.raises(PipelineError) as err:
        PipelineGenerator.from_pretrained(d)
    msg = str(err.value)
    assert f"has no {component} " in msg and f"copy the {component}/ folder" in msg and "is missing" in msg


@pytest.mark.parametrize("component", ["vae", "text_encoder", "text_encoder_2"])
def test_error_missing_component_in_model_index(saved_pipelines, tmp_path, component):
    d = copy_pipeline(saved_pipelines["hunyuanvideo"], tmp_path / "hy")
    index = json.loads((d / "model_index.json").read_text())
    index[component] = [None, None]
    (d / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(PipelineError, match=rf"has no {component} .*lists no {component}.*save_pretrained"):
        PipelineGenerator.from_pretrained(d)


def test_error_corrupt_weights_are_wrapped(saved_pipelines, tmp_path):
    d = copy_pipeline(saved_pipelines["wan"], tmp_path / "wan")
    (d / "transformer" / "diffusion_pytorch_model.safetensors").write_bytes(b"not a safetensors file")
    with network_refused(), quiet():
        with pytest.raises(PipelineError, match=r"Could not load the pipeline in .*complete on disk"):
            PipelineGenerator.from_pretrained(d)


def test_error_in_memory_pipeline_without_vae():
    with quiet():
        pipe = build_pipeline("wan")
    pipe.vae = None
    with pytest.raises(PipelineError, match=r"has no vae .*pass vae="):
        PipelineGenerator(pipe)


def test_error_cuda_unavailable(saved_pipelines, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(PipelineError) as err:
        PipelineGenerator.from_pretrained(saved_pipelines["wan"], device="cuda")
    assert "torch.cuda.is_available() is False" in str(err.value) and "--device cpu" in str(err.value)
    with pytest.raises(PipelineError, match="not a torch device"):
        PipelineGenerator.from_pretrained(saved_pipelines["wan"], device="gpu0")


def test_error_bad_dtype(saved_pipelines):
    with pytest.raises(PipelineError, match="floating torch.dtype"):
        PipelineGenerator.from_pretrained(saved_pipelines["wan"], dtype=torch.int8)


@pytest.mark.parametrize(
    "family, settings, expected",
    [
        ("cogvideox", GenerationSettings(frames=10), [r"frames=10", r"4k\+1", r"nearest valid: 9 or 13"]),
        ("cogvideox", GenerationSettings(height=40), [r"height=40", r"multiple of 16", r"32 or 48"]),
        ("wan", GenerationSettings(frames=6, width=20), [r"frames=6", r"5 or 9", r"width=20", r"16 or 32"]),
        ("ltx-video", GenerationSettings(frames=10, height=48), [r"8k\+1", r"9 or 17", r"multiple of 32", r"32 or 64"]),
        ("hunyuanvideo", GenerationSettings(frames=3), [r"4k\+1", r"1 or 5"]),
        ("mochi", GenerationSettings(frames=8), [r"6k\+1", r"7 or 13"]),
        ("latte", GenerationSettings(frames=5), [r"exactly 4 frames", r"pass frames=4"]),
        ("latte", GenerationSettings(width=8), [r"width=8", r"nearest valid: 16"]),
        ("ltx-video", GenerationSettings(steps=1), [r"steps=1", r"at least 2 denoising steps", r"pass steps=2"]),
        ("mochi", GenerationSettings(steps=1), [r"at least 2 denoising steps"]),
    ],
)  # fmt: skip
def test_error_unsupported_size_names_valid_values(generators, family, settings, expected):
    gen = generators[family]
    calls = []
    handle = gen.transformer.register_forward_pre_hook(lambda m, a: calls.append(1))
    try:
        with pytest.raises(PipelineError) as err:
            gen.generate(PROMPTS[:1], [0], settings)
    finally:
        handle.remove()
    for pattern in expected:
        assert re.search(pattern, str(err.value)), (pattern, str(err.value))
    assert calls == []  # refused before any compute


@pytest.mark.parametrize("family", ["cogvideox", "wan", "ltx-video", "mochi", "latte"])
def test_prompt_length_limit_is_exact(generators, family):
    gen = generators[family]
    limit = gen.max_text_length
    fits = " ".join(["circle"] * (limit - 1))  # one token a word, plus </s>
    gen.check_prompts(["a cat", fits])
    too_long = fits + " circle"
    with pytest.raises(PromptTooLongError) as err:
        gen.check_prompts(["a cat", too_long])
    msg = str(err.value)
    assert isinstance(err.value, ValueError)
    assert f"is {limit + 1} tokens" in msg and f"at most {limit}" in msg and "prompt 1" in msg
    assert repr(too_long[:77] + "...") in msg and too_long not in msg  # named, cut to 80 characters


def test_prompt_too_long_refused_before_generation(generators):
    gen = generators["hunyuanvideo"]
    prompt = "a red circle moving left " * 20  # > 77 CLIP tokens
    with pytest.raises(PromptTooLongError, match=r"CLIP text encoder .* at most 77"):
        gen.generate([prompt], [0])
    gen.check_prompts([PROMPTS[0]])


def test_hunyuan_template_crop_removes_exactly_the_template(generators):
    from diffusers.pipelines.hunyuan_video.pipeline_hunyuan_video import DEFAULT_PROMPT_TEMPLATE as T

    tok = generators["hunyuanvideo"].pipeline.tokenizer
    prefix = T["template"].split("{}")[0]
    assert len(tok(prefix).input_ids) == T["crop_start"]
    ids = tok(T["template"].format("a red circle")).input_ids[T["crop_start"] :]
    assert tok.decode(ids).replace(" ", "").startswith("aredcircle")


def test_generate_batch_validation(generators):
    gen = generators["wan"]
    with pytest.raises(ValueError, match="one seed per prompt"):
        gen.generate(PROMPTS, [0])
    with pytest.raises(ValueError, match="not one string"):
        gen.generate("a cat", [0])
    with pytest.raises(ValueError, match="empty"):
        gen.generate([], [])
    with pytest.raises(ValueError, match=r"seeds\[0\]"):
        gen.generate(["a cat"], [-1])
    with pytest.raises(PipelineError, match="GenerationSettings"):
        gen.generate(["a cat"], [0], {"steps": 2})


# ---------------------------------------------------------------------------
# GenerationSettings
# ---------------------------------------------------------------------------


def test_generation_settings_validation_and_resolution():
    d = GenerationSettings(50, 6.0, 49, 480, 720)
    assert GenerationSettings(steps=2, width=64).resolved(d) == GenerationSettings(2, 6.0, 49, 480, 64)
    assert GenerationSettings().resolved(d) == d and d.is_complete() and not GenerationSettings().is_complete()
    assert isinstance(GenerationSettings(guidance=3).guidance, float)
    for kwargs, pattern in [
        (dict(steps=0), "steps=0 is out of range.*between 1 and 1000"),
        (dict(steps=1001), "steps=1001"),
        (dict(steps=2.5), "steps must be an int"),
        (dict(guidance=-1.0), r"guidance=-1.0 is out of range.*\[0, 100\)"),
        (dict(guidance=100.0), "guidance=100.0"),
        (dict(guidance=float("nan")), "guidance=nan"),
        (dict(frames=0), "frames=0 is not a size.*positive number of frames"),
        (dict(height=-8), "height=-8"),
        (dict(width=True), "width must be a positive int"),
    ]:
        with pytest.raises(ValueError, match=pattern):
            GenerationSettings(**kwargs)


def test_nearest_valid():
    assert nearest_valid(10, 4, 1) == [9, 13]
    assert nearest_valid(9, 4, 1) == [9, 13]
    assert nearest_valid(40, 16) == [32, 48]
    assert nearest_valid(5, 16) == [16]
