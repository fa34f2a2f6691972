"""`workbench ...`: the command line. Each command calls library functions; none holds logic of its own."""
from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path

from workbench.world.grammar import PromptError


def _eval_settings(args):  # noqa: ANN001, ANN202
    """EvalSettings from the sampling flags (prompts are read once the model is known)."""
    from workbench.eval.prompt_set import EvalSettings

    return EvalSettings(seed=args.seed, steps=args.steps, guidance=args.guidance,
                        frames=getattr(args, "frames", None), height=getattr(args, "height", None),
                        width=getattr(args, "width", None))


def _options(args):  # noqa: ANN001, ANN202
    from workbench.cli.jobs import VideoOptions

    return VideoOptions(prompts=getattr(args, "prompts_file", None), frames=args.frames, height=args.height,
                        width=args.width)


def cmd_generate(args) -> int:
    """One clip from a prompt, with a model (bundled name or pipeline folder) or a quantized run directory."""
    from workbench.cli.jobs import load_model, parse_dtype
    from workbench.io.rundir import MANIFEST, load_quantized
    from workbench.io.video import check_video_path, save_video
    from workbench.models.generator import GenerationSettings

    out = check_video_path(args.out, overwrite=args.force)  # before the work, not after it
    settings = GenerationSettings(steps=args.steps, guidance=args.guidance, frames=args.frames, height=args.height,
                                  width=args.width)
    transformer = None
    if Path(args.model, MANIFEST).is_file():  # a directory written by `workbench quantize`
        model, transformer, _ = load_quantized(args.model, None, args.device, parse_dtype(args.dtype))
    else:
        model = load_model(args.model, args.device, args.dtype)
    model.check_prompts([args.prompt])
    video = model.generate([args.prompt], [args.seed], settings, transformer=transformer, progress=True)[0]
    save_video(video, out, overwrite=args.force)
    print(f"wrote {out}")
    return 0


def cmd_eval_fp(args) -> int:
    from dataclasses import replace

    from workbench.cli.jobs import load_model
    from workbench.eval.prompt_set import evaluate_fp, read_prompts_file

    model = load_model(args.model, args.device, args.dtype)
    settings = _eval_settings(args)
    if args.prompts:
        settings = replace(settings, prompts=read_prompts_file(args.prompts, model))
    settings = settings.resolved(model)
    metrics = evaluate_fp(model, settings, progress=not args.json).metrics
    metrics = {"model": args.model, "seed": settings.seed, "steps": settings.steps, "guidance": settings.guidance,
               **metrics}
    if args.json:
        print(json.dumps(metrics, allow_nan=False))
    else:
        for k, v in metrics.items():
            print(f"{k:>28}: {v}")
    return 0


def cmd_demo(args) -> int:
    from workbench.cli.demo import run_demo

    recipes = tuple(r for r in args.recipes.split(",") if r.strip())
    path = run_demo(Path(args.out), model_name=args.model, settings=_eval_settings(args), force=args.force,
                    recipes=recipes, prompts_file=args.prompts)
    print(f"wrote {path}")
    return 0


def cmd_report(args) -> int:
    from workbench.cli.demo import run_report

    path = run_report(args.dirs, args.out, settings=_eval_settings(args), force=args.force, prompts_file=args.prompts)
    print(f"wrote {path}")
    return 0


def cmd_recipes(args) -> int:
    from workbench.cli.jobs import recipe_rows

    rows = recipe_rows()
    if args.json:
        print(json.dumps(rows))
        return 0
    width = max(len(r["name"]) for r in rows)
    for r in rows:
        print(f"{r['name']:<{width}}  {r['method']}: weights {r['weight']}, activations {r['act']}")
        print(f"{'':<{width}}  stages: {' -> '.join(r['stages'])}")
    print("run one: workbench quantize --recipe NAME --out DIR (or --recipe path/to/recipe.yaml)")
    return 0


