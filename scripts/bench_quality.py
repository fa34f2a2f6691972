"""Run quantization recipes on the bundled model and write docs/results.md (`make bench-quality`).

Each recipe runs in its own Session (`workbench.recipes.run_recipe`), then `evaluate_quantized` scores
it on the held-out prompt set with the same seeds as the full-precision run. Results are cached per
recipe in out/bench_quality/, keyed by the recipe's content, the evaluation settings, the seed, a hash
of the bundled weights and a hash of the workbench code (`workbench.io.checkpoint.code_fingerprint`), so a
rerun only computes what changed, a code change recomputes everything, and an interrupted run resumes;
--fresh ignores the cache. Every recipe of `list_recipes()` runs unless --recipes names a subset.

Our section of the markdown file sits between BEGIN/END markers; text outside them (e.g. the ablation
tables that scripts/bench_ablations.py appends) is kept when the section is rewritten.

    python scripts/bench_quality.py                       # all recipes, 16 held-out prompts, 16 steps
    python scripts/bench_quality.py --recipes naive-w8a8,vidit-q-w8a8 --out /tmp/results.md
"""
from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from safetensors.torch import load_file, save_file  # noqa: E402

from workbench.eval.prompt_set import EvalSettings, Reference, evaluate_fp, evaluate_quantized  # noqa: E402
from workbench.io.checkpoint import code_fingerprint  # noqa: E402
from workbench.world.grammar import heldout_scenes  # noqa: E402
from workbench.models import load_bundled  # noqa: E402
from workbench.recipes import list_recipes, load_recipe, run_recipe  # noqa: E402
from workbench.stages.ptq import weight_budget  # noqa: E402

BEGIN = "<!-- bench-quality:begin (written by scripts/bench_quality.py; text outside these markers is kept) -->"
END = "<!-- bench-quality:end -->"
COLUMNS = ["oracle_accuracy", "exact_match", "psnr_vs_fp", "ssim_vs_fp", "temporal_consistency", "frechet_distance"]
EXTRA = ["color_accuracy", "shape_accuracy", "direction_accuracy", "speed_accuracy"]


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> str:
    threads = torch.get_num_threads()
    return (f"{platform.system()} {platform.release()} ({platform.machine()}), {cpu_name()}, "
            f"{os.cpu_count()} logical CPUs, torch {torch.__version__} with {threads} threads")


def weights_hash(model) -> str:
    """sha256 over the model's weights (transformer and text encoder state dicts: names, shapes, values)."""
    h = hashlib.sha256()
    for part in (model.transformer, model.text_encoder):
        for name, t in sorted(part.state_dict().items()):
            t = t.detach().cpu().contiguous()
            h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
            h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:16]


def key_of(recipe, settings: EvalSettings, seed: int, weights: str) -> str:
    """Cache key of one recipe's result: recipe content, evaluation settings, seed, weights hash and the hash
    of the workbench code that computes it (a code change recomputes every row)."""
    blob = json.dumps({"recipe": recipe.to_dict(), "eval": settings.__dict__, "seed": seed, "weights": weights,
                       "code": code_fingerprint()},
                      sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def bits_of(name: str) -> tuple[int, int]:
    """(weight bits, activation bits) from a recipe name ending in -wXaY, else (0, 0)."""
    import re

    m = re.search(r"-w(\d+)a(\d+)$", name)
    return (int(m.group(1)), int(m.group(2))) if m else (0, 0)


def table_order(names: list[str]) -> list[str]:
    """Rows grouped by bit-width (widest first), the naive baseline first within a group."""
    return sorted(names, key=lambda n: (-bits_of(n)[0], -bits_of(n)[1], not n.startswith("naive"), n))


def fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.3f}" if abs(v) < 1000 else f"{v:.0f}"
    return str(v)


def secs(v) -> str:
    return "-" if v is None else f"{v:.0f}"


def checks(rows: dict[str, dict], fp: dict) -> list[str]:
    """The issue's quality bar on the measured rows: every vidit-q recipe against the naive recipe of the
    same bit-width (psnr_vs_fp, oracle_accuracy), and vidit-q-w8a8's oracle accuracy drop vs FP."""
    out = []
    for name in table_order(list(rows)):
        if not name.startswith("vidit-q-"):
            continue
        bits = name[len("vidit-q-"):]
        v, n = rows[name], rows.get(f"naive-{bits}")
        if n is None:
            continue
        for k in ("psnr_vs_fp", "oracle_accuracy"):
            verdict = "beats" if v[k] > n[k] else ("ties with" if v[k] == n[k] else "does NOT beat")
            out.append(f"- {bits.upper()} {k}: vidit-q {fmt(v[k])} vs naive {fmt(n[k])}: {verdict} naive")
    v = rows.get("vidit-q-w8a8")
    if v is not None:
        drop = fp["oracle_accuracy"] - v["oracle_accuracy"]
        out.append(f"- vidit-q-w8a8 oracle_accuracy drop vs FP: {drop:+.3f} (target <= 0.02): {'met' if drop <= 0.02 else 'NOT met'}")
    return out


