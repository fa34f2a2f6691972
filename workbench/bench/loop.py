"""End to end through the sampling loop: seconds per video for each variant, each in its own process.

    python -m workbench.bench.loop                   # GPU: CogVideoX-2B and Wan2.1-1.3B configs, 50 steps
    python -m workbench.bench.loop --dry-run-cpu     # tiny configs on the CPU reference path

One video is `steps` denoising steps with classifier-free guidance: the cond and uncond text states go through
the transformer as one batch of 2 (as diffusers' pipelines do), then an Euler step of the flow ODE (sigma 1 -> 0)
moves the latents. The text encoder and the VAE decode are not counted: the transformer dominates, and they are
the same for every variant. Weights are random with one seed, so every variant samples the same video and the
final latents are compared with the reference variant's (the first plain bf16 row, bf16 torch.compile by
default): the quantization error after the whole loop, not after one forward. The variants are those of the
forward table (`workbench.bench.e2e`); the default subset is bf16 torch.compile, the best peer, and ours FP8 and
W4A8 with quantized attention, compiled.
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn as nn

from workbench.bench import e2e, isolate, peers
from workbench.bench.e2e import ModelCase, Variant


@dataclass
class LoopSettings:
    """How one video is sampled: steps, guidance scale, warm-up steps (compile, autotune) before the timed loop."""

    steps: int = 50
    guidance: float = 5.0
    warmup_steps: int = 2
    seed: int = 0

    def __post_init__(self) -> None:
        if self.steps < 1 or self.warmup_steps < 0:
            raise ValueError(f"steps must be >= 1 and warmup_steps >= 0, got {self.steps} and {self.warmup_steps}")


@dataclass
class LoopRow:
    model: str
    variant: str
    steps: int = 0
    s_per_video: float | None = None
    s_per_step: float | None = None
    speedup_vs_compiled: float | None = None  # against the same table's bf16 torch.compile row
    peak_gib: float | None = None
    weight_gib: float | None = None
    rel_err: float | None = None  # final latents against the reference variant's
    ref: str | None = None  # the reference variant of rel_err
    attn_calls: int = 0  # routed attention kernel calls per transformer call
    error: str | None = None
    wall_s: float | None = None  # the variant's whole worker: imports, build, compile, warm-up, loop
    graphs: int | None = None  # compiled variants: graphs Dynamo compiled (`e2e.compile_counts`)
    graph_breaks: int | None = None


def best_available_peer() -> str | None:
    """The strongest peer combination whose packages are importable here (before anything is measured)."""
    sage, ao = peers.importable("sageattention"), peers.importable("torchao")
    if sage and ao:
        return "torchao fp8 + SageAttention2, compiled"
    if sage:
        return "bf16 + SageAttention2, compiled"
    return "torchao fp8 row-wise, compiled" if ao else None


def default_variants(best_peer: str | None = None) -> list[Variant]:
    """bf16 torch.compile, the best peer (measured in the forward table when given, else the best importable
    combination), ours FP8 + qattn and ours W4A8 + qattn, compiled."""
    names = ["bf16 torch.compile", best_peer or best_available_peer(), "ours FP8 + qattn, compiled",
             "ours W4A8 + qattn, compiled"]
    return [e2e.BY_NAME[n] for n in dict.fromkeys(n for n in names if n)]


KEPT_REFERENCE = "bf16 torch.compile"  # the loop reference `--reference-dir` keeps between calls


def reference_of(variants: list[Variant]) -> str | None:
    """The variant whose final latents the others are compared with: the first plain bf16 one (no quantized
    linears, no attention swap), None when the list has none."""
    return next((v.name for v in variants if v.quant is None and not v.qattn and not v.sage and not v.fault), None)


def loop_inputs(case: ModelCase, device: torch.device, dtype: torch.dtype, seed: int = 0
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Seeded starting noise (float32, batch 1) and text states for [cond, uncond] (batch 2)."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    text_dim = case.config.get("text_embed_dim", case.config.get("text_dim"))
    latents = torch.randn(case.latent, generator=g)
    text = torch.randn(2, case.text_tokens, text_dim, generator=g)
    return latents.to(device), text.to(device, dtype)


def sample(model: nn.Module | Callable[..., Any], latents: torch.Tensor, text: torch.Tensor, steps: int,
           guidance: float, dtype: torch.dtype) -> torch.Tensor:
    """`steps` Euler steps of the flow ODE from sigma 1 to 0 with classifier-free guidance; one transformer call
    per step on [cond, uncond] as a batch of 2 (the model predicts the velocity). Returns the final latents."""
    sigmas = torch.linspace(1.0, 0.0, steps + 1).tolist()
    timesteps = [torch.full((2,), round(s * 999), device=latents.device, dtype=torch.long) for s in sigmas[:-1]]
    x = latents.float()
    for i in range(steps):
        pred = model(hidden_states=torch.cat([x, x]).to(dtype), encoder_hidden_states=text, timestep=timesteps[i],
                     return_dict=False)[0].float()
        cond, uncond = pred.chunk(2)
        x = x + (sigmas[i + 1] - sigmas[i]) * (uncond + guidance * (cond - uncond))
    return x


def measure_loop(case: ModelCase, v: Variant, device: torch.device, dtype: torch.dtype, s: LoopSettings,
                 min_attn_tokens: int = 1024, compile_backend: str = "inductor",
                 log: Callable[[str], None] = print) -> tuple[LoopRow, torch.Tensor | None]:
    """Build one variant in this process and time one sampled video after `warmup_steps` untimed steps; its
    row and the final latents (None when it failed)."""
    from torch._dynamo.utils import counters

    row, out, model = LoopRow(case.name, v.name, steps=s.steps), None, None
    t0 = time.time()
    counters.clear()
    try:
        model, row.weight_gib = e2e.prepare(case, v, device, dtype, compile_backend, s.seed)
        latents, text = loop_inputs(case, device, dtype, s.seed)
        with e2e.attention_context(v, min_attn_tokens, device) as routed, torch.inference_mode():
            t = time.time()
            if s.warmup_steps:
                sample(model, latents, text, s.warmup_steps, s.guidance, dtype)
            e2e._sync(device)
            log(f"  {v.name}: warm-up ({s.warmup_steps} steps) {time.time() - t:.1f}s")
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            if routed is not None:
                routed.reset()
            t = time.perf_counter()
            out = sample(model, latents, text, s.steps, s.guidance, dtype)
            e2e._sync(device)
            row.s_per_video = time.perf_counter() - t
            if device.type == "cuda":
                row.peak_gib = torch.cuda.max_memory_allocated(device) / 2**30
            row.attn_calls = e2e.check_routed(v, routed) // s.steps
            if v.compiled:
                row.graphs, row.graph_breaks = e2e.compile_counts()
        if not torch.isfinite(out).all():
            raise FloatingPointError("final latents have NaN/inf")
        row.s_per_step = row.s_per_video / s.steps
    except Exception as exc:  # noqa: BLE001 - one failing variant must not lose the table
        row.error, out, row.s_per_video = e2e.error_text(exc), None, None
        log(f"  {v.name}: FAILED {row.error}")
        e2e.log_traceback(log)
    finally:
        del model
        torch._dynamo.reset()
    row.wall_s = time.time() - t0
    return row, out


def _worker(spec: dict[str, Any]) -> dict[str, Any]:
    """`--worker SPEC`: one variant's sampled video in this fresh process; the final latents go to a file."""
    v = Variant(**spec["variant"])
    isolate.inject_fault(v.fault)
    case, _ = e2e.case_by_name(spec["case"])
    device, dtype = torch.device(spec["device"]), getattr(torch, spec["dtype"])
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    row, out = measure_loop(case, v, device, dtype, LoopSettings(**spec["settings"]), spec["min_attn_tokens"],
                            spec["compile_backend"])
    return {"row": asdict(row), "out": None if out is None else isolate.save_tensor(out, Path(spec["out"]))}