def cmd_quantize(args) -> int:
    from workbench import distributed
    from workbench.cli.jobs import quantize_recipe
    from workbench.stages.interrupt import graceful_sigint

    def first_ctrl_c() -> None:
        print("\nstopping at the next checkpoint (a few seconds); press Ctrl-C again to stop at once and lose the "
              "progress since the last one", file=sys.stderr, flush=True)

    with graceful_sigint(first_ctrl_c):
        out = quantize_recipe(args.recipe, args.out, force=args.force, seed=args.seed,
                              progress=distributed.is_main(), restart=args.restart, model=args.model,
                              options=_options(args), device=args.device, dtype=args.dtype)
    if distributed.is_main():
        print(f"wrote {out} (evaluate it: workbench eval {out} --json)")
    return 0


def cmd_eval(args) -> int:
    from workbench.cli.jobs import EVAL_KEYS, evaluate_directory

    metrics = evaluate_directory(args.dir, _eval_settings(args), progress=not args.json, model=args.model,
                                 device=args.device, dtype=args.dtype, prompts_file=args.prompts, clip=args.clip)
    if args.json:
        print(json.dumps(metrics, allow_nan=False))
    else:
        for k in EVAL_KEYS:
            fp = metrics.get(f"fp_{k}")
            print(f"{k:>22}: {metrics.get(k)}" + ("" if fp is None else f"   (FP {fp})"))
    return 0


def cmd_analyze(args) -> int:
    from workbench.cli.jobs import analyze_recipe

    path = analyze_recipe(args.recipe, args.out, force=args.force, seed=args.seed, prompts=args.prompts,
                          steps=args.steps, progress=True, model=args.model, device=args.device, dtype=args.dtype,
                          options=_options(args))
    print(f"wrote {path}")
    return 0


def cmd_export(args) -> int:
    from workbench.io.export import export_model
    from workbench.io.outdir import check_output
    from workbench.io.packed import FORMAT_NAME, load_packed
    from workbench.io.rundir import load_quantized

    check_output(args.out, FORMAT_NAME, force=args.force, sources=[args.dir])  # before loading anything
    _, qtransformer, manifest = load_quantized(args.dir)
    out = export_model(qtransformer, args.out, manifest.get("recipe"), force=args.force, sources=(args.dir,))
    load_packed(out, backend="reference")  # the export must reload (sizes, hashes, shapes) before we say done
    sizes = json.loads((out / "manifest.json").read_text())["sizes"]
    print(json.dumps({"packed": str(out), **{k: v for k, v in sizes.items() if isinstance(v, (int, float))}}))
    return 0


def cmd_bench(args) -> int:
    from workbench.bench.page import BenchSettings, run_bench

    s = BenchSettings(out=args.out, quick=args.quick, micro_budget_s=args.micro_budget, e2e_budget_s=args.e2e_budget,
                      models=args.models, e2e_variants=args.variants, loop_variants=args.loop_variants,
                      loop_steps=args.loop_steps, loop_budget_s=args.loop_budget, variant_timeout_s=args.variant_timeout,
                      in_process=args.in_process, skip_micro=args.skip_micro, skip_e2e=args.skip_e2e,
                      skip_loop=args.skip_loop, dry_run_cpu=args.dry_run_cpu, force=args.force, append=args.append,
                      gpu_tests_timeout_s=args.gpu_tests_timeout, gpus=args.gpus, reference_dir=args.reference_dir)
    result = run_bench(s)
    for t in result["targets"]:
        print(f"[{'met' if t['met'] else 'MISSED'}] {t['target']}: {t['measured']}")
    print(f"wrote {s.out}")
    return 0


