"""Any local diffusers text-to-video pipeline as a workbench :class:`~workbench.models.generator.Generator`.

``PipelineGenerator.from_pretrained(path)`` loads a pipeline directory (``model_index.json``) strictly
offline and checks, before any compute, that the pipeline is supported and complete, that the device
exists, that the video size fits the model and that no prompt would be silently truncated.

Defaults (``defaults()``), most specific first:

1. ``generation_defaults.json`` in the pipeline directory (written by ``save_pretrained`` when the
   generator was given explicit defaults, e.g. the tiny random pipelines of ``random_pipelines``);
2. sizes the pipeline's own config states: CogVideoX ``transformer.sample_frames`` and
   ``sample_height/sample_width`` x the VAE's spatial factor, Latte ``transformer.video_length`` and
   ``sample_size`` x the VAE factor (CogVideoXPipeline itself falls back to the same sizes);
3. the published model's settings in :data:`FAMILIES`.

Per-step latents come from ``callback_on_step_end`` (``callback_on_step_end_tensor_inputs=["latents"]``);
calibration hooks ``generator.transformer`` with ``register_forward_pre_hook(with_kwargs=True)``: every
pipeline calls its transformer with keyword arguments only.
"""
from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .generator import (
    GenerationSettings,
    Generator,
    PromptTooLongError,
    StepCallback,
    check_prompts_and_seeds,
    check_sizes,
    shorten,
)

__all__ = [
    "DEFAULTS_FILE", "FAMILIES", "FamilySpec", "PipelineError", "PipelineGenerator", "SUPPORTED_PIPELINES",
    "parse_device",
]

DEFAULTS_FILE = "generation_defaults.json"
MODEL_INDEX = "model_index.json"


class PipelineError(ValueError):
    """A pipeline cannot be loaded or cannot run with these inputs; the message names the fix."""


@dataclass(frozen=True)
class FamilySpec:
    """What differs between the supported pipeline classes.

    ``temporal(pipe)`` is the VAE's time compression t (frames must be t*k + 1), or None when the frame
    count is fixed by the model (Latte); ``spatial(pipe)`` is the multiple height and width must have
    (VAE factor x patch size, and the pipeline's own ``check_inputs`` rule).
    """

    family: str
    published: GenerationSettings
    text_length: int
    temporal: Callable[[Any], int | None]
    spatial: Callable[[Any], int]
    frames_arg: str = "num_frames"
    text_length_arg: str | None = "max_sequence_length"
    text_components: tuple[str, ...] = ("text_encoder", "tokenizer")
    call_kwargs: dict[str, Any] = field(default_factory=dict)
    one_prompt_per_call: bool = False
    min_steps: int = 1


def _patch(pipe: Any) -> int:
    p = pipe.transformer.config.patch_size
    return int(max(p[1:]) if isinstance(p, (tuple, list)) else p)


