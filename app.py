"""Gradio app: full-precision and quantized videos side by side (`make app`, then open the printed URL).

Pick a prompt (from the grammar or typed freely), a seed, the sampling steps and a recipe or bit-width;
the app shows the FP video, the quantized video and their difference, the metrics of both and the
per-layer output error. Quantized models are built once per recipe and cached; requests are queued.
All logic lives in `workbench.compare`; this file only lays out the page.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

import gradio as gr

from workbench.compare import BIT_WIDTHS, RecipeCache, compare, layer_error_figure
from workbench.models import load_bundled
from workbench.recipes import list_recipes
from workbench.video_io import save_video
from workbench.world.grammar import PromptError, all_scenes

METRIC_COLUMNS = ["model", "oracle_accuracy", "temporal_consistency", "psnr_vs_fp", "ssim_vs_fp"]


def build_app(model=None, out_dir: str | Path | None = None) -> gr.Blocks:
    """The Blocks app around one model and one recipe cache."""
    model = model if model is not None else load_bundled()
    cache = RecipeCache(model)
    out_dir = Path(out_dir or tempfile.mkdtemp(prefix="workbench-app-"))
    choices = list(BIT_WIDTHS) + [r for r in list_recipes() if r not in BIT_WIDTHS.values()]

    def run(prompt, seed, steps, recipe, progress=gr.Progress(track_tqdm=True)):
        try:
            if seed is None or int(seed) < 0:
                raise ValueError("seed must be a non-negative integer")
            c = compare(model, cache, recipe, prompt, int(seed), int(steps), progress=True)
        except (PromptError, ValueError, FileNotFoundError, FloatingPointError) as e:
            raise gr.Error(str(e)) from None
        d = Path(tempfile.mkdtemp(dir=out_dir))
        paths = [str(save_video(v, d / f"{tag}.webm")) for tag, v in (("fp", c.fp_video), ("quantized", c.q_video), ("difference", c.diff_video))]
        table = [[r.get(k) for k in METRIC_COLUMNS] for r in c.metrics]
        status = f"**{c.recipe}** on '{c.prompt}' (seed {c.seed}, {int(steps)} steps)"
        return (*paths, table, layer_error_figure(c.layer_errors), status)

    with gr.Blocks(title="Video DiT quantization workbench") as demo:
        gr.Markdown("# Full precision vs quantized\nSame prompt, same seed: what does quantization change?")
        with gr.Row():
            prompt = gr.Dropdown(choices=[s.prompt for s in all_scenes()], value="a red circle moving left",
                                 allow_custom_value=True, label="prompt (pick or type: colour, shape, direction, speed)")
            seed = gr.Number(value=0, precision=0, label="seed")
            steps = gr.Slider(2, 50, value=16, step=1, label="sampling steps")
            recipe = gr.Dropdown(choices=choices, value="W8A8", label="recipe or bit-width")
        button = gr.Button("Generate", variant="primary", elem_id="generate")
        status = gr.Markdown()
        with gr.Row():
            fp_video = gr.Video(label="full precision", elem_id="fp-video", autoplay=True, loop=True)
            q_video = gr.Video(label="quantized", elem_id="q-video", autoplay=True, loop=True)
            diff_video = gr.Video(label="|quantized - FP| x4", elem_id="diff-video", autoplay=True, loop=True)
        metrics = gr.Dataframe(headers=METRIC_COLUMNS, label="metrics", interactive=False)
        figure = gr.Plot(label="per-layer error")
        button.click(run, [prompt, seed, steps, recipe], [fp_video, q_video, diff_video, metrics, figure, status],
                     api_name="compare")
    demo.queue(default_concurrency_limit=1, max_size=32)
    return demo


if __name__ == "__main__":
    build_app().launch(server_name=os.environ.get("HOST", "127.0.0.1"), server_port=int(os.environ.get("PORT", "7860")))
