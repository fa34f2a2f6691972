"""FP vs quantized, one prompt at a time: the videos, their difference, metrics and per-layer error.

    from workbench.eval.compare import RecipeCache, compare, QUICK
    cache = RecipeCache(model, budget=QUICK)         # quantized transformers, built once per recipe
    c = compare(model, cache, "W4A8", "a red circle moving left", seed=0, steps=8)
    c.fp_video, c.q_video, c.diff_video, c.metrics, c.layer_errors   # layer_error_figure in workbench.viz.explore

This is what the Gradio app (`app.py`) and the quickstart notebook show. A bit-width label (W8A8, W4A8,
W4A6, W3A6) names the recipe that quantizes to it (`BIT_WIDTHS`); any recipe name works too.
A `CalibrationBudget` scales a recipe's calibration and analysis prompt sets down for interactive use
(`QUICK`): the recipe's method and stages are unchanged, only the amount of FP data it sees.
"""
from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass, field, fields, replace

import torch

from workbench.metrics import evaluate_videos
from workbench.models.generator import GenerationSettings, Generator
from workbench.quant import QuantLinear, quantized_linears
from workbench.world.grammar import PromptError, parse_prompt

# Bit-width shortcuts: each lists the recipes that quantize to it, best first; the first one shipped wins.
BIT_WIDTH_PREFERENCE: dict[str, tuple[str, ...]] = {
    "W8A8": ("vidit-q-w8a8", "naive-w8a8"),
    "W4A8": ("vidit-q-w4a8", "naive-w4a8"),
    "W4A6": ("vidit-q-w4a6", "s2q-vdit-w4a6", "naive-w4a6"),
    "W3A6": ("q-vdit-w3a6", "mpq-dmv2-w3a6", "naive-w3a6"),
}


def _bit_widths() -> dict[str, str]:
    from workbench.recipes import list_recipes

    shipped = set(list_recipes())
    return {label: next((r for r in prefs if r in shipped), prefs[-1]) for label, prefs in BIT_WIDTH_PREFERENCE.items()}


# The recipe each bit-width label runs (W8A8 -> vidit-q-w8a8, ...).
BIT_WIDTHS: dict[str, str] = _bit_widths()


def describe_prompt(text: str, model: Generator | None = None) -> str:
    """One Markdown line about a typed prompt: how the model's oracle reads it (the world grammar), whether
    its text encoder takes it, or what is wrong with it."""
    try:
        if model is None:
            s = parse_prompt(text)
        else:
            model.check_prompts([text])
            scenes = model.oracle_scenes([text])
            if scenes is None:
                return f"{len(text)} characters: the text encoder takes it."
            s = scenes[0]
    except ValueError as e:
        kind = "Not a prompt of the world grammar" if isinstance(e, PromptError) else "Not usable"
        return f"**{kind}:** {e}"
    return f"Reads as: a {s.speed} {s.color} {s.shape} moving {s.direction}."


def recipe_name(choice: str) -> str:
    """The recipe a choice names: a bit-width label (`BIT_WIDTHS`) or a recipe name / path as is."""
    return BIT_WIDTHS.get(choice, choice)


@dataclass(frozen=True)
class CalibrationBudget:
    """How much FP data and training a recipe's stages get; None keeps the recipe's own number.

    prompts / steps: the `collect_calibration` prompt set and sampling steps (and the prompt set and steps
        of the `analyze_error_sources` sensitivity videos, capped at these).
    iters: optimizer steps of the distillation stages (any stage setting called `iters`), capped at this.
    The method is unchanged: a smaller budget gives noisier ranges, rankings and corrections, in a fraction
    of the time.
    """

    prompts: int | None = None
    steps: int | None = None
    iters: int | None = None

    @property
    def label(self) -> str:
        if self.prompts is None and self.steps is None and self.iters is None:
            return "as in the recipe"
        text = f"{self.prompts or 'recipe'} prompts x {self.steps or 'recipe'} steps"
        return text + (f", <= {self.iters} training steps" if self.iters is not None else "")


FULL = CalibrationBudget()
QUICK = CalibrationBudget(prompts=2, steps=4, iters=20)