FAMILIES: dict[str, FamilySpec] = {
    # THUDM/CogVideoX-2b: 49 x 480 x 720, 50 steps, guidance 6; T5 text padded to 226 tokens.
    "CogVideoXPipeline": FamilySpec(
        "cogvideox", GenerationSettings(50, 6.0, 49, 480, 720), 226,
        temporal=lambda p: int(p.vae_scale_factor_temporal),
        spatial=lambda p: math.lcm(8, p.vae_scale_factor_spatial * _patch(p)),
    ),
    # Wan-AI/Wan2.1-T2V-1.3B: 81 x 480 x 832, 50 steps, guidance 5; UMT5 text up to 512 tokens.
    "WanPipeline": FamilySpec(
        "wan", GenerationSettings(50, 5.0, 81, 480, 832), 512,
        temporal=lambda p: int(p.vae_scale_factor_temporal),
        spatial=lambda p: math.lcm(16, p.vae_scale_factor_spatial * _patch(p)),
    ),
    # Lightricks/LTX-Video: 161 x 512 x 704 (the pipeline's defaults), 50 steps, guidance 3; T5, 128 tokens.
    "LTXPipeline": FamilySpec(
        "ltx-video", GenerationSettings(50, 3.0, 161, 512, 704), 128,
        temporal=lambda p: int(p.vae_temporal_compression_ratio),
        spatial=lambda p: math.lcm(32, p.vae_spatial_compression_ratio * p.transformer_spatial_patch_size),
        min_steps=2,  # one step: the sigma schedule stretched to shift_terminal divides by zero
    ),
    # hunyuanvideo-community/HunyuanVideo: 129 x 720 x 1280, 50 steps, embedded guidance 6; Llama 256 tokens
    # (after the prompt template) + CLIP 77 tokens.
    "HunyuanVideoPipeline": FamilySpec(
        "hunyuanvideo", GenerationSettings(50, 6.0, 129, 720, 1280), 256,
        temporal=lambda p: int(p.vae_scale_factor_temporal),
        spatial=lambda p: math.lcm(16, p.vae_scale_factor_spatial * _patch(p)),
        text_components=("text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2"),
    ),
    # genmo/mochi-1-preview: 163 x 480 x 848 (5.4 s at 30 fps), 64 steps, guidance 4.5; T5, 256 tokens.
    "MochiPipeline": FamilySpec(
        "mochi", GenerationSettings(64, 4.5, 163, 480, 848), 256,
        temporal=lambda p: int(p.vae_temporal_scale_factor),
        spatial=lambda p: math.lcm(8, p.vae_spatial_scale_factor * _patch(p)),
        min_steps=2,  # one step: the linear-quadratic sigma schedule divides by zero
    ),
    # maxin-cn/Latte-1: 16 x 512 x 512, 50 steps, guidance 7.5; T5 text fixed at 120 tokens. clean_caption
    # would need bs4 + ftfy, so captions are used as written. With one prompt the pipeline trims the text
    # embeddings to the prompt's length, with several it zero-masks them at 120 tokens: a video would
    # depend on its batch, so Latte runs one prompt per pipeline call.
    "LattePipeline": FamilySpec(
        "latte", GenerationSettings(50, 7.5, 16, 512, 512), 120,
        temporal=lambda p: None,
        spatial=lambda p: math.lcm(8, p.vae_scale_factor * _patch(p)),
        frames_arg="video_length", text_length_arg=None, call_kwargs={"clean_caption": False},
        one_prompt_per_call=True,
    ),
}  # fmt: skip
SUPPORTED_PIPELINES: tuple[str, ...] = tuple(FAMILIES)

_ROLES = {
    "transformer": "the denoising transformer",
    "vae": "the VAE that decodes latents into frames",
    "text_encoder": "the text encoder that turns prompts into embeddings",
    "tokenizer": "the tokenizer of the text encoder",
    "text_encoder_2": "the second (CLIP) text encoder",
    "tokenizer_2": "the tokenizer of the second (CLIP) text encoder",
    "scheduler": "the noise scheduler",
}


