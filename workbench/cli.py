"""`workbench ...`: the command line. Each command calls library functions; none holds logic of its own."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from workbench.world.grammar import PromptError


def _model(name: str):
    from workbench.models import load_bundled
    from workbench.models.bundled import BUNDLED

    if name not in BUNDLED:
        raise ValueError(
            f"`{name}` is not a bundled text-to-video model ({', '.join(BUNDLED)}); generation needs the bundled "
            "model's text encoder. Local diffusers checkpoints load with workbench.models.load() for analysis."
        )
    return load_bundled(name)


def _settings(args):
    from workbench.evaluation import EvalSettings, read_prompts_file

    kw = dict(seed=args.seed, steps=args.steps, guidance=args.guidance)
    if getattr(args, "prompts", None):
        kw["prompts"] = read_prompts_file(args.prompts)
    return EvalSettings(**kw)


def cmd_generate(args) -> int:
    from workbench.video_io import save_video

    from workbench.world.grammar import parse_prompt

    parse_prompt(args.prompt)
    out = Path(args.out)
    if out.exists() and not args.force:
        raise FileExistsError(f"{out} exists; choose another --out or pass --force to overwrite it")
    model = _model(args.model)
    video = model.generate(args.prompt, seed=args.seed, steps=args.steps, guidance=args.guidance, progress=True)
    save_video(video, out, overwrite=args.force)
    print(f"wrote {out}")
    return 0


def cmd_eval_fp(args) -> int:
    from workbench.evaluation import evaluate_fp

    model = _model(args.model)
    metrics, _ = evaluate_fp(model, _settings(args), progress=not args.json)
    metrics = {"model": args.model, "seed": args.seed, "steps": args.steps, "guidance": args.guidance, **metrics}
    if args.json:
        print(json.dumps(metrics))
    else:
        for k, v in metrics.items():
            print(f"{k:>28}: {v}")
    return 0


def cmd_demo(args) -> int:
    from workbench.demo import run_demo

    path = run_demo(Path(args.out), model_name=args.model, settings=_settings(args), force=args.force)
    print(f"wrote {path}")
    return 0


def _add_sampling(p: argparse.ArgumentParser, prompts: bool = True) -> None:
    p.add_argument("--model", default="tiny-world", help="bundled model name (default tiny-world)")
    p.add_argument("--seed", type=int, default=0, help="seed of the first video; video i uses seed+i")
    p.add_argument("--steps", type=int, default=16, help="sampling steps")
    p.add_argument("--guidance", type=float, default=3.0, help="classifier-free guidance scale")
    if prompts:
        p.add_argument("--prompts", default=None, help="file with one prompt a line (default: the held-out set)")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="workbench", description="Quantize video diffusion transformers and measure what it costs.")
    sub = ap.add_subparsers(dest="command", required=True)

    p = sub.add_parser("generate", help="generate one clip (.mp4 or .gif) from a prompt")
    p.add_argument("--prompt", required=True, help="e.g. 'a red circle moving left'")
    p.add_argument("--out", required=True, help="output file, .mp4 or .gif")
    p.add_argument("--force", action="store_true", help="overwrite --out if it exists")
    _add_sampling(p, prompts=False)
    p.set_defaults(fn=cmd_generate)

    p = sub.add_parser("eval-fp", help="generate a prompt set with the full-precision model and measure it")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    _add_sampling(p)
    p.set_defaults(fn=cmd_eval_fp)

    p = sub.add_parser("demo", help="the main job on the bundled model, written as an HTML report")
    p.add_argument("--out", default="out/demo", help="output directory")
    p.add_argument("--force", action="store_true", help="overwrite an existing report in --out")
    _add_sampling(p)
    p.set_defaults(fn=cmd_demo)
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.fn(args)
    except (PromptError, ValueError, FileExistsError, FileNotFoundError, FloatingPointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
