"""Gradio app: full-precision and quantized videos side by side (`make app`, then open the printed URL).

Pick a prompt (from the model's prompt sets or typed freely: it is checked as you type), a seed, the
sampling steps and a bit-width (W8A8, W4A8, W4A6, W3A6) or any recipe; the app shows the FP video, the
quantized video and their difference, the metrics of both and the per-layer output error. The model is the
bundled tiny-world by default, or any local diffusers video pipeline (`--model DIR`). Quantized models are
built once per recipe and calibration budget and cached; requests are queued one at a time (concurrent
users wait their turn, with their place shown); bad input gets a visible message. All logic lives in
`workbench.eval.compare`; this file only lays out the page.

    python app.py [--model DIR] [--device cuda] [--host 127.0.0.1] [--port 7860] [--steps N] [--budget quick|full]
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
    metric_keys,
    QUICK,
    RecipeCache,
    compare,
    describe_prompt,
)
from workbench.io.video import save_video
from workbench.recipes import RecipeError, list_recipes
from workbench.viz.explore import layer_error_figure
from workbench.world.grammar import PromptError, all_scenes

BUDGETS = {f"quick: {QUICK.label}": QUICK, f"full: {FULL.label}": FULL}
DEFAULT_PROMPT = "a red circle moving left"


def prompt_choices(model) -> tuple[list[str], str]:  # noqa: ANN001
    """(prompts offered in the dropdown, the default one): every scene of the grammar for a model with the
    world's oracle, else the model's evaluation and calibration prompts (the first one by default)."""
    if model.oracle_scenes(model.eval_prompts()[:1]) is not None:
        return [s.prompt for s in all_scenes()], DEFAULT_PROMPT
    offered = list(dict.fromkeys([*model.eval_prompts(), *model.calibration_prompts(32, 0)]))
    return offered, offered[0]


def build_app(model=None, out_dir: str | Path | None = None, steps: int | None = None, budget: str = "quick",
              cache: RecipeCache | None = None) -> gr.Blocks:
    """The Blocks app around one model (a Generator; default the bundled tiny-world) and one recipe cache
    (`budget`: the default calibration budget; `steps`: the default sampling steps, the model's if None)."""
    if model is None:
        from workbench.models import load_bundled

        model = load_bundled()
    cache = cache if cache is not None else RecipeCache(model)
    steps = steps if steps is not None else model.defaults().steps
    prompts, default_prompt = prompt_choices(model)
    columns = ["model", *metric_keys(model)]
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
        table = [[round(v, 4) if isinstance(v, float) else v for v in (r.get(k) for k in columns)] for r in c.metrics]
        status = f"**{c.recipe}** on '{c.prompt}' (seed {c.seed}, {int(n_steps)} steps, calibration {budget_name})"
        return (*paths, table, layer_error_figure(c.layer_errors), status)

    with gr.Blocks(title="Video DiT quantization workbench") as demo:
        gr.Markdown("# Full precision vs quantized\nSame prompt, same seed: what does quantization change? "
                    "The first request for a recipe quantizes the model (a minute or more on a CPU); later ones reuse it.")
        with gr.Row():
            prompt = gr.Dropdown(choices=prompts, value=default_prompt, allow_custom_value=True,
                                 label=f"prompt of {model.name} (pick or type)", elem_id="prompt")
            seed = gr.Number(value=0, precision=0, minimum=0, label="seed", elem_id="seed")
            n_steps = gr.Slider(1, max(50, steps), value=steps, step=1, label="sampling steps", elem_id="steps")
            recipe = gr.Dropdown(choices=choices, value="W8A8", label="bit-width or recipe", elem_id="recipe")
            budget_radio = gr.Radio(budget_names, value=default_budget, label="calibration budget", elem_id="budget")
        prompt_help = gr.Markdown(describe_prompt(default_prompt, model), elem_id="prompt-help")
        button = gr.Button("Generate", variant="primary", elem_id="generate")
        status = gr.Markdown(elem_id="status")
        with gr.Row():
            fp_video = gr.Video(label="full precision", elem_id="fp-video", autoplay=True, loop=True)
            q_video = gr.Video(label="quantized", elem_id="q-video", autoplay=True, loop=True)
            diff_video = gr.Video(label="|quantized - FP| x4", elem_id="diff-video", autoplay=True, loop=True)
        metrics = gr.Dataframe(headers=columns, label="metrics (PSNR / SSIM against the FP video)",
                               interactive=False, elem_id="metrics")
        figure = gr.Plot(label="per-layer output error", elem_id="layer-errors")
        prompt.change(lambda text: describe_prompt(text, model), prompt, prompt_help, api_name="check_prompt",
                      queue=False)
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
    ap.add_argument("--model", default="tiny-world",
                    help="bundled model name or a local diffusers video pipeline folder (default tiny-world)")
    ap.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    ap.add_argument("--steps", type=int, default=None, help="default sampling steps (default: the model's)")
    ap.add_argument("--budget", choices=["quick", "full"], default="quick",
                    help="default calibration budget (quick: a scaled-down prompt set; full: the recipe's own)")
    args = ap.parse_args(argv)
    from workbench.models import load_generator

    model = load_generator(args.model, args.device)
    build_app(model, steps=args.steps, budget=args.budget).launch(server_name=args.host, server_port=args.port)


if __name__ == "__main__":
    main()