def int_arg(subject: str, rule: str, low: int, high: int | None = None) -> Callable[[str], int]:
    """An argparse type: an integer in low..high (high None: no upper bound); a bad value is refused with
    "<subject> <rule>, got <value>"."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{subject} {rule}, got {text[:40]!r}") from None
        if value < low or (high is not None and value > high):
            raise argparse.ArgumentTypeError(f"{subject} {rule}, got {value}")
        return value

    return parse


nproc_arg = int_arg("--nproc must be", "an integer >= 1", 1)
seed_arg = int_arg("seed must be", "an integer >= 0", 0)  # the app refuses negative seeds too
steps_arg = int_arg("steps must be", "an integer in 1..1000", 1, 1000)
size_arg = int_arg("expected", "a positive integer", 1)  # frames / height / width: the model checks what it can make


def _add_model(p: argparse.ArgumentParser, default: str | None = "tiny-world", what: str = "") -> None:
    p.add_argument("--model", default=default,
                   help=what or "bundled model name (tiny-world) or a local diffusers video pipeline folder "
                        "(model_index.json); default tiny-world")
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda / cuda:N")
    p.add_argument("--dtype", default=None, choices=["fp32", "bf16", "fp16"],
                   help="weights dtype (default: fp32 on the CPU, bf16 on CUDA for pipelines)")


def _add_sizes(p: argparse.ArgumentParser) -> None:
    for name in ("frames", "height", "width"):
        p.add_argument(f"--{name}", type=size_arg, default=None, help=f"video {name} (default: what the model was made for)")


def _add_sampling(p: argparse.ArgumentParser, prompts: bool = True, model: bool = True) -> None:
    if model:
        _add_model(p)
    p.add_argument("--seed", type=seed_arg, default=0, help="seed of the first video; video i uses seed+i")
    p.add_argument("--steps", type=steps_arg, default=None, help="sampling steps (default: the model's)")
    p.add_argument("--guidance", type=float, default=None, help="classifier-free guidance scale (default: the model's)")
    _add_sizes(p)
    if prompts:
        p.add_argument("--prompts", default=None, help="file with one prompt a line (default: the model's held-out set)")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="workbench", description="Quantize video diffusion transformers and measure what it costs.")
    sub = ap.add_subparsers(dest="command", required=True)

    p = sub.add_parser("generate", help="generate one clip (.mp4, .webm or .gif) from a prompt")
    p.add_argument("--prompt", required=True, help="e.g. 'a red circle moving left'")
    p.add_argument("--out", required=True, help="output file, .mp4, .webm or .gif")
    p.add_argument("--force", action="store_true", help="overwrite --out if it exists")
    _add_sampling(p, prompts=False, model=False)
    _add_model(p, what="bundled model name, a local diffusers video pipeline folder, or a directory written by "
                       "`workbench quantize` (its quantized transformer generates); default tiny-world")
    p.set_defaults(fn=cmd_generate)

    p = sub.add_parser("eval-fp", help="generate a prompt set with the full-precision model and measure it")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    _add_sampling(p)
    p.set_defaults(fn=cmd_eval_fp)

    p = sub.add_parser("demo", help="FP and quantized videos of a model side by side, written as an HTML report")
    p.add_argument("--out", default="out/demo", help="output directory")
    p.add_argument("--force", action="store_true", help="overwrite an existing report in --out")
    p.add_argument("--recipes", default="vidit-q-w8a8", help="comma-separated recipes to run beside FP ('' for FP only)")
    _add_sampling(p)
    p.set_defaults(fn=cmd_demo)

    p = sub.add_parser("report", help="one HTML page comparing saved quantized models (from `workbench quantize`) with FP")
    p.add_argument("dirs", nargs="+", metavar="DIR", help="directories written by `workbench quantize --out DIR`")
    p.add_argument("--out", default="report.html", help="the HTML file to write (metrics.json lands beside it)")
    p.add_argument("--force", action="store_true", help="overwrite --out if it exists")
    _add_sampling(p, model=False)
    p.set_defaults(fn=cmd_report)

    p = sub.add_parser("recipes", help="list the shipped quantization recipes")
    p.add_argument("--json", action="store_true", help="print one JSON list")
    p.set_defaults(fn=cmd_recipes)

    p = sub.add_parser("quantize", help="run a recipe on a model (bundled or a pipeline folder) and save the quantized model")
    p.add_argument("--recipe", required=True, help="recipe name (see `workbench recipes`) or a recipe YAML file")
    _add_model(p)
    p.add_argument("--prompts", dest="prompts_file", default=None,
                   help="calibration prompts, one a line (default: the recipe's count of the model's calibration prompts)")
    _add_sizes(p)
    p.add_argument("--out", required=True, help="output directory (must be empty unless --force)")
    p.add_argument("--force", action="store_true",
                   help="replace an earlier `workbench quantize` output in --out (only the files it wrote)")
    p.add_argument("--seed", type=seed_arg, default=0, help="seed of calibration and analysis")
    p.add_argument("--restart", action="store_true",
                   help="discard an unfinished run's checkpoints in --out and start over (default: resume it)")
    p.add_argument("--nproc", type=nproc_arg, default=None,
                   help="run on N processes of this host under torchrun: one per GPU with --device cuda (NCCL), "
                        "CPU processes otherwise (gloo); the result equals the one-process result within float "
                        "tolerance (see README, Several GPUs)")
    p.set_defaults(fn=cmd_quantize)

    p = sub.add_parser("eval", help="measure a quantized model (from `workbench quantize`) against full precision")
    p.add_argument("dir", help="directory written by `workbench quantize`")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    _add_sampling(p, model=False)
    _add_model(p, default=None, what="the pipeline folder the run was made from, when it moved (default: the "
                                     "folder the run names)")
    p.add_argument("--clip", default=None, help="a local CLIP checkpoint folder: adds CLIP text-video score and "
                                                "CLIP Frechet distance")
    p.set_defaults(fn=cmd_eval)

    p = sub.add_parser("analyze", help="error-source analysis under a recipe's quant config, as an HTML report")
    p.add_argument("--recipe", required=True, help="recipe name (see `workbench recipes`) or a recipe YAML file")
    p.add_argument("--out", required=True, help="output directory for analysis.html (must be empty unless --force)")
    p.add_argument("--force", action="store_true", help="overwrite a non-empty --out")
    p.add_argument("--seed", type=seed_arg, default=0, help="seed of calibration and the sensitivity videos")
    p.add_argument("--prompts", type=int, default=2, help="generated prompts of the sensitivity analysis")
    p.add_argument("--steps", type=steps_arg, default=8, help="sampling steps of the sensitivity videos")
    _add_model(p)
    _add_sizes(p)
    p.set_defaults(fn=cmd_analyze)

    p = sub.add_parser("export", help="pack a quantized model (from `workbench quantize`) into low-bit safetensors")
    p.add_argument("dir", help="directory written by `workbench quantize`")
    p.add_argument("--out", required=True, help="directory for the packed model (must be empty unless --force)")
    p.add_argument("--force", action="store_true", help="replace an earlier export in --out (only the files it wrote)")
    p.set_defaults(fn=cmd_export)

    p = sub.add_parser("bench", help="GPU benchmark: kernels, end-to-end forwards and sampling loops vs bf16, "
                                      "torchao and SageAttention2")
    p.add_argument("--out", default="docs/benchmarks.md", help="markdown page to write (a .json lands beside it)")
    p.add_argument("--force", action="store_true", help="replace an existing --out")
    p.add_argument("--append", action="store_true",
                   help="extend an existing --out measured on the same GPU (new rows replace same-named ones)")
    p.add_argument("--quick", action="store_true", help="fewer kernel variants")
    p.add_argument("--micro-budget", type=float, default=225.0, help="seconds for the kernel microbenchmarks")
    p.add_argument("--gpu-tests-timeout", type=float, default=480.0,
                   help="seconds for the GPU kernel test module (runs with the kernel part)")
    p.add_argument("--e2e-budget", type=float, default=None, help="seconds per end-to-end model")
    p.add_argument("--models", default=None, help="end-to-end cases to run (substrings: CogVideoX, Wan)")
    p.add_argument("--variants", default=None, help="end-to-end variants to run (exact names, comma-separated)")
    p.add_argument("--loop-variants", default=None,
                   help="sampling-loop variants (exact names, comma-separated; default: bf16 torch.compile, the best "
                        "peer, ours FP8 + qattn and ours W4A8 + qattn, compiled)")
    p.add_argument("--loop-steps", type=steps_arg, default=50, help="denoising steps per video in the sampling loop")
    p.add_argument("--loop-budget", type=float, default=None, help="seconds per sampling-loop model")
    p.add_argument("--variant-timeout", type=float, default=None,
                   help="seconds one variant's process may run before it is killed (default 600; 300 in a dry run)")
    p.add_argument("--in-process", action="store_true",
                   help="run every variant in this process (no isolation: one crash ends the run)")
    p.add_argument("--gpus", default=None,
                   help="run the kernel part and each model's tables at once on these GPUs of this host (e.g. 0,1 or "
                        "all; every row of a model on one GPU) and join their pages")
    p.add_argument("--reference-dir", default=None,
                   help="keep the error references (bf16 eager's forward, bf16 torch.compile's sampled latents) in "
                        "this folder between calls on one machine: a call without them among its variants reads "
                        "them instead of recomputing them")
    p.add_argument("--skip-micro", action="store_true")
    p.add_argument("--skip-e2e", action="store_true")
    p.add_argument("--skip-loop", action="store_true", help="no sampling-loop table")
    p.add_argument("--dry-run-cpu", action="store_true", help="tiny shapes on the CPU reference path")
    p.set_defaults(fn=cmd_bench)
    return ap


USER_ERRORS = (PromptError, ValueError, FileExistsError, FileNotFoundError, FloatingPointError, RuntimeError,
               PermissionError)


def main(argv: list[str] | None = None) -> int:
    """Run one command; a user error prints `error: ...` (no traceback) and returns 2, an interrupted
    resumable run prints how to resume and returns 130.

    `quantize --nproc N` starts torchrun with N workers instead (`workbench.distributed.launch`); a torchrun
    worker (`torchrun ... -m workbench quantize ...`) joins the process group first (`_worker`)."""
    from workbench import distributed

    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    if getattr(args, "nproc", None) is not None:
        return _launch(args, argv)
    if distributed.launched_by_torchrun():
        from torch.distributed.elastic.multiprocessing.errors import record

        return record(_worker)(args, argv)  # record: torchrun's failure summary shows this rank's error
    return _run(args, argv)


def _run(args, argv: list[str], worker: bool = False) -> int:  # noqa: ANN001
    """The command, with its errors turned into messages; a worker re-raises them after naming its rank."""
    from workbench.distributed.launch import resume_command
    from workbench.stages.interrupt import Interrupted

    try:
        return args.fn(args)
    except Interrupted as e:
        print(f"\ninterrupted at {e.where}; progress is saved in {getattr(args, 'out', '')}/checkpoints. "
              f"Resume with the same command:\n  {resume_command(argv)}", file=sys.stderr)
        return 130
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    except USER_ERRORS as e:
        if worker:
            _rank_failed(e, argv)
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2
    except Exception as e:
        if worker:
            _rank_failed(e, argv)
        raise


def _rank_failed(e: BaseException, argv: list[str]) -> None:
    from workbench import distributed
    from workbench.distributed.launch import resume_command

    first = (str(e).strip().splitlines() or [""])[0]
    print(f"\n[rank {distributed.rank()} of {distributed.world()}] failed: {type(e).__name__}: {first}\n"
          "The job stops; its checkpoints stay in --out. Once the cause is dealt with, the same command resumes "
          f"(on any number of ranks):\n  {resume_command(argv)}", file=sys.stderr, flush=True)


def _worker(args, argv: list[str]) -> int:  # noqa: ANN001
    """One torchrun worker: join the process group (NCCL on this rank's GPU for --device cuda, else gloo),
    run the command, leave the group; errors are raised, so torchrun names this rank as their source."""
    from workbench import distributed

    if args.command != "quantize":
        raise distributed.DistributedError(
            f"under torchrun only `workbench quantize` runs (`workbench {args.command}` would run once per rank): "
            f"run `workbench {args.command}` without torchrun")
    distributed.init_from_env(args.device)
    ok = False
    try:
        code = _run(args, argv, worker=True)
        ok = code == 0
        return code
    finally:
        distributed.shutdown(ok)


def _launch(args, argv: list[str]) -> int:  # noqa: ANN001
    """`workbench quantize --nproc N`: the same command under torchrun with N workers on this host."""
    from workbench.distributed import launch

    if launch.launched_by_torchrun():
        print("error: --nproc starts torchrun itself: drop --nproc when launching with torchrun", file=sys.stderr)
        return 2
    if str(args.device).startswith("cuda"):
        import torch

        if torch.cuda.device_count() < args.nproc:
            print(f"error: --nproc {args.nproc} with --device {args.device} needs {args.nproc} GPUs; this machine has "
                  f"{torch.cuda.device_count()}: lower --nproc (or use --device cpu)", file=sys.stderr)
            return 2
    return launch.relaunch(argv, args.nproc)


if __name__ == "__main__":
    sys.exit(main())
