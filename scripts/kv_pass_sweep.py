"""Launch-parameter sweep of quant_attention's K/V passes (the NOTES.md K/V pass table), us a call.

    python scripts/kv_pass_sweep.py --out kv.jsonl       # CUDA GPU: the three issue shapes
    python scripts/kv_pass_sweep.py --dry-run-cpu         # tiny shapes in the Triton interpreter (checks the script)

    python scripts/kv_pass_sweep.py --choose best.json   # also: the fastest launch choices per head dim, as
                                                         # `attention.KV_PASSES` entries

K and V are what diffusers hands to attention: [B, H, N, D] views of a [B, N, 3, H, D] projection (token stride
3 * H * D), K with a per-channel offset. Rows: the statistics pass (`_kv_stats_kernel`) per register-tile height
BLOCK_T and tiles loaded a step (UNROLL); the quant pass (`_kv_quant_kernel`, 128-key blocks, the Gluon kernel's V
token order) per warps, with K and V in one program or two (SPLIT_KV). Each row's outputs are checked against the
production launch's (`attention.KV_PASSES`).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

if "--dry-run-cpu" in sys.argv:
    os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SHAPES = [("CogVideoX-2B", 17776, 30, 64), ("Wan2.1-1.3B", 32760, 12, 128), ("HunyuanVideo-like", 32768, 24, 128)]
DRY_SHAPES = [("tiny D=64", 150, 2, 64), ("tiny D=128", 100, 1, 128)]


def timer(dry: bool):
    """us a call: triton's do_bench on a GPU, one timed call in the interpreter."""
    if dry:
        def once(fn) -> float:
            t = time.perf_counter()
            fn()
            return (time.perf_counter() - t) * 1e6
        return once
    import triton
    return lambda fn: triton.testing.do_bench(fn, warmup=20, rep=100) * 1e3


