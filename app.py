"""Gradio app: full-precision and quantized videos side by side (`make app`, then open the printed URL).

Pick a prompt (from the grammar or typed freely: it is checked as you type), a seed, the sampling steps
and a bit-width (W8A8, W4A8, W4A6, W3A6) or any recipe; the app shows the FP video, the quantized video
and their difference, the metrics of both and the per-layer output error. Quantized models are built
once per recipe and calibration budget and cached; requests are queued one at a time (concurrent users
wait their turn, with their place shown); bad input gets a visible message. All logic lives in
`workbench.eval.compare`; this file only lays out the page.

    python app.py [--host 127.0.0.1] [--port 7860] [--steps 16] [--budget quick|full]
    GRADIO_SERVER_NAME=0.0.0.0 GRADIO_SERVER_PORT=8080 python app.py      # Gradio's variables work too
"""
from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

import gradio as gr

from workbench.eval.compare import (
    BIT_WIDTHS,
    FULL,
    METRIC_KEYS,
    QUICK,
    RecipeCache,
    compare,
    describe_prompt,
)
from workbench.io.video import save_video
from workbench.recipes import RecipeError, list_recipes
from workbench.viz.explore import layer_error_figure
from workbench.world.grammar import PromptError, all_scenes

METRIC_COLUMNS = ["model", *METRIC_KEYS]
BUDGETS = {f"quick: {QUICK.label}": QUICK, f"full: {FULL.label}": FULL}
DEFAULT_PROMPT = "a red circle moving left"


def build_app(model=None, out_dir: str | Path | None = None, steps: int = 16, budget: str = "quick",
              cache: RecipeCache | None = None) -> gr.Blocks:
    """The Blocks app around one model and one recipe cache (`budget`: the default calibration budget)."""
    if model is None:
        from workbench.models import load_bundled

        model = load_bundled()
    cache = cache if cache is not None else RecipeCache(model)
    out_dir = Path(out_dir or tempfile.mkdtemp(prefix="workbench-app-"))
    choices = list(BIT_WIDTHS) + [r for r in list_recipes() if r not in BIT_WIDTHS.values()]
    budget_names = list(BUDGETS)
    default_budget = next(n for n in budget_names if n.startswith(budget))

    def run(prompt, seed, n_steps, recipe, budget_name, progress=gr.Progress(track_tqdm=True)):
        try:
            if seed is None:
                raise ValueError("seed must be a non-negative integer")
            progress(0, desc=f"building {recipe} (first use of a recipe only), then generating")
            c = compare(model, cache, recipe, prompt, int(seed), int(n_steps), progress=True,
                        budget=BUDGETS.get(budget_name, QUICK))
        except (PromptError, RecipeError, ValueError, FileNotFoundError, FloatingPointError) as e:
            raise gr.Error(str(e), duration=None) from None
        d = Path(tempfile.mkdtemp(dir=out_dir))
        paths = [str(save_video(v, d / f"{tag}.webm")) for tag, v in
                 (("fp", c.fp_video), ("quantized", c.q_video), ("difference", c.diff_video))]
        table = [[round(v, 4) if isinstance(v, float) else v for v in (r.get(k) for k in METRIC_COLUMNS)] for r in c.metrics]
        status = f"**{c.recipe}** on '{c.prompt}' (seed {c.seed}, {int(n_steps)} steps, calibration {budget_name})"
        return (*paths, table, layer_error_figure(c.layer_errors), status)

    with gr.Blocks(title="Video DiT quantization workbench") as demo:
        gr.Markdown("# Full precision vs quantized\nSame prompt, same seed: what does quantization change? "
                    "The first request for a recipe quantizes the model (a minute or more on a CPU); later ones reuse it.")
        with gr.Row():
            prompt = gr.Dropdown(choices=[s.prompt for s in all_scenes()], value=DEFAULT_PROMPT, allow_custom_value=True,
                                 label="prompt (pick or type: colour, shape, direction, speed)", elem_id="prompt")
            seed = gr.Number(value=0, precision=0, minimum=0, label="seed", elem_id="seed")
            n_steps = gr.Slider(2, 50, value=steps, step=1, label="sampling steps", elem_id="steps")
            recipe = gr.Dropdown(choices=choices, value="W8A8", label="bit-width or recipe", elem_id="recipe")
            budget_radio = gr.Radio(budget_names, value=default_budget, label="calibration budget", elem_id="budget")
        prompt_help = gr.Markdown(describe_prompt(DEFAULT_PROMPT), elem_id="prompt-help")
        button = gr.Button("Generate", variant="primary", elem_id="generate")
        status = gr.Markdown(elem_id="status")
        with gr.Row():
            fp_video = gr.Video(label="full precision", elem_id="fp-video", autoplay=True, loop=True)
            q_video = gr.Video(label="quantized", elem_id="q-video", autoplay=True, loop=True)
            diff_video = gr.Video(label="|quantized - FP| x4", elem_id="diff-video", autoplay=True, loop=True)
        metrics = gr.Dataframe(headers=METRIC_COLUMNS, label="metrics (PSNR / SSIM against the FP video)",
                               interactive=False, elem_id="metrics")
        figure = gr.Plot(label="per-layer output error", elem_id="layer-errors")
        prompt.change(describe_prompt, prompt, prompt_help, api_name="check_prompt", queue=False)
        button.click(run, [prompt, seed, n_steps, recipe, budget_radio],
                     [fp_video, q_video, diff_video, metrics, figure, status], api_name="compare")
    demo.queue(default_concurrency_limit=1, max_size=32)
    return demo


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    # Gradio's own variables set the defaults, as for any Gradio app (flags win over them)
    ap.add_argument("--host", default=os.environ.get("GRADIO_SERVER_NAME", "127.0.0.1"),
                    help="address to serve on (default: $GRADIO_SERVER_NAME or 127.0.0.1)")
    ap.add_argument("--port", type=int, default=int(os.environ.get("GRADIO_SERVER_PORT", "7860")),
                    help="port (default: $GRADIO_SERVER_PORT or 7860)")
    ap.add_argument("--steps", type=int, default=16, help="default sampling steps")
    ap.add_argument("--budget", choices=["quick", "full"], default="quick",
                    help="default calibration budget (quick: a scaled-down prompt set; full: the recipe's own)")
    args = ap.parse_args(argv)
    build_app(steps=args.steps, budget=args.budget).launch(server_name=args.host, server_port=args.port)


if __name__ == "__main__":
    main()
