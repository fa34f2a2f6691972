"""Real-size video pipelines on a GPU, with random weights (nothing can be downloaded here): what each stage of
a recipe costs in time and memory, FP vs quantized generation speed with the kernels, and PSNR of quantized vs
FP videos. Then the Wan2.1-14B transformer: calibration plus Q-VDiT distillation on one GPU.

    python scripts/real_models.py run --out $OUT/real_models.json                 # on the GPU (rows saved as it goes)
    python scripts/real_models.py run --models cogvideox --recipes vidit-q-w8a8 --out rows.json
    python scripts/real_models.py run --models none --wan14b --out rows.json      # the 14B distillation only
    python scripts/real_models.py render docs/real-models/*.json --notes docs/real-models/notes.txt   # the page
    python scripts/real_models.py probe-diff docs/real-models/probes/wan2.1-14b-1rank.json probe_2rank.json

Per pipeline (CogVideoX-2B: 49 frames 480x720; Wan2.1-1.3B: 81 frames 480x832; 50 steps with guidance):
1. build it on the GPU in bf16 from the published configs (`workbench.models.random_pipelines`) and save it,
   because a run directory names the pipeline folder it was made from;
2. FP: the transformer compiled (`torch.compile` per block), one warm-up video, one timed video (the reference
   of PSNR); its peak memory;
3. per recipe: every stage through `workbench.recipes.run_recipe`'s stages (time and peak memory of each),
   `save_quantized`, `export_model`, `load_packed(device="cuda")` (Triton kernels where the formats allow),
   then one timed video: compiled kernels plus our quantized attention for W8A8, the packed fake-quant model
   for formats without a kernel (W4A6), and PSNR against the FP video of the same prompt and seed.
The calibration prompt counts are scaled down (`--calibration-prompts`, one prompt a call) to fit the device
time of a session; the stages and formats are the recipe's.
"""
from __future__ import annotations

import argparse
import datetime as dt
import gc
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from workbench.models.generator import GenerationSettings  # noqa: E402

PROMPT = "A golden retriever runs through shallow waves on a sunny beach, slow motion"
SEED = 0
FAMILIES = {"cogvideox": "CogVideoX-2B", "wan": "Wan2.1-1.3B"}


def log(msg: str) -> None:
    print(f"[real-models {time.strftime('%H:%M:%S')}] {msg}", flush=True)


class Rows:
    """Rows of the run, written to the JSON file after every one (a run cut short keeps what it measured)."""

    def __init__(self, path: Path, env: dict[str, Any]) -> None:
        self.path, self.data = path, {"env": env, "rows": []}

    def add(self, **row: Any) -> None:
        from workbench import distributed

        if not distributed.is_main():
            return  # under torchrun rank 0 records (rows carry every rank's peak memory)
        self.data["rows"].append(row)
        log(json.dumps(row))
        self.path.write_text(json.dumps(self.data, indent=1))


def timed(device: torch.device, fn: Callable[[], Any]) -> tuple[Any, float, float]:
    """(result, seconds, peak GiB allocated on the GPU; 0 on the CPU) of fn on `device`."""
    gc.collect()
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        torch.cuda.synchronize(device)
    t = time.perf_counter()
    out = fn()
    if cuda:
        torch.cuda.synchronize(device)
    return out, time.perf_counter() - t, torch.cuda.max_memory_allocated(device) / 2**30 if cuda else 0.0