def sweep(dry: bool, out: str | None, shapes: str | None = None) -> list[dict]:
    """Every row of the sweep (also appended to `out` as JSON lines when given)."""
    import triton

    from workbench.kernels import attention as A
    from workbench.kernels._triton_utils import num_sms
    from workbench.kernels.reference import EPS, FP8_MAX

    dev = torch.device("cpu" if dry else "cuda")
    bench = timer(dry)
    rows: list[dict] = []

    def emit(row: dict) -> None:
        print(json.dumps(row), flush=True)
        rows.append(row)
        if out:
            with open(out, "a") as fh:
                fh.write(json.dumps(row) + "\n")

    for name, n, h, d in DRY_SHAPES if dry else SHAPES:
        if shapes and not any(x in name for x in shapes.split(",")):
            continue
        g = torch.Generator(device=dev).manual_seed(0)
        dtype = torch.float32 if dry else torch.bfloat16
        base = torch.randn(1, n, 3, h, d, device=dev, dtype=dtype, generator=g)
        base[:, :, 1] += 3 * torch.randn(h, d, device=dev, dtype=dtype, generator=g)
        k, v = base[:, :, 1].transpose(1, 2), base[:, :, 2].transpose(1, 2)
        ideal = 2 * k.numel() * k.element_size() / 4.8e12 * 1e6

        prod = A.KV_PASSES[d]

        def stats(block_t: int, unroll: int) -> tuple[float, torch.Tensor]:
            splits = max(1, min(triton.cdiv(n, block_t), triton.cdiv(4 * num_sms(dev), h)))
            tps = triton.cdiv(triton.cdiv(n, splits), block_t) * block_t
            splits = triton.cdiv(n, tps)
            part = torch.empty((4, h, splits, d), device=dev, dtype=torch.float32)
            fn = lambda: A._kv_stats_kernel[(h, splits)](k, v, part[0], part[1], part[2], part[3], h, n, tps, splits,  # noqa: E731
                                                         *k.stride(), *v.stride(), HEAD_DIM=d, BLOCK_T=block_t,
                                                         UNROLL=unroll, num_warps=4)
            fn()
            us = bench(fn)
            return us, torch.stack([part[0].sum(1), part[1].sum(1), part[2].amin(1), part[3].amax(1)])

        prod_us, want = stats(prod["stats_block_t"], prod["stats_unroll"])
        emit(dict(shape=name, head_dim=d, part="stats", block_t=prod["stats_block_t"], unroll=prod["stats_unroll"],
                  us=round(prod_us, 1), production=True, read_at_4_8_TBs_us=round(ideal, 1)))
        for block_t, unroll in ((2048 // d, 1), (2048 // d, 2), (1024 // d, 2), (1024 // d, 1)):
            if (block_t, unroll) == (prod["stats_block_t"], prod["stats_unroll"]):
                continue
            us, got = stats(block_t, unroll)
            err = float(((got - want).abs() / (want.abs() + 1)).max())
            emit(dict(shape=name, head_dim=d, part="stats", block_t=block_t, unroll=unroll, us=round(us, 1),
                      max_rel_diff=err))
        km, vm = k.float().mean(2)[0].contiguous(), v.float().mean(2)[0].contiguous()
        vamax = (v.float()[0] - vm[:, None]).abs().amax(1).clamp_min(EPS)
        vinv, vs = (FP8_MAX / vamax).contiguous(), (vamax / FP8_MAX).contiguous()
        bn = 128
        nkb = triton.cdiv(n, bn)
        pad = nkb * bn

        def quant(warps: int, split: bool) -> tuple[float, list[torch.Tensor]]:
            k8 = torch.zeros((h * pad, d), device=dev, dtype=torch.int8)
            ks = torch.zeros((h, nkb), device=dev)
            vt = torch.zeros((h * d, pad), device=dev, dtype=torch.float8_e4m3fn)
            vb = torch.zeros((h, nkb, d), device=dev)
            grid = (nkb, h, 2 if split else 1)
            fn = lambda: A._kv_quant_kernel[grid](k, v, km, vm, vinv, vs, k8, ks, vt, vb, h, n, pad, nkb,  # noqa: E731
                                                  *k.stride(), *v.stride(), HEAD_DIM=d, BLOCK_N=bn, SMOOTH_K=True,
                                                  SMOOTH_V=True, PV_FP8=True, EMULATE_FP8=dry, PERMUTE_V=True,
                                                  SPLIT_KV=split, num_warps=warps)
            fn()
            return bench(fn), [k8.clone(), ks.clone(), vt.view(torch.uint8).clone(), vb.clone()]

        prod_q, want_q = quant(prod["quant_warps"], prod["split_kv"])
        emit(dict(shape=name, head_dim=d, part="quant", warps=prod["quant_warps"], split_kv=prod["split_kv"],
                  us=round(prod_q, 1), production=True))
        for warps, split in ((4, False), (8, False), (4, True), (8, True)):
            if (warps, split) == (prod["quant_warps"], prod["split_kv"]):
                continue
            us, got = quant(warps, split)
            same = all(torch.equal(a, b) for a, b in zip(got, want_q))
            emit(dict(shape=name, head_dim=d, part="quant", warps=warps, split_kv=split, us=round(us, 1),
                      same_codes=same))
    return rows


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=None, help="JSON lines file, appended to")
    ap.add_argument("--dry-run-cpu", action="store_true", help="tiny shapes in the Triton interpreter")
    ap.add_argument("--shapes", default=None, help="comma-separated substrings of the shape names to run")
    ap.add_argument("--choose", default=None,
                    help="JSON file to write the fastest choices per head dim to (summed over its shapes)")
    a = ap.parse_args(argv)
    if not a.dry_run_cpu and not torch.cuda.is_available():
        raise SystemExit("kv_pass_sweep.py times CUDA kernels and needs a GPU; --dry-run-cpu checks it on the CPU")
    rows = sweep(a.dry_run_cpu, a.out, a.shapes)
    if a.choose:
        Path(a.choose).write_text(json.dumps(choose(rows), indent=1))


def choose(rows: list[dict]) -> dict[str, dict]:
    """Per head dim, the statistics and quant pass choices with the least time summed over that head dim's shapes,
    among those with the production launch's results (a choice not timed at every such shape is not chosen)."""
    out: dict[str, dict] = {}
    for d in sorted({r["head_dim"] for r in rows}):
        shapes = {r["shape"] for r in rows if r["head_dim"] == d}

        def total(part: str, keys: dict) -> float:
            got = [r for r in rows if r["part"] == part and r["shape"] in shapes
                   and all(r.get(k) == v for k, v in keys.items())]
            return sum(r["us"] for r in got) if len(got) == len(shapes) else float("inf")
        stats = min(({"block_t": r["block_t"], "unroll": r["unroll"]} for r in rows
                     if r["part"] == "stats" and r["shape"] in shapes and r.get("max_rel_diff", 0.0) < 1e-5),
                    key=lambda c: total("stats", c))
        quant = min(({"warps": r["warps"], "split_kv": r["split_kv"]} for r in rows
                     if r["part"] == "quant" and r["shape"] in shapes and r.get("same_codes", True)),
                    key=lambda c: total("quant", c))
        out[str(d)] = dict(stats_block_t=stats["block_t"], stats_unroll=stats["unroll"], split_kv=quant["split_kv"],
                           quant_warps=quant["warps"])
    return out


if __name__ == "__main__":
    main()