def model_line(model) -> str:
    t = model.transformer
    params = sum(p.numel() for p in t.parameters())
    blocks = len(getattr(t, "blocks", []))
    return f"bundled `{model.name}` ({type(t).__name__}, {blocks} blocks, {params / 1e6:.2f} M parameters)"


def write_markdown(path: Path, fp: dict, rows: dict[str, dict], settings: EvalSettings, started: str,
                   total_s: float, model: str, weights: str, cached: int = 0) -> None:
    """Write our section of `path` between BEGIN / END, keeping any text of the file outside them."""
    head = ["recipe", *COLUMNS, "avg W bits", "quantize s", "eval s"]
    rows = {n: rows[n] for n in table_order(list(rows))}
    lines = [
        BEGIN,
        "# Quantization results on the bundled model",
        "",
        "Generated by `make bench-quality` (`python scripts/bench_quality.py`); do not edit by hand.",
        "",
        f"- date: {started} (total wall time {total_s / 60:.1f} min; {cached} of {len(rows)} recipe rows and "
        f"{'the' if fp.get('cached') else 'no'} FP row reused from the cache of earlier runs with the same recipe, "
        "settings, weights and code)",
        f"- machine: {machine()}",
        f"- model: {model}, weights hash {weights}",
        f"- evaluation: {len(settings.prompts)} held-out prompts (`heldout_scenes()`), seeds {settings.seed}.."
        f"{settings.seed + len(settings.prompts) - 1} (same for FP and every recipe), {settings.steps} steps, "
        f"guidance {settings.guidance}",
        "- calibration and sensitivity prompts come from the training scenes only (disjoint from the held-out set)",
        "- psnr_vs_fp / ssim_vs_fp / frechet_distance compare each recipe's videos with the FP videos of the same "
        "prompts and seeds; `quantize s` is the wall time of the recipe's stages, `eval s` of generating and scoring",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
        "| FP | " + " | ".join(fmt(fp.get(c)) if c not in ("psnr_vs_fp", "ssim_vs_fp", "frechet_distance") else "-"
                            for c in COLUMNS) + " | 32 | - | " + secs(fp.get("eval_s")) + " |",
    ]
    for name, r in rows.items():
        lines.append(f"| {name} | " + " | ".join(fmt(r.get(c)) for c in COLUMNS)
                     + f" | {fmt(r.get('avg_weight_bits'))} | {secs(r.get('quantize_s'))} | {secs(r.get('eval_s'))} |")
    lines += ["", "Per attribute (oracle accuracy of colour / shape / direction / speed):", "",
              "| recipe | " + " | ".join(EXTRA) + " |", "|" + "---|" * (len(EXTRA) + 1),
              "| FP | " + " | ".join(fmt(fp.get(c)) for c in EXTRA) + " |"]
    for name, r in rows.items():
        lines.append(f"| {name} | " + " | ".join(fmt(r.get(c)) for c in EXTRA) + " |")
    lines += ["", "## Quality bar", "", *checks(rows, fp), "", "## Recipes", ""]
    for name in rows:
        rec = load_recipe(name)
        lines.append(f"- `{name}` ({rec.method}): {rec.description}")
        lines.append(f"  stages: {' -> '.join(s for s, _ in rec.stages)}")
    lines.append(END)
    section = "\n".join(lines) + "\n"
    before, after = "", ""
    if path.exists():
        old = path.read_text()
        if BEGIN in old and END in old:
            before, after = old[: old.index(BEGIN)], old[old.index(END) + len(END):].lstrip("\n")
        else:
            after = old  # a file we did not write: keep it below our section
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(before + section + ("\n" + after if after else ""))


def log(msg: str) -> None:
    tqdm.write(f"[bench] {msg}", file=sys.stdout)
    sys.stdout.flush()


def eval_settings(seed: int, steps: int, prompts: int | None = None) -> EvalSettings:
    """The held-out evaluation of the bundled model (its first `prompts` prompts when given) with videos
    seeded from `seed` and guidance 3 (the table's videos; per-step latent errors are not recorded)."""
    held = tuple(s.prompt for s in heldout_scenes())
    return EvalSettings(prompts=held[:prompts] if prompts else held, seed=seed, steps=steps, guidance=3.0,
                        latents=False)


def row_file(cache: Path, recipe, settings: EvalSettings, seed: int, weights: str) -> Path:
    """Where one recipe's metrics at these settings, seed and weights are cached."""
    return cache / f"{recipe.name}-{key_of(recipe, settings, seed, weights)}.json"