def scaled_recipe(recipe, budget: CalibrationBudget = QUICK):
    """The recipe (name, path or Recipe) with its calibration / analysis prompt sets scaled to `budget`."""
    from workbench.recipes import load_recipe
    from workbench.stages import STAGES

    r = load_recipe(recipe)
    if budget == FULL:
        return r
    stages = []
    for name, settings in r.stages:
        s = dict(settings)
        if name in ("collect_calibration", "analyze_error_sources"):
            for key, cap in (("prompts", budget.prompts), ("steps", budget.steps)):
                if cap is not None:
                    s[key] = min(int(s.get(key, cap)), cap)
            if name == "analyze_error_sources" and budget.prompts is not None:
                s["calibration_prompts"] = min(int(s.get("calibration_prompts", budget.prompts)), budget.prompts)
        if budget.iters is not None and name in STAGES and "iters" in {f.name for f in fields(STAGES[name].settings)}:
            default = STAGES[name].settings().iters
            s["iters"] = min(int(s.get("iters", default)), budget.iters)
        stages.append((name, s))
    return replace(r, stages=stages, description=f"{r.description} [calibration budget: {budget.label}]".strip())


@dataclass
class RecipeCache:
    """Quantized transformers by (recipe, budget), built on first use, and recent FP videos.

    Thread-safe: one build at a time; a second request for the same recipe waits and reuses it.
    `fp_cache_size` FP videos (keyed by prompt, seed, steps, guidance) are kept, so switching recipes
    does not regenerate the reference.
    """

    model: Generator
    budget: CalibrationBudget = FULL
    seed: int = 0
    fp_cache_size: int = 32
    transformers: dict[tuple[str, CalibrationBudget], torch.nn.Module] = field(default_factory=dict)
    sessions: dict[tuple[str, CalibrationBudget], object] = field(default_factory=dict, repr=False)
    _fp: OrderedDict = field(default_factory=OrderedDict, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def get(self, choice: str, progress: bool = False, budget: CalibrationBudget | None = None) -> torch.nn.Module:
        """The quantized transformer of a bit-width label or recipe; an unknown one is a RecipeError."""
        from workbench.recipes import load_recipe, run_recipe

        name = recipe_name(choice)
        budget = self.budget if budget is None else budget
        recipe = scaled_recipe(load_recipe(name), budget)  # unknown recipe -> clear error before any work
        key = (name, budget)
        with self._lock:
            if key not in self.transformers:
                session = run_recipe(self.model, recipe, progress=progress, seed=self.seed)
                self.sessions[key] = session
                self.transformers[key] = session.qtransformer.eval()
            return self.transformers[key]

    def session(self, choice: str, budget: CalibrationBudget | None = None):
        """The Session that built a cached transformer (its stage reports), or None if not built yet."""
        return self.sessions.get((recipe_name(choice), self.budget if budget is None else budget))

    def fp_video(self, prompt: str, seed: int, settings: GenerationSettings, progress: bool = False) -> torch.Tensor:
        """The FP clip (3, F, H, W) of one prompt and seed, from the cache when it was made before."""
        key = (prompt, int(seed), settings)
        with self._lock:
            if key in self._fp:
                self._fp.move_to_end(key)
                return self._fp[key]
        video = self.model.generate([prompt], [int(seed)], settings, progress=progress)[0]
        with self._lock:
            self._fp[key] = video
            while len(self._fp) > self.fp_cache_size:
                self._fp.popitem(last=False)
        return video


@dataclass
class Comparison:
    """One prompt and seed generated by FP and by a quantized transformer."""

    prompt: str
    seed: int
    recipe: str
    fp_video: torch.Tensor  # (3, F, H, W)
    q_video: torch.Tensor
    diff_video: torch.Tensor  # |q - fp| scaled by DIFF_GAIN for visibility
    metrics: list[dict]  # one row for FP, one for the quantized model
    layer_errors: list[dict]  # per linear layer: relative output error of the quantized model vs FP


DIFF_GAIN = 4.0
METRIC_KEYS = ("oracle_accuracy", "temporal_consistency", "psnr_vs_fp", "ssim_vs_fp", "flicker_score",
               "temporal_diff_error_vs_fp")
ORACLE_KEYS = ("oracle_accuracy", "temporal_consistency")


def metric_keys(model: Generator) -> list[str]:
    """The comparison's metric columns for `model`: the oracle's only where the model has one."""
    oracle = model.oracle_scenes(model.eval_prompts()[:1]) is not None
    return [k for k in METRIC_KEYS if oracle or k not in ORACLE_KEYS]


def difference_video(fp: torch.Tensor, q: torch.Tensor, gain: float = DIFF_GAIN) -> torch.Tensor:
    """|q - fp| x gain, clamped to [0, 1]: where (and when) the quantized video departs from FP."""
    return ((q - fp).abs() * gain).clamp(0, 1)


@torch.no_grad()
def layer_output_errors(model: Generator, qtransformer: torch.nn.Module, prompt: str, seed: int,
                        settings: GenerationSettings | None = None) -> list[dict]:
    """Relative L2 error of every linear layer's output, quantized vs FP, on one real transformer input: the
    model's middle denoising call for this prompt and seed (recorded from an FP generation).

    Both networks get the same input, so errors accumulate through the quantized network exactly as in
    sampling: the bars show where the quantized model drifts away from FP.
    """
    from workbench.stages.calibration import recording_calls

    s = (settings or GenerationSettings()).resolved(model.defaults())
    calls: list[tuple[tuple, dict]] = []
    with recording_calls(model.transformer, lambda a, k: calls.append((a, k))):
        model.generate([prompt], [int(seed)], s)
    args, kwargs = calls[len(calls) // 2]
    outs: dict[str, dict[str, torch.Tensor]] = {"fp": {}, "q": {}}
    hooks = []
    for tag, net in (("fp", model.transformer), ("q", qtransformer)):
        for name, mod in net.named_modules():
            if isinstance(mod, (torch.nn.Linear, QuantLinear)):
                hooks.append(mod.register_forward_hook(lambda m, i, o, n=name, t=tag: outs[t].__setitem__(n, o.detach().float())))
    try:
        for net in (model.transformer, qtransformer):
            net(*args, **kwargs)
    finally:
        for h in hooks:
            h.remove()
    quantized = set(quantized_linears(qtransformer))
    rows = []
    for name, ref in outs["fp"].items():
        if name in outs["q"]:
            err = (outs["q"][name] - ref).norm() / ref.norm().clamp_min(1e-12)
            rows.append({"layer": name, "relative_error": float(err), "quantized": name in quantized})
    return rows


def compare(
    model: Generator, cache: RecipeCache, recipe: str, prompt: str, seed: int = 0, steps: int | None = None,
    guidance: float | None = None, progress: bool = False, budget: CalibrationBudget | None = None,
    frames: int | None = None, height: int | None = None, width: int | None = None,
) -> Comparison:
    """Generate one prompt with FP and with the recipe's quantized transformer, same seed, and measure both.

    Bad input (a prompt the model cannot take, a negative seed, steps out of range, a size the model cannot
    make, an unknown recipe) raises a ValueError subclass whose message says what to fix, before any
    generation starts.
    """
    if int(seed) < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed}")
    settings = GenerationSettings(steps=None if steps is None else int(steps), guidance=guidance, frames=frames,
                                  height=height, width=width).resolved(model.defaults())
    model.check_settings(settings)
    model.check_prompts([prompt])
    scenes = model.oracle_scenes([prompt])
    qt = cache.get(recipe, progress=progress, budget=budget)
    fp = cache.fp_video(prompt, seed, settings, progress=progress)
    q = model.generate([prompt], [int(seed)], settings, progress=progress, transformer=qt)[0]
    m_fp = evaluate_videos(fp[None], scenes, flicker=True)
    m_q = evaluate_videos(q[None], scenes, reference=fp[None], flicker=True)
    label = recipe if recipe == recipe_name(recipe) else f"{recipe} ({recipe_name(recipe)})"
    keys = metric_keys(model)
    rows = [
        {"model": "FP", **{k: m_fp.get(k) for k in keys}},
        {"model": label, **{k: m_q.get(k) for k in keys}},
    ]
    rows[0]["psnr_vs_fp"], rows[0]["ssim_vs_fp"] = None, 1.0  # FP is the reference: PSNR is infinite
    return Comparison(prompt, int(seed), recipe_name(recipe), fp, q, difference_video(fp, q), rows,
                      layer_output_errors(model, qt, prompt, int(seed), settings))


def comparison_html(c: Comparison) -> str:
    """The comparison as an HTML fragment (notebooks: `IPython.display.HTML`): FP, quantized and difference
    videos side by side, then the metrics table."""
    from workbench.viz.html import clips_html, table_html

    clips = [("full precision", c.fp_video), (f"quantized: {c.recipe}", c.q_video),
             (f"|quantized - FP| x{DIFF_GAIN:g}", c.diff_video)]
    return f"<p>{c.prompt} (seed {c.seed})</p>" + clips_html(clips) + table_html(c.metrics)