def fill_speedups(rows: list[LoopRow]) -> None:
    """Each timed row's speed-up over its model's bf16 torch.compile loop (where that ran)."""
    for model in {r.model for r in rows}:
        same = [r for r in rows if r.model == model]
        base = next((r.s_per_video for r in same if r.variant == "bf16 torch.compile" and r.s_per_video), None)
        for r in same:
            r.speedup_vs_compiled = base / r.s_per_video if base and r.s_per_video else None


def run_loop_case(case: ModelCase, variants: list[Variant], device: torch.device, dtype: torch.dtype,
                  settings: LoopSettings | None = None, budget_s: float | None = None,
                  log: Callable[[str], None] = print, on_row: Callable[[list[LoopRow]], None] | None = None,
                  min_attn_tokens: int = 1024, compile_backend: str = "inductor", isolated: bool = True,
                  timeout_s: float = 600.0, reference_dir: str | None = None) -> list[LoopRow]:
    """Time one sampled video per variant, each in its own process (isolated=False: all in this one).

    A variant that fails, crashes, runs past timeout_s or would start after budget_s becomes an error row, a
    missing peer package a skip row; `on_row(rows)` after every variant. Final latents are compared with the
    reference variant's (`reference_of`); a list without one uses bf16 torch.compile's when `reference_dir` keeps
    it from an earlier call.
    """
    s = settings or LoopSettings()
    t_start = time.time()
    ref = reference_of(variants)
    kept = isolate.ReferenceStore(reference_dir, "loop", case.name, s.seed, dtype, device, steps=s.steps,
                                  guidance=s.guidance, warmup_steps=s.warmup_steps, min_attn_tokens=min_attn_tokens,
                                  variant=KEPT_REFERENCE)
    rows: list[LoopRow] = []
    kept_path = None if ref else kept.get()
    if kept_path:
        ref = KEPT_REFERENCE
        log(f"  {ref} (the reference of the errors): kept from an earlier call, {kept_path}")
    with tempfile.TemporaryDirectory(prefix="workbench-loop-") as tmp:
        errors = isolate.ErrorsAgainst(ref)
        errors.add(ref, kept_path)  # nothing when no reference was kept
        for i, v in enumerate(variants):
            row, path = LoopRow(case.name, v.name, steps=s.steps), None
            skip = e2e.skip_reason(v, device)
            if skip:
                row.error = skip
            elif budget_s is not None and time.time() - t_start > budget_s:
                row.error = "skipped: time budget exhausted"
            elif isolated:
                spec = dict(case=case.name, device=str(device), dtype=str(dtype).removeprefix("torch."),
                            variant=asdict(v), settings=asdict(s), min_attn_tokens=min_attn_tokens,
                            compile_backend=compile_backend, out=str(Path(tmp) / f"loop{i:02d}.safetensors"))
                res = isolate.run_worker("workbench.bench.loop", spec, Path(tmp), f"loop{i:02d}", timeout_s, log,
                                         v.name)
                if res.result is None:
                    row.error, row.wall_s = res.error, res.seconds
                else:
                    row, path = LoopRow(**{**res.result["row"], "wall_s": res.seconds}), res.result["out"]
            elif v.fault:
                row.error = "skipped: fault injection needs worker processes"
            else:
                row, out = measure_loop(case, v, device, dtype, s, min_attn_tokens, compile_backend, log)
                path = None if out is None else isolate.save_tensor(out, Path(tmp) / f"loop{i:02d}.safetensors")
            if v.name == KEPT_REFERENCE:
                kept.put(path)
            for name, err in errors.add(v.name, path).items():
                for r in rows + [row]:
                    if r.variant == name:
                        r.rel_err, r.ref = err, ref
            if row.s_per_video is not None:
                log(f"  {v.name}: {row.s_per_video:.2f} s per video ({s.steps} steps)")
            rows.append(row)
            fill_speedups(rows)
            if on_row is not None:
                on_row(rows)
    return rows


