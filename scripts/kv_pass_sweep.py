"""Launch-parameter sweep of quant_attention's K/V passes (the NOTES.md K/V pass table), us a call.

    python scripts/kv_pass_sweep.py --out kv.jsonl       # CUDA GPU: the three issue shapes
    python scripts/kv_pass_sweep.py --dry-run-cpu         # tiny shapes in the Triton interpreter (checks the script)

K and V are what diffusers hands to attention: [B, H, N, D] views of a [B, N, 3, H, D] projection (token stride
3 * H * D), K with a per-channel offset. Rows: the statistics pass (`_kv_stats_kernel`) per register-tile height
BLOCK_T, programs per SM and warps; the quant pass (`_kv_quant_kernel`, 128-key blocks) per warps, with and
without the Gluon kernel's V token order. Each row's outputs are checked against the production launch's.
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


def sweep(dry: bool, out: str | None) -> list[dict]:
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
        g = torch.Generator(device=dev).manual_seed(0)
        dtype = torch.float32 if dry else torch.bfloat16
        base = torch.randn(1, n, 3, h, d, device=dev, dtype=dtype, generator=g)
        base[:, :, 1] += 3 * torch.randn(h, d, device=dev, dtype=dtype, generator=g)
        k, v = base[:, :, 1].transpose(1, 2), base[:, :, 2].transpose(1, 2)
        ideal = 2 * k.numel() * k.element_size() / 4.8e12 * 1e6

        def stats(block_t: int, per_sm: int, warps: int) -> torch.Tensor:
            splits = max(1, min(triton.cdiv(n, block_t), triton.cdiv(per_sm * num_sms(dev), h)))
            tps = triton.cdiv(triton.cdiv(n, splits), block_t) * block_t
            splits = triton.cdiv(n, tps)
            part = torch.empty((4, h, splits, d), device=dev, dtype=torch.float32)
            fn = lambda: A._kv_stats_kernel[(h, splits)](k, v, part[0], part[1], part[2], part[3], h, n, tps, splits,  # noqa: E731
                                                         *k.stride(), *v.stride(), HEAD_DIM=d, BLOCK_T=block_t,
                                                         num_warps=warps)
            fn()
            us = bench(fn)
            return us, torch.stack([part[0].sum(1), part[1].sum(1), part[2].amin(1), part[3].amax(1)])

        prod_us, want = stats(2048 // d, 4, 4)
        emit(dict(shape=name, part="stats", block_t=2048 // d, per_sm=4, warps=4, us=round(prod_us, 1),
                  production=True, read_at_4_8_TBs_us=round(ideal, 1)))
        for block_t in (16, 32, 64):
            for per_sm in (4, 8, 16):
                for warps in (4, 8):
                    if (block_t, per_sm, warps) == (2048 // d, 4, 4) or (dry and per_sm > 4):
                        continue
                    us, got = stats(block_t, per_sm, warps)
                    err = float(((got - want).abs() / (want.abs() + 1)).max())
                    emit(dict(shape=name, part="stats", block_t=block_t, per_sm=per_sm, warps=warps, us=round(us, 1),
                              max_rel_diff=err))
        km, vm = k.float().mean(2)[0].contiguous(), v.float().mean(2)[0].contiguous()
        vamax = (v.float()[0] - vm[:, None]).abs().amax(1).clamp_min(EPS)
        vinv, vs = (FP8_MAX / vamax).contiguous(), (vamax / FP8_MAX).contiguous()
        bn = 128
        nkb = triton.cdiv(n, bn)
        pad = nkb * bn

        def quant(warps: int, permute: bool) -> tuple[float, torch.Tensor]:
            k8 = torch.zeros((h * pad, d), device=dev, dtype=torch.int8)
            ks = torch.zeros((h, nkb), device=dev)
            vt = torch.zeros((h * d, pad), device=dev, dtype=torch.float8_e4m3fn)
            vb = torch.zeros((h, nkb, d), device=dev)
            fn = lambda: A._kv_quant_kernel[(nkb, h)](k, v, km, vm, vinv, vs, k8, ks, vt, vb, h, n, pad, nkb,  # noqa: E731
                                                      *k.stride(), *v.stride(), HEAD_DIM=d, BLOCK_N=bn, SMOOTH_K=True,
                                                      SMOOTH_V=True, PV_FP8=True, EMULATE_FP8=dry, PERMUTE_V=permute,
                                                      num_warps=warps)
            fn()
            return bench(fn), vt.view(torch.uint8).clone()

        prod_q, want_vt = quant(4, True)
        emit(dict(shape=name, part="quant", warps=4, permute_v=True, us=round(prod_q, 1), production=True))
        for warps, permute in ((8, True), (4, False), (8, False)):
            us, vt = quant(warps, permute)
            row = dict(shape=name, part="quant", warps=warps, permute_v=permute, us=round(us, 1))
            if permute:
                row["same_codes"] = bool(torch.equal(vt, want_vt))
            emit(row)
    return rows


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=None, help="JSON lines file, appended to")
    ap.add_argument("--dry-run-cpu", action="store_true", help="tiny shapes in the Triton interpreter")
    a = ap.parse_args(argv)
    if not a.dry_run_cpu and not torch.cuda.is_available():
        raise SystemExit("kv_pass_sweep.py times CUDA kernels and needs a GPU; --dry-run-cpu checks it on the CPU")
    sweep(a.dry_run_cpu, a.out)


if __name__ == "__main__":
    main()