def environment() -> dict[str, Any]:
    import diffusers
    import transformers
    import triton

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none (CPU dry run, tiny sizes)"
    return {"gpu": gpu, "torch": torch.__version__, "triton": triton.__version__,
            "diffusers": diffusers.__version__, "transformers": transformers.__version__,
            "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="minutes")}


def compiled(transformer: torch.nn.Module) -> torch.nn.Module:
    """The transformer with every block compiled in place (regional compilation, as the benchmark does);
    unchanged on the CPU (the dry run checks the script's logic, not Inductor)."""
    from workbench.bench.e2e import compile_blocks

    if next(transformer.parameters()).is_cuda:
        compile_blocks(transformer)
    return transformer


def scaled(name: str, prompts: int, family: str, distill_iters: int | None = None) -> Any:
    """The recipe with its calibration prompt sets scaled to `prompts` (one prompt a call, bf16 on the GPU) and,
    when `distill_iters` is given, each distillation unit's iterations capped at it."""
    from workbench.recipes import Recipe, load_recipe

    r = load_recipe(name)
    stages = []
    for stage, settings in r.stages:
        s = dict(settings)
        if stage == "collect_calibration":
            s.update(prompts=min(int(s.get("prompts", prompts)), prompts), batch_size=1)
        if stage == "select_salient_calibration":
            s["budget"] = min(int(s.get("budget", 32)), prompts * 4)
        if distill_iters is not None and "iters" in s:
            s["iters"] = min(int(s["iters"]), distill_iters)
        stages.append((stage, s))
    cap = "" if distill_iters is None else f", distillation capped at {distill_iters} iterations a unit"
    return Recipe(r.name, r.quant, stages, r.method, f"{r.description} [real-models: {prompts} calibration prompts{cap}]",
                  r.source)


def run_pipeline(family: str, recipes: list[str], rows: Rows, work: Path, calibration_prompts: int,
                 size: str = "full", steps: int = 50, distill_iters: int | None = None) -> None:
    from workbench.bench.e2e import quantized_attention
    from workbench.io.export import export_model
    from workbench.io.packed import load_packed
    from workbench.io.rundir import save_quantized
    from workbench.metrics.fidelity import psnr
    from workbench.models.random_pipelines import build_pipeline
    from workbench.models.video_pipeline import PipelineGenerator
    from workbench.session import Session
    from workbench.stages import STAGES

    dev = torch.device("cuda" if size == "full" else "cpu")
    dtype = torch.bfloat16 if size == "full" else torch.float32
    model = FAMILIES[family] if size == "full" else f"{family} (tiny)"
    pipe, build_s, _ = timed(dev, lambda: build_pipeline(family, size, device=dev, dtype=dtype))
    folder = work / family
    _, save_s, _ = timed(dev, lambda: pipe.save_pretrained(str(folder)))
    from workbench.models.random_pipelines import tiny_defaults

    gen = PipelineGenerator(pipe, name=model, defaults=tiny_defaults(family) if size == "tiny" else None)
    gen.path = folder.resolve()
    d = gen.defaults()
    s50 = GenerationSettings(steps=steps)
    prompt = PROMPT if size == "full" else gen.eval_prompts()[0]
    rows.add(model=model, part="build", seconds=build_s, save_seconds=save_s, frames=d.frames, height=d.height,
             width=d.width, steps=steps, guidance=d.guidance)

    import copy

    fp_c = compiled(copy.deepcopy(gen.transformer))  # the session quantizes the eager original
    gen.generate([prompt], [SEED], GenerationSettings(steps=2), transformer=fp_c)  # compile warm-up (same shapes)
    fp_video, fp_s, fp_peak = timed(dev, lambda: gen.generate([prompt], [SEED], s50, transformer=fp_c))
    rows.add(model=model, part="generate", variant="bf16, torch.compile", seconds_per_video=fp_s, peak_gib=fp_peak)
    del fp_c

    for name in recipes:
        recipe = scaled(name, calibration_prompts, family, distill_iters)
        session = Session.start(gen, seed=0, progress=True)
        session.recipe = {"name": recipe.name, "recipe": recipe.to_dict()}
        total = 0.0
        for stage, settings in recipe.stages:
            info = STAGES[stage]
            _, sec, peak = timed(dev, lambda: info.fn(session, info.settings(**settings)))
            total += sec
            rows.add(model=model, recipe=name, part="stage", stage=stage, seconds=sec, peak_gib=peak,
                     peak_vs_fp_generate=peak / fp_peak if fp_peak else None,
                     **{k: settings[k] for k in ("prompts", "steps", "iters", "budget") if k in settings})
        out = work / f"{family}-{name}"
        _, save_sec, _ = timed(dev, lambda: save_quantized(session, out))
        packed = work / f"{family}-{name}-packed"
        _, exp_sec, _ = timed(dev, lambda: export_model(session.qtransformer, packed, session.recipe))
        manifest = json.loads((packed / "manifest.json").read_text())
        rows.add(model=model, recipe=name, part="quantize", seconds=total, save_seconds=save_sec,
                 export_seconds=exp_sec, packed_ratio_vs_bf16=manifest["sizes"]["ratio_vs_bf16"],
                 kernel_layers=sum(e["kernel"] is not None for e in manifest["layers"].values()),
                 layers=len(manifest["layers"]))
        del session
        gc.collect()
        torch.cuda.empty_cache()
        qt = load_packed(packed, device=dev)
        kernels = manifest["layers"] and all(e["kernel"] is not None for e in manifest["layers"].values())
        variant = "packed kernels + quantized attention, torch.compile" if kernels else "packed fake-quant, eager"
        if kernels:
            compiled(qt)
        with quantized_attention() if kernels else _nothing() as routed:
            gen.generate([prompt], [SEED], GenerationSettings(steps=2), transformer=qt)  # warm-up / compile
            q_video, q_s, q_peak = timed(dev, lambda: gen.generate([prompt], [SEED], s50, transformer=qt))
            calls = getattr(routed, "calls", 0)
        rows.add(model=model, recipe=name, part="generate", variant=variant, seconds_per_video=q_s, peak_gib=q_peak,
                 speedup_vs_bf16_compile=fp_s / q_s, psnr_vs_fp=float(psnr(q_video, fp_video)[0]),
                 quant_attention_calls=calls)
        del qt
        gc.collect()
        torch.cuda.empty_cache()


class _nothing:
    def __enter__(self):  # noqa: ANN204
        return None

    def __exit__(self, *exc):  # noqa: ANN002, ANN204
        return False


def run_wan14b(rows: Rows, iters: int, tokens_frames: int, height: int, width: int, size: str = "full",
               batch: int = 2, probe_out: Path | None = None) -> None:
    """The Wan2.1-14B transformer (random weights, bf16): calibration inputs at a reduced latent size, PTQ, then
    Q-VDiT's distillation (TQE + TMD) for `iters` iterations of a global batch of `batch` rows; time, samples per
    second and peak memory of every rank. Under torchrun every rank builds the same model (same seed) on its GPU
    and the distillation is data-parallel (FSDP2); the quantized model's output on a fixed probe input is saved
    to `probe_out` so that runs on different numbers of ranks can be compared."""
    import torch.distributed as dist

    from workbench import distributed
    from workbench.models.random_pipelines import build_transformer, wan_14b_transformer_config
    from workbench.recipes import load_recipe
    from workbench.session import Session
    from workbench.stages import STAGES, calibration_from_inputs

    dev = torch.device("cuda" if size == "full" else "cpu")
    dtype = torch.bfloat16 if size == "full" else torch.float32
    if distributed.launched_by_torchrun():
        dev = distributed.init_from_env(str(dev))
    ranks = distributed.world() if distributed.active() else 1

    def peaks(local: float) -> list[float]:
        if not distributed.active():
            return [local]
        out: list[Any] = [None] * ranks
        dist.all_gather_object(out, local)
        return out

    model = ("Wan2.1-14B transformer" if size == "full" else "wan transformer (tiny)") + f", {ranks} rank(s)"
    t, build_s, peak = timed(dev, lambda: build_transformer("wan", size, device=dev, dtype=dtype,
                                                            config=wan_14b_transformer_config() if size == "full" else None))
    params = sum(p.numel() for p in t.parameters())
    rows.add(model=model, part="build", seconds=build_s, peak_gib=max(peaks(peak)), params=params, ranks=ranks)
    g = torch.Generator(device=dev).manual_seed(0)
    cfg = t.config
    inputs = [dict(hidden_states=torch.randn(2, cfg.in_channels, tokens_frames, height, width, generator=g, device=dev,
                                             dtype=dtype),
                   timestep=torch.full((2,), float(ts), device=dev),
                   encoder_hidden_states=torch.randn(2, 512, cfg.text_dim, generator=g, device=dev, dtype=dtype),
                   return_dict=False)
              for ts in torch.linspace(999, 20, 8)]
    session = Session.start(t, seed=0, progress=distributed.is_main())
    _, cal_s, cal_peak = timed(dev, lambda: calibration_from_inputs(session, inputs))
    tokens = tokens_frames * (height // cfg.patch_size[1]) * (width // cfg.patch_size[2])
    rows.add(model=model, part="calibration", seconds=cal_s, peak_gib=max(peaks(cal_peak)), calls=len(inputs),
             rows=2 * len(inputs), tokens_per_row=tokens, ranks=ranks)
    recipe = load_recipe("q-vdit-w4a6")
    session.recipe = {"name": recipe.name, "recipe": recipe.to_dict()}
    total = torch.cuda.get_device_properties(dev).total_memory / 2**30 if dev.type == "cuda" else float("inf")
    for stage, settings in recipe.stages:
        if stage == "collect_calibration":
            continue  # the transformer alone cannot sample: calibrated on the inputs above
        st = dict(settings)
        if stage == "qvdit_distill":
            st.update(iters=iters, batch_size=batch, rows=2 * len(inputs))
        info = STAGES[stage]
        _, sec, peak = timed(dev, lambda: info.fn(session, info.settings(**st)))
        per_rank = peaks(peak)
        extra: dict[str, Any] = {}
        if stage == "qvdit_distill":
            rep = session.reports[-1]
            extra = {"iterations": rep.summary["iterations"], "seconds_per_iteration": sec / max(1, iters),
                     "samples_per_second": iters * batch / sec, "batch": batch,
                     "err_before": rep.summary["mean_err_before"], "err_after": rep.summary["mean_err_after"]}
        rows.add(model=model, recipe="q-vdit-w4a6", part="stage", stage=stage, seconds=sec, peak_gib=max(per_rank),
                 peak_gib_per_rank=per_rank, fits_one_gpu=max(per_rank) < total, ranks=ranks, **extra)
    if probe_out is not None and distributed.is_main():
        with torch.no_grad():
            y = session.qtransformer(**inputs[0])[0].double().flatten().cpu()
        probe_out.write_text(json.dumps({"ranks": ranks, "norm": float(y.norm()), "values": y[:4096].tolist()}))
    if distributed.active():
        distributed.shutdown()


def probe_diff(a: Path, b: Path) -> dict[str, Any]:
    """How far two probe outputs (`run --probe-out`, e.g. 1 rank vs 2 ranks) are apart: max |a - b|, the relative
    L2 distance of the saved values and of the whole output's norm."""
    pa, pb = json.loads(a.read_text()), json.loads(b.read_text())
    va, vb = torch.tensor(pa["values"], dtype=torch.float64), torch.tensor(pb["values"], dtype=torch.float64)
    if va.shape != vb.shape:
        raise ValueError(f"{a} holds {va.numel()} values and {b} {vb.numel()}: probes of different runs' shapes "
                         "cannot be compared (make both with the same --wan14b settings)")
    return {"ranks": [pa["ranks"], pb["ranks"]], "max_abs": float((va - vb).abs().max()),
            "rel_l2": float((va - vb).norm() / va.norm().clamp(min=1e-30)),
            "norm_rel": abs(pa["norm"] - pb["norm"]) / max(abs(pa["norm"]), 1e-30)}


def render(paths: list[Path], out: Path, notes: list[str] | None = None) -> None:
    """docs/real-models.md from the JSON rows of one or more runs (and `notes`: what a run did not finish)."""
    data = [json.loads(p.read_text()) for p in paths]
    rows = [dict(r, run=d["env"]["date"][11:16]) for d in data for r in d["rows"]]  # the run's UTC time
    versions = lambda key: ", ".join(sorted({d["env"][key] for d in data}))  # noqa: E731 - runs may differ
    lines = ["# Real-size models on one GPU (random weights)", "",
             "Generated by `python scripts/real_models.py render` from the rows that `scripts/real_models.py run` "
             "wrote (kept beside this page in `docs/real-models/`; the script's docstring says what each row "
             "measures); do not edit by hand.", "",
             f"- GPU: {versions('gpu')}; torch {versions('torch')}, triton {versions('triton')}, diffusers "
             f"{versions('diffusers')}, transformers {versions('transformers')}; runs {', '.join(sorted({d['env']['date'] for d in data}))} (UTC)",
             "- weights: random, from the published configs (no checkpoint can be downloaded here): times and "
             "memory are those of the real models; PSNR measures how far quantization moves a random model's video.",
             "- scaled down to fit a session's 30 minutes of GPU time: calibration prompts (the recipes ask for 8 or "
             "16) and, where the settings column says so, distillation iterations; the stages and formats are the "
             "recipe's.",
             ""]
    for model in dict.fromkeys(r["model"] for r in rows):
        mr = [r for r in rows if r["model"] == model]
        build = next((r for r in mr if r["part"] == "build"), {})
        lines += [f"## {model}", ""]
        if "frames" in build:
            lines += [f"{build['frames']} frames at {build['height']}x{build['width']}, {build['steps']} steps, guidance "
                      f"{build['guidance']}; pipeline built on the GPU in {build['seconds']:.1f} s, saved in "
                      f"{build['save_seconds']:.0f} s.", ""]
        elif "params" in build:
            lines += [f"{build['params'] / 1e9:.2f} B parameters, built on the GPU in {build['seconds']:.1f} s "
                      f"(peak {build['peak_gib']:.1f} GiB); {build.get('ranks', 1)} rank(s) under torchrun (NCCL).", ""]
        gens = [r for r in mr if r["part"] == "generate"]
        if gens:
            lines += ["| generation | s / video | vs bf16 compile | peak GiB | PSNR vs FP (dB) |", "|---|---:|---:|---:|---:|"]
            for r in gens:
                if "psnr_vs_fp" in r:
                    lines.append(f"| {r['recipe']}: {r['variant']} | {r['seconds_per_video']:.1f} | "
                                 f"{r['speedup_vs_bf16_compile']:.2f}x | {r['peak_gib']:.1f} | {r['psnr_vs_fp']:.2f} |")
                else:
                    which = f" (run {r['run']} UTC)" if len({g["run"] for g in gens}) > 1 else ""
                    lines.append(f"| FP: {r['variant']}{which} | {r['seconds_per_video']:.1f} | 1.00x | "
                                 f"{r['peak_gib']:.1f} | - |")
            lines.append("")
        stages = [r for r in mr if r["part"] in ("stage", "calibration")]
        if stages:
            many = len({r.get("run") for r in stages}) > 1  # rows of several runs: say which run each comes from
            lines += ["| recipe | stage | settings | seconds | peak GiB | peak vs FP generation |" + (" run (UTC) |" if many else ""),
                      "|---|---|---|---:|---:|---:|" + ("---|" if many else "")]
            for r in stages:
                ratio = r.get("peak_vs_fp_generate")
                shown = ", ".join(f"{k} {r[k]}" for k in ("prompts", "steps", "budget", "iters", "calls") if k in r)
                lines.append(f"| {r.get('recipe', '-')} | {r.get('stage', r['part'])} | {shown or '-'} | {r['seconds']:.1f} | "
                             f"{r['peak_gib']:.1f} | {'-' if ratio is None else f'{ratio:.2f}x'} |"
                             + (f" {r.get('run', '-')} |" if many else ""))
            lines.append("")
        for r in mr:
            if r["part"] == "quantize":
                lines.append(f"- {r['recipe']}: quantized in {r['seconds'] / 60:.1f} min (all stages), saved in "
                             f"{r['save_seconds']:.0f} s, exported in {r['export_seconds']:.0f} s; packed weights "
                             f"{r['packed_ratio_vs_bf16']:.2f}x bf16; {r['kernel_layers']} of {r['layers']} layers run a kernel.")
            if r["part"] == "generate" and r.get("quant_attention_calls"):
                lines.append(f"- {r['recipe']}: {r['quant_attention_calls']} attention calls ran the quantized attention "
                             "kernel during the timed video.")
            if r["part"] == "stage" and r.get("stage") == "qvdit_distill" and "iterations" in r:
                lines.append(f"- Q-VDiT distillation: {r['iterations']} iterations of {r['batch']} rows, "
                             f"{r['seconds_per_iteration']:.2f} s each ({r['samples_per_second']:.2f} rows/s), peak "
                             f"{r['peak_gib']:.1f} GiB per GPU (fits one GPU: {r['fits_one_gpu']}); output error vs FP "
                             f"{r['err_before']:.4f} -> {r['err_after']:.4f}.")
        lines.append("")
    if notes:
        lines += ["## Notes", ""] + [f"- {n}" for n in notes] + [""]
    out.write_text("\n".join(lines))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="measure on a CUDA GPU")
    r.add_argument("--out", required=True, help="JSON file of the rows (rewritten after every row)")
    r.add_argument("--models", default="cogvideox,wan", help="cogvideox, wan (comma-separated) or none")
    r.add_argument("--recipes", default="vidit-q-w8a8,s2q-vdit-w4a6")
    r.add_argument("--calibration-prompts", type=int, default=4)
    r.add_argument("--distill-iters", type=int, default=None,
                   help="cap each distillation unit's iterations (default: the recipe's)")
    r.add_argument("--wan14b", action="store_true", help="also the Wan2.1-14B transformer's distillation")
    r.add_argument("--wan14b-iters", type=int, default=50)
    r.add_argument("--wan14b-batch", type=int, default=2, help="global batch (rows) of a distillation step")
    r.add_argument("--probe-out", default=None, help="JSON of the 14B quantized output on a probe input")
    r.add_argument("--work", default=None, help="folder for the saved pipelines and runs (default: a temp folder)")
    r.add_argument("--dry-run-cpu", action="store_true",
                   help="tiny pipelines on the CPU, 2 steps: checks this script's logic without a GPU")
    w = sub.add_parser("render", help="write the markdown page from JSON rows")
    w.add_argument("json", nargs="+")
    w.add_argument("--out", default=str(ROOT / "docs" / "real-models.md"))
    w.add_argument("--notes", default=None, help="text file, one note a line: what the runs did not finish")
    d = sub.add_parser("probe-diff", help="compare two --probe-out files (e.g. 1 rank vs 2 ranks)")
    d.add_argument("a")
    d.add_argument("b")
    a = ap.parse_args(argv)
    if a.cmd == "probe-diff":
        print(json.dumps(probe_diff(Path(a.a), Path(a.b))))
        return 0
    if a.cmd == "render":
        notes = [n.strip() for n in Path(a.notes).read_text().splitlines() if n.strip()] if a.notes else []
        render([Path(p) for p in a.json], Path(a.out), notes)
        log(f"wrote {a.out}")
        return 0
    if not torch.cuda.is_available() and not a.dry_run_cpu:
        print("error: `run` measures on a CUDA GPU; none is available here (--dry-run-cpu checks the logic)",
              file=sys.stderr)
        return 2
    size, steps = ("tiny", 2) if a.dry_run_cpu else ("full", 50)
    rows = Rows(Path(a.out), environment())
    work = Path(a.work or tempfile.mkdtemp(prefix="real-models-"))
    for family in [m for m in a.models.split(",") if m and m != "none"]:
        run_pipeline(family, [x for x in a.recipes.split(",") if x], rows, work, a.calibration_prompts, size, steps,
                     a.distill_iters)
    if a.wan14b:
        run_wan14b(rows, a.wan14b_iters, tokens_frames=2, height=30, width=52, size=size, batch=a.wan14b_batch,
                   probe_out=Path(a.probe_out) if a.probe_out else None)
    return 0


if __name__ == "__main__":
    sys.exit(main())