def markdown(rows: list[LoopRow]) -> str:
    """The sampling-loop table (one row per model x variant) and the best peer per model."""
    def f(v: float | None, fmt: str) -> str:
        return "-" if v is None else format(v, fmt)

    lines = ["| model | variant | steps | s / video | s / step | vs bf16 compiled | peak GiB | "
             "rel. error of final latents (vs) | graphs (breaks) |", "|---|---|---:|---:|---:|---:|---:|---|---:|"]
    for r in rows:
        if r.error:
            lines.append(f"| {r.model} | {r.variant} | {r.steps} | {e2e.cell(r.error)} | | | | | |")
            continue
        err = "-" if r.rel_err is None else f"{r.rel_err:.4f} ({r.ref})"
        lines.append(f"| {r.model} | {r.variant} | {r.steps} | {f(r.s_per_video, '.2f')} | {f(r.s_per_step, '.3f')} | "
                     f"{'-' if r.speedup_vs_compiled is None else f'{r.speedup_vs_compiled:.2f}x'} | "
                     f"{f(r.peak_gib, '.2f')} | {err} | {e2e.compile_cell(r.graphs, r.graph_breaks)} |")
    return "\n".join(lines) + "\n\n" + e2e.best_peer_markdown(rows, key="s_per_video", unit="s / video")