def load_fp(model, settings: EvalSettings, cache: Path, fresh: bool, weights: str) -> Reference:
    """FP metrics and videos for `settings`: from the cache (marked `cached`), else generated and cached."""
    key = hashlib.sha256(json.dumps({"eval": settings.__dict__, "weights": weights, "code": code_fingerprint()},
                                    sort_keys=True, default=str).encode()).hexdigest()[:16]
    f, fv = cache / f"fp-{key}.json", cache / f"fp-{key}.safetensors"
    if f.exists() and fv.exists() and not fresh:
        log(f"FP: cached ({f.name})")
        return Reference({**json.loads(f.read_text()), "cached": True}, load_file(str(fv))["videos"])
    log(f"FP: generating {len(settings.prompts)} videos ...")
    t = time.perf_counter()
    ref = evaluate_fp(model, settings, progress=True)
    ref.metrics["eval_s"] = time.perf_counter() - t
    f.write_text(json.dumps(ref.metrics, indent=1))
    save_file({"videos": ref.videos.contiguous()}, str(fv))
    return ref


def measure(model, recipe, settings: EvalSettings, seed: int, fp: Reference, out: Path) -> dict:
    """Run the recipe (seeded), score it against the FP videos, write the row to `out` and return it."""
    t = time.perf_counter()
    session = run_recipe(model, recipe, progress=True, seed=seed)
    q_s = time.perf_counter() - t
    t = time.perf_counter()
    metrics, _ = evaluate_quantized(model, session.qtransformer, settings, fp=fp, progress=True)
    row = {**metrics, **weight_budget(session.qtransformer), "quantize_s": q_s, "eval_s": time.perf_counter() - t,
           "stage_seconds": {r.name: r.seconds for r in session.reports}}
    out.write_text(json.dumps(row, indent=1, default=float))
    return row


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipes", default=None, help="comma-separated recipe names (default: every recipe of list_recipes())")
    ap.add_argument("--out", default=str(ROOT / "docs" / "results.md"), help="markdown file to write")
    ap.add_argument("--cache", default=str(ROOT / "out" / "bench_quality"), help="directory of per-recipe results")
    ap.add_argument("--fresh", action="store_true", help="ignore cached results")
    ap.add_argument("--steps", type=int, default=16, help="sampling steps of the evaluation")
    ap.add_argument("--prompts", type=int, default=None, help="use only the first N held-out prompts")
    ap.add_argument("--seed", type=int, default=0, help="seed of the first video and of the recipes")
    args = ap.parse_args(argv)

    available = list_recipes()
    names = available if args.recipes is None else [n.strip() for n in args.recipes.split(",") if n.strip()]
    unknown = [n for n in names if n not in available]
    if unknown or not names:
        what = f"unknown recipe {unknown[0]!r}" if unknown else "no recipe named"
        print(f"error: {what}; pass --recipes with names from: {', '.join(available)}", file=sys.stderr)
        return 2
    if args.steps < 1 or (args.prompts is not None and args.prompts < 1):
        print("error: --steps and --prompts must be >= 1", file=sys.stderr)
        return 2
    settings = eval_settings(args.seed, args.steps, args.prompts)
    cache = Path(args.cache)
    cache.mkdir(parents=True, exist_ok=True)
    started = dt.datetime.now().astimezone().isoformat(timespec="seconds")
    t_all = time.perf_counter()
    model = load_bundled()
    weights = weights_hash(model)
    about = model_line(model)

    ref = load_fp(model, settings, cache, args.fresh, weights)
    fp = ref.metrics
    log(f"FP oracle_accuracy {fp['oracle_accuracy']:.3f}")

    rows: dict[str, dict] = {}
    n_cached = 0
    out = Path(args.out)
    bar = tqdm(names, desc="recipes", unit="recipe")
    for name in bar:
        bar.set_postfix_str(name)
        recipe = load_recipe(name)
        f = row_file(cache, recipe, settings, args.seed, weights)
        if f.exists() and not args.fresh:
            rows[name] = json.loads(f.read_text())
            n_cached += 1
            log(f"{name}: cached ({f.name})")
            continue
        log(f"{name}: running {len(recipe.stages)} stages ...")
        row = measure(model, recipe, settings, args.seed, ref, f)
        rows[name] = row
        log(f"{name}: oracle {row['oracle_accuracy']:.3f}, psnr {row['psnr_vs_fp']:.2f} dB, "
            f"quantize {row['quantize_s']:.0f} s, eval {row['eval_s']:.0f} s")
        write_markdown(out, fp, rows, settings, started, time.perf_counter() - t_all, about, weights, n_cached)
    write_markdown(out, fp, rows, settings, started, time.perf_counter() - t_all, about, weights, n_cached)
    log(f"wrote {out}")
    for line in checks(rows, fp):
        log(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