def parse_device(device: str | torch.device) -> torch.device:
    """``torch.device(device)``, refusing CUDA where there is none (with the fix)."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise PipelineError(f"device={device!r} is not a torch device ({exc}); pass 'cpu' or 'cuda'") from exc
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise PipelineError(
            f"device={str(device)!r} asks for CUDA, but torch.cuda.is_available() is False on this machine "
            "(no GPU, or a CPU-only torch build): pass device='cpu' (--device cpu)"
        )
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise PipelineError(
            f"device={str(device)!r} does not exist: this machine has {torch.cuda.device_count()} CUDA device(s); "
            "pass device='cuda' or 'cuda:0'"
        )
    return dev


def _missing_component(path: Path | None, class_name: str, name: str, why: str) -> PipelineError:
    where = f"{path} ({class_name})" if path is not None else class_name
    fix = (
        f"copy the {name}/ folder from the original checkpoint into {path} and list it in {MODEL_INDEX}, or "
        "re-save the complete pipeline with save_pretrained()"
        if path is not None
        else f"pass {name}= when building the pipeline"
    )
    return PipelineError(f"{where} has no {name} ({_ROLES[name]}): {why}. Generation needs it: {fix}.")


def _required(spec: FamilySpec) -> tuple[str, ...]:
    return ("transformer", "vae", *spec.text_components, "scheduler")


def _check_directory(path: Path) -> tuple[str, FamilySpec]:
    """Validate a pipeline directory before diffusers touches it: supported class, every component present."""
    if not path.exists():
        raise PipelineError(f"{path} does not exist: pass a local diffusers pipeline directory (with {MODEL_INDEX})")
    if not path.is_dir():
        raise PipelineError(f"{path} is a file: pass the pipeline directory that holds {MODEL_INDEX}")
    index_file = path / MODEL_INDEX
    if not index_file.is_file():
        hint = ""
        if (path / "config.json").is_file():
            hint = (
                " It holds a config.json, i.e. a bare model: generation needs the whole pipeline (text encoder, "
                "VAE, scheduler); load a bare transformer with workbench.models.load() instead."
            )
        raise PipelineError(
            f"{path} is not a diffusers pipeline directory: it has no {MODEL_INDEX}.{hint} Pass a directory "
            f"saved with DiffusionPipeline.save_pretrained(). Supported pipelines: {', '.join(SUPPORTED_PIPELINES)}."
        )
    try:
        index = json.loads(index_file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise PipelineError(f"{index_file} is not readable JSON ({exc}): re-save the pipeline") from exc
    class_name = index.get("_class_name") if isinstance(index, dict) else None
    if class_name not in FAMILIES:
        raise PipelineError(
            f"{path} holds a {class_name!r} pipeline, which the workbench does not support. Supported text-to-video "
            f"pipelines: {', '.join(SUPPORTED_PIPELINES)}."
        )
    spec = FAMILIES[class_name]
    for name in _required(spec):
        entry = index.get(name)
        if not isinstance(entry, (list, tuple)) or len(entry) != 2 or entry[0] is None or entry[1] is None:
            raise _missing_component(path, class_name, name, f"{MODEL_INDEX} lists no {name}")
        if not (path / name).is_dir():
            raise _missing_component(path, class_name, name, f"the folder {path / name} is missing")
    return class_name, spec


def _read_defaults_file(path: Path) -> GenerationSettings | None:
    file = path / DEFAULTS_FILE
    if not file.is_file():
        return None
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
        if not isinstance(data, dict):
            raise ValueError(f"expected a JSON object, got {type(data).__name__}")
        names = {f.name for f in fields(GenerationSettings)}
        unknown = set(data) - names
        if unknown:
            raise ValueError(f"unknown keys {sorted(unknown)}; allowed: {sorted(names)}")
        return GenerationSettings(**data)
    except (OSError, ValueError, TypeError) as exc:
        raise PipelineError(f"{file} is invalid ({exc}): fix or delete it") from exc


class PipelineGenerator(Generator):
    """A diffusers text-to-video pipeline behind the workbench's :class:`Generator` interface."""

    def __init__(
        self,
        pipeline: Any,
        *,
        name: str | None = None,
        defaults: GenerationSettings | None = None,
    ) -> None:
        class_name = type(pipeline).__name__
        if class_name not in FAMILIES:
            raise PipelineError(
                f"{class_name} is not a supported pipeline; supported: {', '.join(SUPPORTED_PIPELINES)}"
            )
        if defaults is not None and not isinstance(defaults, GenerationSettings):
            raise PipelineError(f"defaults must be a GenerationSettings, got {type(defaults).__name__}")
        self.spec = FAMILIES[class_name]
        for comp in _required(self.spec):
            if getattr(pipeline, comp, None) is None:
                raise _missing_component(None, class_name, comp, "the pipeline was built without it")
        self.pipeline = pipeline
        self.family = self.spec.family
        self.name = name or self.family
        self.path: Path | None = None  # the folder it was loaded from (what a saved run names)
        self._overrides = defaults
        self.pipeline.set_progress_bar_config(disable=True)

    # -- construction -------------------------------------------------------------------------

    @classmethod
    def from_pretrained(
        cls,
        path: str | os.PathLike[str],
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        name: str | None = None,
    ) -> PipelineGenerator:
        """Load the pipeline saved in the local directory ``path`` (never the network)."""
        directory = Path(os.fspath(path)).expanduser()
        dev = parse_device(device)
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise PipelineError(f"dtype must be a floating torch.dtype (torch.float32, torch.bfloat16), got {dtype!r}")
        _check_directory(directory)
        overrides = _read_defaults_file(directory)

        from diffusers import DiffusionPipeline

        from workbench.models.loading import hub_offline

        with hub_offline():
            try:
                # diffusers 0.42 deprecates torch_dtype= in favour of dtype=
                pipe = DiffusionPipeline.from_pretrained(str(directory.resolve()), local_files_only=True, dtype=dtype)
            except Exception as exc:
                raise PipelineError(
                    f"Could not load the pipeline in {directory}: {type(exc).__name__}: {exc}. Check that every "
                    f"component in {MODEL_INDEX} is complete on disk (nothing can be downloaded)."
                ) from exc
        pipe.to(dev)
        gen = cls(pipe, name=name or directory.resolve().name, defaults=overrides)
        gen.path = directory.resolve()
        return gen

    def save_pretrained(self, path: str | os.PathLike[str]) -> Path:
        """``pipeline.save_pretrained(path)``, plus ``generation_defaults.json`` when defaults were given."""
        out = Path(os.fspath(path))
        self.pipeline.save_pretrained(str(out))
        if self._overrides is not None:
            payload = {f.name: getattr(self._overrides, f.name) for f in fields(GenerationSettings)}
            payload = {k: v for k, v in payload.items() if v is not None}
            (out / DEFAULTS_FILE).write_text(json.dumps(payload, indent=1) + "\n", encoding="utf-8")
        return out

    # -- attributes -----------------------------------------------------------------------------

    @property
    def one_prompt_per_call(self) -> bool:
        """True for pipelines whose videos depend on the batch (Latte): callers generate one prompt a call."""
        return bool(self.spec.one_prompt_per_call)

    def describe(self) -> dict:
        return {"name": self.name, "class": type(self).__name__, "pipeline": type(self.pipeline).__name__,
                "family": self.family, "path": None if self.path is None else str(self.path)}

    @property
    def transformer(self) -> nn.Module:
        return self.pipeline.transformer

    @property
    def device(self) -> torch.device:  # type: ignore[override]
        return next(self.pipeline.transformer.parameters()).device

    @property
    def dtype(self) -> torch.dtype:  # type: ignore[override]
        return self.pipeline.transformer.dtype

    @property
    def max_text_length(self) -> int:
        """Tokens the text encoder takes: CogVideoX exactly the transformer's ``max_text_seq_length`` (its
        positional table has that many text slots); Latte and HunyuanVideo the family's fixed length; the
        others the family's length, capped by the tokenizer's ``model_max_length``."""
        pipe = self.pipeline
        if self.family == "cogvideox":
            return int(pipe.transformer.config.max_text_seq_length)
        if self.spec.text_length_arg is None or self.family == "hunyuanvideo":
            return self.spec.text_length
        return int(min(self.spec.text_length, getattr(pipe.tokenizer, "model_max_length", self.spec.text_length)))

    def defaults(self) -> GenerationSettings:
        settings = self.spec.published
        cfg = self.pipeline.transformer.config
        if self.family == "cogvideox":
            s = self.pipeline.vae_scale_factor_spatial
            settings = GenerationSettings(settings.steps, settings.guidance, int(cfg.sample_frames),
                                          int(cfg.sample_height) * s, int(cfg.sample_width) * s)  # fmt: skip
        elif self.family == "latte":
            side = int(cfg.sample_size) * self.pipeline.vae_scale_factor
            settings = GenerationSettings(settings.steps, settings.guidance, int(cfg.video_length), side, side)
        if self._overrides is not None:
            settings = self._overrides.resolved(settings)
        return settings

    # -- checks ---------------------------------------------------------------------------------

    def check_settings(self, settings: GenerationSettings) -> None:
        """Raise :class:`PipelineError` naming the nearest valid values when the size does not fit."""
        pipe, model = self.pipeline, f"{type(self.pipeline).__name__} ({self.name})"
        if settings.steps is not None and settings.steps < self.spec.min_steps:
            raise PipelineError(
                f"steps={settings.steps}: {model} needs at least {self.spec.min_steps} denoising steps (its "
                f"scheduler's sigma schedule is undefined for fewer); pass steps={self.spec.min_steps}"
            )
        temporal, spatial = self.spec.temporal(pipe), self.spec.spatial(pipe)
        exact = None
        if temporal is None:
            exact = int(pipe.transformer.config.video_length)
        try:
            check_sizes(
                settings, model=model, frame_multiple=temporal or 1, frame_offset=1, size_multiple=spatial,
                frames_exact=exact,
                why_frames=(" (its temporal position table has that many entries)" if exact is not None
                            else f" (the VAE compresses time {temporal}x, keeping the first frame)"),
                why_size=" (VAE spatial factor x patch size)",
            )  # fmt: skip
        except ValueError as exc:
            raise PipelineError(str(exc)) from None
        cfg = pipe.transformer.config
        if self.family == "cogvideox" and cfg.get("use_learned_positional_embeddings", False):
            d = self.defaults()
            if (settings.frames, settings.height, settings.width) != (d.frames, d.height, d.width):
                raise PipelineError(
                    f"{model} has learned positional embeddings for one size only: pass frames={d.frames}, "
                    f"height={d.height}, width={d.width}"
                )

    def _token_counts(self, prompt: str) -> list[tuple[int, int, str]]:
        """``(tokens, limit, what)`` for each text encoder the prompt goes through."""
        pipe = self.pipeline
        if self.family == "hunyuanvideo":
            from diffusers.pipelines.hunyuan_video.pipeline_hunyuan_video import DEFAULT_PROMPT_TEMPLATE

            templated = DEFAULT_PROMPT_TEMPLATE["template"].format(prompt)
            llama = len(pipe.tokenizer(templated, verbose=False).input_ids) - int(DEFAULT_PROMPT_TEMPLATE["crop_start"])
            clip = len(pipe.tokenizer_2(prompt, verbose=False).input_ids)
            return [(llama, self.max_text_length, "Llama text encoder (after the prompt template)"),
                    (clip, 77, "CLIP text encoder")]  # fmt: skip
        n = len(pipe.tokenizer(prompt, add_special_tokens=True, verbose=False).input_ids)
        return [(n, self.max_text_length, f"{type(pipe.text_encoder).__name__} text encoder")]

    def check_prompts(self, prompts: list[str]) -> None:
        for i, prompt in enumerate(prompts):
            for n, limit, what in self._token_counts(prompt):
                if n > limit:
                    raise PromptTooLongError(
                        f"prompt {i} ({shorten(prompt)!r}) is {n} tokens, but the {what} of {self.name} takes at "
                        f"most {limit}; the rest would be cut off silently. Shorten the prompt to {limit} tokens."
                    )

    # -- generation -----------------------------------------------------------------------------

    def _check_transformer(self, transformer: nn.Module) -> None:
        expected = type(self.pipeline.transformer)
        inner = getattr(transformer, "_orig_mod", transformer)  # torch.compile wrapper
        if not isinstance(inner, expected):
            raise PipelineError(
                f"transformer= must be a {expected.__name__} (the pipeline reads its config and calls it with "
                f"{expected.__name__}'s arguments), got {type(transformer).__name__}: pass a copy of "
                "generator.transformer with its layers replaced (e.g. copy.deepcopy + quantize)."
            )

    @contextmanager
    def _transformer_swapped(self, transformer: nn.Module | None) -> Iterator[None]:
        """Use ``transformer`` in the pipeline for the duration of the block; always restore the original.

        The pipeline's ``__dict__`` entry is swapped directly, so its config (what save_pretrained
        writes) never records the temporary module.
        """
        if transformer is None:
            yield
            return
        self._check_transformer(transformer)
        original = self.pipeline.__dict__["transformer"]
        self.pipeline.__dict__["transformer"] = transformer
        try:
            yield
        finally:
            self.pipeline.__dict__["transformer"] = original

    def generate(
        self,
        prompts: list[str],
        seeds: list[int],
        settings: GenerationSettings | None = None,
        *,
        transformer: nn.Module | None = None,
        progress: bool = False,
        on_step: StepCallback | None = None,
        decode: bool = True,
    ) -> torch.Tensor | None:
        """Videos ``(B, 3, F, H, W)`` float32 on the CPU in [0, 1]; see :class:`Generator`.

        ``decode=False`` runs only the denoising loop (no VAE decode; calibration needs nothing more) and
        returns None.

        ``on_step(i, t, latents)`` receives the latents in the pipeline's own layout (CogVideoX
        ``(B, F, C, H, W)``, LTX packed ``(B, tokens, C)``, others ``(B, C, F, H, W)``); do not modify them.
        Families with ``one_prompt_per_call`` (Latte) run one pipeline call per prompt; their ``on_step``
        calls come after the last prompt, with the latents concatenated over the batch.
        """
        prompts, seeds = check_prompts_and_seeds(prompts, seeds)
        if settings is not None and not isinstance(settings, GenerationSettings):
            raise PipelineError(f"settings must be a GenerationSettings, got {type(settings).__name__}")
        s = (settings or GenerationSettings()).resolved(self.defaults())
        self.check_settings(s)
        self.check_prompts(prompts)

        self.pipeline.set_progress_bar_config(disable=not progress)
        try:
            with self._transformer_swapped(transformer):
                if not self.spec.one_prompt_per_call:
                    frames = self._call(prompts, seeds, s, on_step, decode)
                else:
                    frames, steps = self._call_one_by_one(prompts, seeds, s, record=on_step is not None, decode=decode)
                    for i, (t, latents) in enumerate(steps):
                        on_step(i, t, latents)  # type: ignore[misc]
        finally:
            self.pipeline.set_progress_bar_config(disable=True)
        if not decode:
            return None
        # (B, F, C, H, W) in [0, 1] -> (B, C, F, H, W) float32 on the CPU
        video = torch.as_tensor(frames).permute(0, 2, 1, 3, 4).float().cpu().contiguous()
        expected = (len(prompts), 3, s.frames, s.height, s.width)
        if tuple(video.shape) != expected:
            raise PipelineError(
                f"{type(self.pipeline).__name__} returned videos of shape {tuple(video.shape)}, expected {expected}: "
                "the pipeline changed the requested size; report this with the settings used."
            )
        return video.clamp_(0.0, 1.0)

    def _call(self, prompts: list[str], seeds: list[int], s: GenerationSettings,
              on_step: StepCallback | None, decode: bool = True) -> torch.Tensor:  # fmt: skip
        """One pipeline call for the whole batch; returns its ``(B, F, C, H, W)`` frames."""
        device = self.device
        kwargs: dict[str, Any] = dict(
            prompt=prompts,
            negative_prompt=[""] * len(prompts),
            num_inference_steps=s.steps,
            guidance_scale=s.guidance,
            height=s.height,
            width=s.width,
            generator=[torch.Generator(device=device).manual_seed(seed) for seed in seeds],
            output_type="pt" if decode else "latent",
            return_dict=True,
            **self.spec.call_kwargs,
        )
        kwargs[self.spec.frames_arg] = s.frames
        if self.spec.text_length_arg is not None:
            kwargs[self.spec.text_length_arg] = self.max_text_length
        if on_step is not None:

            def callback(pipe: Any, step: int, timestep: Any, tensors: dict[str, torch.Tensor]) -> dict:
                on_step(int(step), float(timestep), tensors["latents"])
                return {}

            kwargs["callback_on_step_end"] = callback
            kwargs["callback_on_step_end_tensor_inputs"] = ["latents"]
        return self.pipeline(**kwargs).frames

    def _call_one_by_one(self, prompts: list[str], seeds: list[int], s: GenerationSettings,
                         record: bool, decode: bool = True) -> tuple[torch.Tensor, list[tuple[float, torch.Tensor]]]:  # fmt: skip
        """One pipeline call per prompt; the per-step latents are concatenated over the batch afterwards."""
        videos, per_prompt = [], []
        for prompt, seed in zip(prompts, seeds):
            steps: list[tuple[float, torch.Tensor]] = []
            on_step = (lambda i, t, latents: steps.append((t, latents.detach().clone()))) if record else None
            videos.append(self._call([prompt], [seed], s, on_step, decode))
            per_prompt.append(steps)
        merged = [(per_prompt[0][i][0], torch.cat([p[i][1] for p in per_prompt])) for i in range(len(per_prompt[0]))]
        return (torch.cat([torch.as_tensor(v) for v in videos]) if decode else None), merged