def main(argv: list[str] | None = None, on_row: Callable[[list[LoopRow]], None] | None = None,
         best_peer: dict[str, str] | None = None) -> list[LoopRow]:
    """The sampling-loop table; `best_peer` (model -> variant, from a forward table) picks the default peer row."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dry-run-cpu", action="store_true", help="tiny configs on the CPU reference path")
    p.add_argument("--models", default=None, help="comma-separated substrings of case names to run")
    p.add_argument("--variants", default=None,
                   help="comma-separated exact variant names (default: bf16 torch.compile, the best peer, "
                        "ours FP8 + qattn and ours W4A8 + qattn, compiled)")
    p.add_argument("--steps", type=int, default=50, help="denoising steps per video (default 50)")
    p.add_argument("--guidance", type=float, default=5.0, help="classifier-free guidance scale (default 5)")
    isolate.add_run_args(p, "bench_loop")
    a = p.parse_args(argv)
    if a.worker:
        isolate.worker_main(a.worker, _worker)
        return []
    dry = a.dry_run_cpu
    if not dry and not torch.cuda.is_available():
        raise SystemExit("the sampling-loop benchmark needs a CUDA GPU; "
                         "use --dry-run-cpu to check its logic on the CPU")
    device = torch.device("cpu" if dry else "cuda")
    dtype = torch.float32 if dry else torch.bfloat16
    settings = LoopSettings(steps=a.steps, guidance=a.guidance)
    rows: list[LoopRow] = []
    for case in e2e.cases(dry):
        if a.models and not any(m.strip() in case.name for m in a.models.split(",")):
            continue
        variants = e2e.select_variants(a.variants, default_variants((best_peer or {}).get(case.name)))
        print(f"{case.name}: sampling loop, {settings.steps} steps, CFG batch 2: {', '.join(v.name for v in variants)}",
              flush=True)
        done = list(rows)
        rows += run_loop_case(case, variants, device, dtype, settings, budget_s=a.budget,
                              min_attn_tokens=16 if dry else 1024, compile_backend="aot_eager" if dry else "inductor",
                              isolated=not a.in_process, timeout_s=a.variant_timeout or (300.0 if dry else 600.0),
                              reference_dir=a.reference_dir,
                              on_row=None if on_row is None else (lambda part, done=done: on_row(done + part)))
    md = markdown(rows)
    print(md)
    if a.out:
        os.makedirs(a.out, exist_ok=True)
        Path(a.out, "bench_loop.md").write_text(md + "\n")
        Path(a.out, "bench_loop.json").write_text(json.dumps([asdict(r) for r in rows], indent=1))
    return rows


if __name__ == "__main__":
    main()
