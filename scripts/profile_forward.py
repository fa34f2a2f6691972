"""Where one end-to-end forward of a `workbench bench` variant spends its time: kernels by total time (torch.profiler).

    python scripts/profile_forward.py CogVideoX "ours FP8 + qattn, compiled" --out prof.json   # CUDA GPU
    python scripts/profile_forward.py CogVideoX "bf16 eager" --dry-run-cpu                      # tiny case, CPU ops

The model, inputs, quantization, compilation and attention routing are the benchmark's own (`bench.e2e.prepare`,
`inputs`, `attention_context`); after 3 warm-up forwards, 5 timed ones give ms a forward (wall clock), then one
profiled forward gives each kernel's total time and calls (the NOTES.md profile table).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from workbench.bench import e2e  # noqa: E402


def profile(case_part: str, variant: str, dry: bool = False, top: int = 25) -> dict:
    """ms a forward and the `top` kernels (name, ms, calls) of one profiled forward."""
    matches = [c for c in e2e.cases(dry) if case_part in c.name]
    if not matches:
        raise SystemExit(f"no benchmark case matches {case_part!r}; cases: {[c.name for c in e2e.cases(dry)]}")
    if variant not in e2e.BY_NAME:
        raise SystemExit(f"unknown variant {variant!r}; variants: {list(e2e.BY_NAME)}")
    case, v = matches[0], e2e.BY_NAME[variant]
    dev = torch.device("cpu" if dry else "cuda")
    dtype = torch.float32 if dry else torch.bfloat16
    model, weight_gib = e2e.prepare(case, v, dev, dtype, "aot_eager" if dry else "inductor")
    x = e2e.inputs(case, dev, dtype)
    activity = torch.profiler.ProfilerActivity.CPU if dry else torch.profiler.ProfilerActivity.CUDA
    with e2e.attention_context(v, 16 if dry else 1024, dev), torch.inference_mode():
        for _ in range(3):
            model(**x)
        e2e._sync(dev)
        t = time.perf_counter()
        for _ in range(5):
            model(**x)
        e2e._sync(dev)
        ms = (time.perf_counter() - t) / 5 * 1e3
        with torch.profiler.profile(activities=[activity]) as prof:
            model(**x)
            e2e._sync(dev)
    totals: dict[str, list] = defaultdict(lambda: [0.0, 0])
    for ev in prof.events():
        on_device = ev.device_type == torch.autograd.DeviceType.CUDA
        if on_device != (not dry) or (dry and ev.cpu_parent is not None):
            continue  # GPU: kernels; CPU dry run: top-level ops only (children would count twice)
        totals[ev.name][0] += (ev.device_time_total if on_device else ev.cpu_time_total) / 1e3
        totals[ev.name][1] += 1
    rows = [{"kernel": k, "ms": t, "calls": n} for k, (t, n) in sorted(totals.items(), key=lambda kv: -kv[1][0])]
    return {"case": case.name, "variant": variant, "ms_per_forward": ms, "weight_gib": weight_gib,
            "kernel_ms_total": sum(r["ms"] for r in rows), "top": rows[:top]}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("case", help="substring of a benchmark case name (CogVideoX, Wan)")
    ap.add_argument("variant", help="a `workbench bench` variant name, e.g. 'ours FP8 + qattn, compiled'")
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--out", default=None, help="JSON file for the result")
    ap.add_argument("--dry-run-cpu", action="store_true", help="the tiny case on the CPU (checks the script)")
    a = ap.parse_args(argv)
    if not a.dry_run_cpu and not torch.cuda.is_available():
        raise SystemExit("profile_forward.py needs a GPU (CUDA); use --dry-run-cpu to check it on tiny shapes")
    res = profile(a.case, a.variant, a.dry_run_cpu, a.top)
    print(f"{res['case']} | {res['variant']}: {res['ms_per_forward']:.1f} ms a forward, "
          f"{res['kernel_ms_total']:.1f} ms of {'kernel' if not a.dry_run_cpu else 'op'} time")
    for r in res["top"]:
        print(f"{r['ms']:9.2f} ms {r['calls']:5d}x  {r['kernel'][:110]}")
    if a.out:
        Path(a.out).write_text(json.dumps(res, indent=1))
    return res


if __name__ == "__main__":
    main()
