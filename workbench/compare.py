"""FP vs quantized, one prompt at a time: the videos, their difference, metrics and per-layer error.

This is what the Gradio app and the quickstart notebook show; quantized transformers are built once
per recipe and kept in a `RecipeCache`.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass, field

import torch

from workbench.metrics import evaluate_videos
from workbench.models.bundled import TinyWorldModel
from workbench.models.tiny_dit import with_time_channel
from workbench.world.grammar import parse_prompt

# The app's bit-width shortcuts: each names the recipe it runs.
BIT_WIDTHS: dict[str, str] = {
    "W8A8": "vidit-q-w8a8",
    "W4A8": "vidit-q-w4a8",
    "W4A6": "vidit-q-w4a6",
    "W3A6": "naive-w3a6",
}


@dataclass
class RecipeCache:
    """Quantized transformers by recipe name, built on first use (thread-safe: one build at a time)."""

    model: TinyWorldModel
    seed: int = 0
    transformers: dict[str, torch.nn.Module] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def get(self, recipe: str, progress: bool = False) -> torch.nn.Module:
        from workbench.recipes import load_recipe, run_recipe

        name = BIT_WIDTHS.get(recipe, recipe)
        load_recipe(name)  # unknown recipe -> clear error before any work
        with self._lock:
            if name not in self.transformers:
                session = run_recipe(self.model, name, progress=progress, seed=self.seed)
                self.transformers[name] = session.qtransformer.eval()
            return self.transformers[name]


@dataclass
class Comparison:
    prompt: str
    seed: int
    recipe: str
    fp_video: torch.Tensor  # (3, F, H, W)
    q_video: torch.Tensor
    diff_video: torch.Tensor  # |q - fp| scaled x4 for visibility
    metrics: list[dict]  # one row for FP, one for the quantized model
    layer_errors: list[dict]  # per linear layer: relative output error of the quantized model vs FP


@torch.no_grad()
def layer_output_errors(model: TinyWorldModel, qtransformer: torch.nn.Module, prompt: str, seed: int, timestep: float = 500.0) -> list[dict]:
    """Relative L2 error of every linear layer's output, quantized vs FP, on one noisy input at `timestep`.

    Errors accumulate through the network, so this shows where the quantized model drifts away from FP.
    """
    from workbench.models.pipeline import initial_noise

    x = initial_noise([seed], model.world)
    emb = model.text_encoder.encode([prompt])
    outs: dict[str, dict[str, torch.Tensor]] = {"fp": {}, "q": {}}
    hooks = []
    for tag, net in (("fp", model.transformer), ("q", qtransformer)):
        for name, mod in net.named_modules():
            if isinstance(mod, torch.nn.Linear) or type(mod).__name__ == "QuantLinear":
                hooks.append(mod.register_forward_hook(lambda m, i, o, n=name, t=tag: outs[t].__setitem__(n, o.detach().float())))
    try:
        for net in (model.transformer, qtransformer):
            inp = with_time_channel(x, int(net.config.in_channels))
            net(inp, torch.tensor([timestep]), emb, return_dict=False)
    finally:
        for h in hooks:
            h.remove()
    rows = []
    for name, ref in outs["fp"].items():
        if name in outs["q"]:
            err = (outs["q"][name] - ref).norm() / ref.norm().clamp_min(1e-12)
            rows.append({"layer": name, "relative_error": float(err)})
    return rows


def compare(
    model: TinyWorldModel, cache: RecipeCache, recipe: str, prompt: str, seed: int = 0, steps: int = 16,
    guidance: float = 3.0, progress: bool = False,
) -> Comparison:
    """Generate one prompt with FP and with the recipe's quantized transformer, same seed, and measure both."""
    scene = parse_prompt(prompt)
    qt = cache.get(recipe, progress=progress)
    fp = model.generate_many([prompt], [seed], steps, guidance, progress=progress)
    q = model.generate_many([prompt], [seed], steps, guidance, progress=progress, transformer=qt)
    m_fp = evaluate_videos(fp, [scene])
    m_q = evaluate_videos(q, [scene], reference=fp)
    keys = ("oracle_accuracy", "temporal_consistency", "psnr_vs_fp", "ssim_vs_fp")
    rows = [
        {"model": "FP", **{k: m_fp.get(k, float("nan") if k.endswith("_vs_fp") else None) for k in keys}},
        {"model": BIT_WIDTHS.get(recipe, recipe), **{k: m_q.get(k) for k in keys}},
    ]
    rows[0]["psnr_vs_fp"], rows[0]["ssim_vs_fp"] = float("inf"), 1.0
    return Comparison(prompt, seed, BIT_WIDTHS.get(recipe, recipe), fp[0], q[0], ((q[0] - fp[0]).abs() * 4).clamp(0, 1),
                      rows, layer_output_errors(model, qt, prompt, seed))


def layer_error_figure(rows: list[dict], title: str = "Per-layer output error, quantized vs FP"):
    """Bar chart of `layer_output_errors` rows, in network order."""
    import plotly.graph_objects as go

    fig = go.Figure(go.Bar(x=[r["layer"] for r in rows], y=[r["relative_error"] for r in rows]))
    fig.update_layout(title=title, xaxis_title="linear layer (network order)", yaxis_title="relative L2 error",
                      xaxis_tickangle=-60, height=420, margin=dict(b=160))
    return fig
