"""Quantized attention vs SDPA and SageAttention2 on the three issue shapes (CUDA GPU; the NOTES.md table).

    python scripts/attention_sweep.py ours --out rows.jsonl   # SDPA cuDNN, our Triton and Gluon kernels
    python scripts/attention_sweep.py sage --out rows.jsonl   # SageAttention2 (needs `import sageattention`)
    python scripts/attention_sweep.py schedules --out rows.jsonl   # the Gluon kernel's ring depths / register caps

Inputs: batch 1, bf16 randn Q/K/V with a per-channel offset on K (3 x randn, seed 0); times from
`triton.testing.do_bench` (25 warm-up, 100 ms), whole call (our K/V passes included); error: relative L2 against
fp32 attention (SDPA's memory-efficient backend on fp32 inputs). One JSON row per line, appended as measured.
"""
from __future__ import annotations

import argparse
import json
import math
import time

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

SHAPES = [("CogVideoX-2B", 1, 30, 17776, 64), ("Wan2.1-1.3B", 1, 12, 32760, 128),
          ("HunyuanVideo-like", 1, 24, 32768, 128)]


def inputs(b: int, h: int, n: int, d: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """bf16 Q, K, V on the GPU; K carries a per-channel offset like a DiT's keys."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    q = torch.randn(b, h, n, d, device="cuda", dtype=torch.bfloat16, generator=g)
    k = torch.randn(b, h, n, d, device="cuda", dtype=torch.bfloat16, generator=g)
    k = k + 3.0 * torch.randn(1, h, 1, d, device="cuda", dtype=torch.bfloat16, generator=g)
    v = torch.randn(b, h, n, d, device="cuda", dtype=torch.bfloat16, generator=g)
    return q, k, v


def candidates(part: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> list[tuple[str, object]]:
    """(name, zero-argument callable) of every variant of one part."""
    if part == "sage":
        from sageattention import sageattn
        return [("SageAttention2 sm90 (sageattn)", lambda: sageattn(q, k, v, tensor_layout="HND"))]
    from workbench.kernels.attention import quant_attention_triton
    if part == "schedules":
        from workbench.kernels import attention_sm90 as G

        def sched(stages: int, maxnreg: int | None):
            def fn() -> torch.Tensor:
                saved = G.FA3_SCHEDULE[q.shape[-1]]
                G.FA3_SCHEDULE[q.shape[-1]] = dict(stages=stages, maxnreg=maxnreg)
                try:
                    return quant_attention_triton(q, k, v, impl="fa3")
                finally:
                    G.FA3_SCHEDULE[q.shape[-1]] = saved
            return fn
        return [(f"ours Gluon sm_90, {st}-slot ring, maxnreg {mr}", sched(st, mr))
                for st, mr in ((1, None), (2, None), (3, None), (4, None), (2, 168))]

    def cudnn() -> torch.Tensor:
        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            return F.scaled_dot_product_attention(q, k, v)
    out = [("SDPA cuDNN", cudnn),
           ("ours Triton (impl=tma, 128x128 blocks)", lambda: quant_attention_triton(q, k, v, impl="tma", block_m=128,
                                                                                   block_n=128)),
           ("ours default (impl=auto)", lambda: quant_attention_triton(q, k, v))]
    for bn in (64, 128):
        out.append((f"ours Gluon sm_90 (impl=fa3, 64x{bn})",
                    lambda bn=bn: quant_attention_triton(q, k, v, impl="fa3", block_m=64, block_n=bn)))
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("part", choices=["ours", "sage", "schedules"])
    ap.add_argument("--out", default="attention_sweep.jsonl", help="JSON lines file, appended to")
    a = ap.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("attention_sweep.py times CUDA kernels and needs a GPU")
    import triton
    for name, b, h, n, d in SHAPES:
        q, k, v = inputs(b, h, n, d)
        with sdpa_kernel(SDPBackend.EFFICIENT_ATTENTION):
            ref = F.scaled_dot_product_attention(q.float(), k.float(), v.float())
        for variant, fn in candidates(a.part, q, k, v):
            row: dict = {"shape": name, "tokens": n, "heads": h, "head_dim": d, "variant": variant}
            try:
                t0 = time.time()
                o = fn()
                torch.cuda.synchronize()
                err = float((o.float() - ref).norm() / ref.norm())
                if not math.isfinite(err) or err > 0.2:
                    raise FloatingPointError(f"bad output: relative error {err}")
                ms = triton.testing.do_bench(fn, warmup=25, rep=100)
                row.update(ms=round(ms, 4), tflops=round(4 * b * h * n * n * d / ms / 1e9, 1), rel_err=round(err, 5),
                           first_call_s=round(time.time() - t0, 1))
            except Exception as exc:  # noqa: BLE001 - one failing variant must not lose the others
                row["error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
            print(json.dumps(row), flush=True)
            with open(a.out, "a") as f:
                f.write(json.dumps(row) + "\n")
        del q, k, v, ref
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
