#!/usr/bin/env python
"""H100 check + benchmark for workbench.kernels (torch 2.11, triton 3.6; no diffusers needed).

  python -m workbench.bench.micro            # checks + full benchmark (~3-4 min cold, faster warm)
  python -m workbench.bench.micro --quick    # fewer variants
  OUT=/some/dir python -m workbench.bench.micro   # also writes gpu_kernels_bench.{md,json} there
  (`workbench bench` runs this and the end-to-end benchmark and writes docs/benchmarks.md)

(i) checks every Triton kernel against its reference on the GPU (prints max abs / relative error;
prints a FAILED banner and exits 1 at the end if any check is out of tolerance), then (ii) times
with triton.testing.do_bench (median) the linear shapes of CogVideoX-2B and Wan2.1-1.3B and their
attention, rotating through input buffers larger than L2. A failing variant prints its error and
the table continues. The attention peers (SDPA as torch picks it, SDPA forced to cuDNN / flash,
SageAttention2's sageattn) each run in their own process (`--worker`), so a crashing or hanging peer
costs its row only.
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import os
import platform
import sys
import time
import traceback
from typing import Any, Callable, Dict, List, Optional


import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

T0 = time.time()
DEV = "cuda"          # "cpu" with --dry-run-cpu (Triton interpreter, tiny shapes; tests this script's logic)
DRY = False
ROWS: List[Dict[str, Any]] = []
CHECKS: List[Dict[str, Any]] = []
FAILED: List[str] = []


def log(msg: str) -> None:
    """Print with elapsed time."""
    print(f"[{time.time() - T0:6.1f}s] {msg}", flush=True)


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """Relative Frobenius error in float64."""
    o, r = out.double(), ref.double()
    return float((o - r).norm() / r.norm().clamp_min(1e-30))


def max_abs(out: torch.Tensor, ref: torch.Tensor) -> float:
    """Max absolute difference."""
    return float((out.double() - ref.double()).abs().max())


# ---------------------------------------------------------------------------------- checks

def check(name: str, out: torch.Tensor, ref: torch.Tensor, tol: float, extra: str = "") -> None:
    """Record a kernel-vs-reference comparison; tol bounds the relative Frobenius error."""
    if DRY:  # the interpreter casts fp32->bf16 by truncation (1 ulp ~ 4e-3), the GPU rounds to nearest
        tol = max(tol, 1e-2)
    r, a = rel_err(out, ref), max_abs(out, ref)
    ok = math.isfinite(r) and r <= tol and out.shape == ref.shape
    CHECKS.append(dict(name=name, rel_err=r, max_abs=a, max_ref=float(ref.double().abs().max()), tol=tol, ok=ok,
                       extra=extra))
    log(f"check {name:55s} rel={r:.3e} max_abs={a:.3e} (|ref|max={CHECKS[-1]['max_ref']:.3g}) tol={tol:g} "
        f"{'ok' if ok else '**** FAILED ****'} {extra}")
    if not ok:
        FAILED.append(name)


def guarded(name: str, fn: Callable[[], None]) -> None:
    """Run fn; a crash counts as a failed check and is printed, not raised."""
    try:
        fn()
    except Exception:
        log(f"check {name}: **** CRASHED ****\n{traceback.format_exc()}")
        CHECKS.append(dict(name=name, ok=False, error=traceback.format_exc()[-2000:]))
        FAILED.append(name)


def run_checks(quick: bool) -> None:
    """(i) correctness of every kernel against its reference on the GPU."""
    from workbench.kernels import reference as R
    quant = importlib.import_module("workbench.kernels.act_quant")
    from workbench.kernels.int8_gemm import int8_scaled_mm, w8a8_linear_triton
    from workbench.kernels.fp8_gemm import fp8_linear_triton
    from workbench.kernels.w4a8_gemm import w4a8_linear_triton
    qa_mod = importlib.import_module("workbench.kernels.attention")
    dev = DEV
    g = torch.Generator(device=dev).manual_seed(0)

    def rnd(*shape, scale=1.0):
        return torch.randn(*shape, device=dev, generator=g) * scale

    # fused activation quantizers: dequantized values within one code step
    kq = 96 if DRY else 1920
    x = (rnd(37 if DRY else 4099, kq) * 2 + 0.5).bfloat16()
    lw, lb, ms, msh = rnd(kq), rnd(kq), rnd(1, kq, scale=0.3), rnd(1, kq)
    for fp8 in (False, True):
        tag = "fp8" if fp8 else "int8"
        pairs = [
            ("quantize_rows", lambda: quant.quantize_rows(x, fp8=fp8),
             lambda: (R.quantize_per_token_fp8 if fp8 else R.quantize_per_token_int8)(x)),
            ("layernorm_quant+adaln", lambda: quant.layernorm_quant(x, lw, lb, 1e-5, ms, msh, fp8=fp8),
             lambda: R.layernorm_quant_ref(x, lw, lb, 1e-5, ms, msh, fp8=fp8)),
            ("rmsnorm_quant", lambda: quant.rmsnorm_quant(x, lw, 1e-6, fp8=fp8),
             lambda: R.rmsnorm_quant_ref(x, lw, 1e-6, fp8=fp8)),
            ("gelu_quant", lambda: quant.gelu_quant(x, fp8=fp8), lambda: R.gelu_quant_ref(x, fp8=fp8)),
        ]
        for name, ours, ref in pairs:
            def _c(name=name, ours=ours, ref=ref):
                q, s = ours()
                qr, sr = ref()
                mism = float((q.float() != qr.float()).float().mean())
                check(f"{name} [{tag}] dequant", q.float() * s[..., None], qr.float() * sr[..., None], 1e-2,
                      f"code mismatch {mism:.2e}, scale rel {rel_err(s, sr):.1e}")
            guarded(f"{name} [{tag}]", _c)

    # GEMMs at a ragged M with the real K/N
    m = 37 if DRY else 4099
    for (k, n) in (((128, 64), (256, 32)) if DRY else ((1920, 7680), (7680, 1920))):
        x = rnd(m, k).bfloat16()
        w = rnd(n, k, scale=k ** -0.5)
        b = rnd(n, scale=0.1).bfloat16()
        wq, ws = R.quantize_per_channel_int8(w)
        wf, wfs = R.quantize_per_channel_fp8(w)
        wp, wg = R.quantize_weight_int4_grouped(w, 128)
        wpc, wgc = R.quantize_weight_int4_grouped(w, k)
        impls = ("tma", "ptr")
        for impl in impls:
            guarded(f"w8a8 {impl} {k}x{n}", lambda impl=impl: check(
                f"w8a8_linear [{impl}] M={m} K={k} N={n} +bias", w8a8_linear_triton(x, wq, ws, b, impl=impl),
                R.w8a8_linear_ref(x, wq, ws, b), 2e-3))
            guarded(f"w8a8 gelu {impl} {k}x{n}", lambda impl=impl: check(
                f"w8a8_linear [{impl}] M={m} K={k} N={n} +bias+gelu",
                w8a8_linear_triton(x, wq, ws, b, "gelu_tanh", impl=impl),
                R.w8a8_linear_ref(x, wq, ws, b, "gelu_tanh"), 5e-3))
            guarded(f"fp8 {impl} {k}x{n}", lambda impl=impl: check(
                f"fp8_linear [{impl}] M={m} K={k} N={n} +bias (fast accum)",
                fp8_linear_triton(x, wf, wfs, b, impl=impl),
                R.fp8_rowwise_linear_ref(x, wf, wfs, b), 2e-2))
        guarded(f"fp8 precise {k}x{n}", lambda: check(
            f"fp8_linear [auto] M={m} K={k} N={n} +bias (precise accum)",
            fp8_linear_triton(x, wf, wfs, b, precise_fp8=True), R.fp8_rowwise_linear_ref(x, wf, wfs, b), 5e-3))
        guarded(f"w4a8 {k}x{n}", lambda: check(
            f"w4a8_linear M={m} K={k} N={n} g=128 +bias", w4a8_linear_triton(x, wp, wg, b),
            R.w4a8_linear_ref(x, wp, wg, b), 2e-3))
        guarded(f"w4a8 per-channel {k}x{n}", lambda: check(
            f"w4a8_linear M={m} K={k} N={n} per channel +bias", w4a8_linear_triton(x, wpc, wgc, b),
            R.w4a8_linear_ref(x, wpc, wgc, b), 2e-3))
        xq, xs = R.quantize_per_token_int8(x)
        guarded(f"int8_scaled_mm M=1 {k}x{n}", lambda: check(
            f"int8_scaled_mm M=1 K={k} N={n}", int8_scaled_mm(xq[:1], xs[:1], wq, ws, b),
            R.int8_scaled_mm_ref(xq[:1], xs[:1], wq, ws, b), 2e-3))

    # attention: kernel vs its exact reference (moderate size), and vs fp32 SDPA
    for (h, n, d) in (((2, 45, 32), (1, 40, 16)) if DRY else ((4, 1999, 64), (2, 2100, 128))):
        q, k, v = make_qkv(1, h, n, d, seed=1)
        for pv in ("fp8", "fp16"):
            for impl in ("tma", "ptr", "auto") if pv == "fp8" else ("tma", "ptr"):  # auto: Gluon kernel
                def _a(pv=pv, impl=impl):
                    bm, bn = R.default_blocks(d)
                    # only the default variant is autotuned here (the benchmark uses it); others use a fixed config
                    cfg = None if (impl, pv) in (("tma", "fp8"), ("auto", "fp8")) else {"num_warps": 8, "num_stages": 3}
                    out = qa_mod.quant_attention_triton(q, k, v, pv_dtype=pv, impl=impl, config=cfg)
                    ref = R.quant_attention_ref(q, k, v, block_m=bm, block_n=bn, pv_dtype=pv)
                    sd = F.scaled_dot_product_attention(q.float(), k.float(), v.float())
                    check(f"quant_attention [{impl},{pv}] H={h} N={n} D={d} vs reference", out, ref, 2e-2,
                          f"vs fp32 SDPA {rel_err(out, sd):.2e}")
                    check(f"quant_attention [{impl},{pv}] H={h} N={n} D={d} vs fp32 SDPA", out, sd, 3e-2)
                guarded(f"attn {impl} {pv} D={d}", _a)
        if not quick and not DRY:
            def _f16x2(q=q, k=k, v=v, d=d):
                out = qa_mod.quant_attention_triton(q, k, v, exp_f16x2=True, config={"num_warps": 8, "num_stages": 3})
                sd = F.scaled_dot_product_attention(q.float(), k.float(), v.float())
                check(f"quant_attention [exp f16x2] N={n} D={d} vs fp32 SDPA", out, sd, 3e-2)
            guarded(f"attn f16x2 D={d}", _f16x2)


# ------------------------------------------------------------------------------- benchmark

def make_qkv(b: int, h: int, n: int, d: int, seed: int):
    """DiT-like bf16 q/k/v [B, H, N, D]: normalized activations with per-channel offsets (K biased)."""
    g = torch.Generator(device=DEV).manual_seed(seed)
    cq = torch.randn(d, device=DEV, generator=g)
    ck = torch.randn(d, device=DEV, generator=g)
    cv = torch.randn(d, device=DEV, generator=g)
    q = torch.randn(b, h, n, d, device=DEV, generator=g) * 1.5 + 0.5 * cq
    k = torch.randn(b, h, n, d, device=DEV, generator=g) * 1.5 + 3.0 * ck
    v = torch.randn(b, h, n, d, device=DEV, generator=g) + 2.0 * cv
    return q.bfloat16(), k.bfloat16(), v.bfloat16()


def attention_fp32_chunked(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, chunk: int = 4096) -> torch.Tensor:
    """Exact fp32 softmax attention, one head and query chunk at a time (no TF32, bounded memory)."""
    out = torch.empty(q.shape, dtype=torch.float32, device=q.device)
    scale = q.shape[-1] ** -0.5
    for bi in range(q.shape[0]):
        for hi in range(q.shape[1]):
            kf, vf = k[bi, hi].float(), v[bi, hi].float()
            for i in range(0, q.shape[2], chunk):
                s = (q[bi, hi, i:i + chunk].float() @ kf.t()) * scale
                out[bi, hi, i:i + chunk] = torch.softmax(s, dim=-1) @ vf
    return out


class Rotator:
    """Cycle through n input sets so consecutive timed calls never reuse an L2-resident buffer."""

    def __init__(self, sets: List[Any]) -> None:
        self.sets, self.i = sets, 0

    def next(self) -> Any:
        """The next input set."""
        self.i = (self.i + 1) % len(self.sets)
        return self.sets[self.i]


def n_buffers(bytes_per_set: int) -> int:
    """Enough sets to exceed 3x the L2 size (2..8)."""
    if DRY:
        return 2
    l2 = getattr(torch.cuda.get_device_properties(0), "L2_cache_size", 50 * 2 ** 20) or 50 * 2 ** 20
    return max(2, min(8, math.ceil(3 * l2 / max(bytes_per_set, 1))))


# timed calls per median at least (quick / full): a fixed 40 ms window held only ~5 calls of an 8 ms attention,
# whose median then moved by a few percent from one call of the benchmark to the next
MIN_CALLS = (30, 60)


def timing_window_ms(one_call_ms: float, quick: bool) -> float:
    """do_bench's measuring window for a function taking one_call_ms: 40 / 100 ms, or MIN_CALLS calls if longer."""
    return max(40.0 if quick else 100.0, MIN_CALLS[not quick] * one_call_ms)


def bench_ms(fn: Callable[[], Any], quick: bool) -> float:
    """Median ms of fn with do_bench (warm-up included) over a window of at least MIN_CALLS calls."""
    if DRY:
        t = time.time()
        fn()
        return (time.time() - t) * 1e3
    from triton.testing import do_bench
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    torch.cuda.synchronize()
    rep = timing_window_ms(start.elapsed_time(end), quick)
    return float(do_bench(fn, warmup=10 if quick else 25, rep=rep, return_mode="median"))


def add_row(**kw: Any) -> None:
    """Append a result row and print it."""
    ROWS.append(kw)
    if kw.get("ms") is not None:
        log(f"  {kw['group']:12s} {kw['shape']:28s} {kw['method']:42s} {kw['ms']:8.3f} ms "
            f"{kw.get('tflops', 0):7.1f} TFLOP/s x{kw.get('speedup', float('nan')):.2f} rel={kw.get('rel_err')}")
    else:
        log(f"  {kw['group']:12s} {kw['shape']:28s} {kw['method']:42s} ERROR: {kw.get('error', '')[:300]}")


def time_variant(group: str, shape: str, method: str, fn_factory: Callable[[], Callable[[], Any]], flops: float,
                 base_ms: Optional[float], rel: Optional[Callable[[], float]], quick: bool, budget: float,
                 note: str = "") -> Optional[float]:
    """Time one variant; errors and budget overruns become table rows instead of exceptions."""
    if time.time() - T0 > budget:
        add_row(group=group, shape=shape, method=method, ms=None, error="skipped: time budget exhausted")
        return None
    try:
        fn = fn_factory()
        ms = bench_ms(fn, quick)
        r = None
        if rel is not None:
            try:
                r = rel()
            except Exception as exc:  # error metric failing is not fatal
                note = (note + f" (rel err failed: {exc})").strip()
        add_row(group=group, shape=shape, method=method, ms=ms, tflops=flops / ms / 1e9,
                speedup=(base_ms / ms) if base_ms else 1.0, rel_err=None if r is None else float(f"{r:.3e}"),
                note=note)
        return ms
    except Exception as exc:
        add_row(group=group, shape=shape, method=method, ms=None, error=f"{type(exc).__name__}: {exc}")
        traceback.print_exc()
        if not DRY:
            torch.cuda.synchronize()
        return None


def bench_linears(quick: bool, budget: float, models: List[str]) -> None:
    """(ii) linear layers: bf16 vs torch fp8/int8 paths vs ours."""
    from workbench.kernels import reference as R
    from workbench.kernels.act_quant import quantize_rows
    from workbench.kernels.int8_gemm import int8_scaled_mm, w8a8_linear_triton
    from workbench.kernels.fp8_gemm import fp8_scaled_mm, fp8_linear_triton
    from workbench.kernels.w4a8_gemm import w4a8_linear_triton, w4a8_scaled_mm

    cfgs = {"CogVideoX-2B": (17776 + 226, [(1920, 1920, "qkv/out"), (1920, 7680, "ff1"), (7680, 1920, "ff2")]),
            "Wan2.1-1.3B": (32760, [(1536, 1536, "qkv/out"), (1536, 8960, "ff1"), (8960, 1536, "ff2")])}
    if DRY:
        cfgs = {"CogVideoX-2B": (50, [(128, 128, "qkv/out"), (128, 256, "ff1")]),
                "Wan2.1-1.3B": (40, [(256, 128, "ff2")])}
    for model in models:
        m, layers = cfgs[model]
        for (k, n, lname) in layers:
            shape = f"{lname} M={m} K={k} N={n}"
            log(f"linear {model} {shape}")
            flops = 2.0 * m * k * n
            per_set = m * k * 2 + n * k * 2 + m * k * 2  # bf16 x + w, plus quantized copies
            nb = n_buffers(per_set)
            g = torch.Generator(device=DEV).manual_seed(k * 7 + n)
            sets = []
            for _ in range(nb):
                x = torch.randn(m, k, device=DEV, generator=g).bfloat16()
                w = (torch.randn(n, k, device=DEV, generator=g) * k ** -0.5).bfloat16()
                b = (torch.randn(n, device=DEV, generator=g) * 0.1).bfloat16()
                wq, ws = R.quantize_per_channel_int8(w)
                wf, wfs = R.quantize_per_channel_fp8(w)
                wp, wg = R.quantize_weight_int4_grouped(w, 128)
                wpc, wgc = R.quantize_weight_int4_grouped(w, k)
                xq, xs = quantize_rows(x)
                xf8, xfs = quantize_rows(x, fp8=True)
                sets.append(dict(x=x, w=w, b=b, wq=wq, ws=ws, wqt=wq.t(), wf=wf, wfs=wfs, wft=wf.t(), wp=wp, wg=wg,
                                 wpc=wpc, wgc=wgc, xq=xq, xs=xs, xf8=xf8, xfs=xfs))
            rot = Rotator(sets)
            s0 = sets[0]
            exact = (s0["x"].float() @ s0["w"].float().t() + s0["b"].float())
            exact_gelu = F.gelu(exact, approximate="tanh")

            def rel_of(f, ref=exact):
                return lambda: rel_err(f(s0), ref)

            def mk(f):
                return lambda: (lambda: f(rot.next()))

            def bf16(s):
                return F.linear(s["x"], s["w"], s["b"])

            base = time_variant(model, shape, "bf16 F.linear (cuBLAS)", mk(bf16), flops, None, rel_of(bf16),
                                quick, budget)

            sm_bias = {"ok": True}

            def _smm(xq, xs, s):
                if sm_bias["ok"]:
                    try:
                        return torch._scaled_mm(xq, s["wft"], scale_a=xs[:, None], scale_b=s["wfs"][None, :],
                                                bias=s["b"], out_dtype=torch.bfloat16, use_fast_accum=True)
                    except RuntimeError:
                        sm_bias["ok"] = False
                out = torch._scaled_mm(xq, s["wft"], scale_a=xs[:, None], scale_b=s["wfs"][None, :],
                                       out_dtype=torch.bfloat16, use_fast_accum=True)
                return out + s["b"]

            def scaled_mm_fp8(s):
                return _smm(s["xf8"], s["xfs"], s)

            time_variant(model, shape, "torch._scaled_mm fp8 rowwise (gemm only)", mk(scaled_mm_fp8), flops, base,
                         rel_of(scaled_mm_fp8), quick, budget, "activations pre-quantized, fast accum")

            def scaled_mm_fp8_q(s):
                xq, xs = quantize_rows(s["x"], fp8=True)
                return _smm(xq, xs, s)

            time_variant(model, shape, "torch._scaled_mm fp8 + our fp8 quant", mk(scaled_mm_fp8_q), flops, base,
                         None, quick, budget)

            def int_mm(a, s):
                try:
                    return torch._int_mm(a, s["wqt"])
                except RuntimeError:  # some builds want a row-major [K, N] operand
                    s["wqt"] = s["wqt"].contiguous()
                    return torch._int_mm(a, s["wqt"])

            def naive_int8(s):
                xf = s["x"].float()
                sc = xf.abs().amax(1, keepdim=True).clamp_min(1e-8) / 127.0
                xq = torch.round(xf / sc).to(torch.int8)
                acc = int_mm(xq, s)
                return (acc.float() * sc * s["ws"][None, :] + s["b"].float()).to(torch.bfloat16)

            time_variant(model, shape, "naive W8A8: torch quant + torch._int_mm", mk(naive_int8), flops, base,
                         rel_of(naive_int8), quick, budget)

            def int_mm_only(s):
                return int_mm(s["xq"], s)

            time_variant(model, shape, "torch._int_mm (int32 out, no dequant)", mk(int_mm_only), flops, base,
                         None, quick, budget, "cuBLAS int8 GEMM alone")

            def ours_w8a8(s):
                return w8a8_linear_triton(s["x"], s["wq"], s["ws"], s["b"])

            time_variant(model, shape, "ours W8A8 (incl. act quant)", mk(ours_w8a8), flops, base,
                         rel_of(ours_w8a8), quick, budget)

            def ours_w8a8_gemm(s):
                return int8_scaled_mm(s["xq"], s["xs"], s["wq"], s["ws"], s["b"])

            time_variant(model, shape, "ours W8A8 gemm only (act quant fused upstream)", mk(ours_w8a8_gemm), flops,
                         base, None, quick, budget, "e.g. layernorm_quant producer")
            if not quick:
                def ours_w8a8_ptr(s):
                    return int8_scaled_mm(s["xq"], s["xs"], s["wq"], s["ws"], s["b"], impl="ptr")

                time_variant(model, shape, "ours W8A8 gemm only, pointer (non-TMA) kernel", mk(ours_w8a8_ptr),
                             flops, base, None, quick, budget)

            def ours_fp8(s):
                return fp8_linear_triton(s["x"], s["wf"], s["wfs"], s["b"])

            time_variant(model, shape, "ours FP8 (incl. act quant)", mk(ours_fp8), flops, base, rel_of(ours_fp8),
                         quick, budget)

            def ours_fp8_gemm(s):
                return fp8_scaled_mm(s["xf8"], s["xfs"], s["wf"], s["wfs"], s["b"])

            time_variant(model, shape, "ours FP8 gemm only (act quant fused upstream)", mk(ours_fp8_gemm), flops,
                         base, None, quick, budget)
            if not quick:
                def ours_fp8_precise(s):
                    return fp8_linear_triton(s["x"], s["wf"], s["wfs"], s["b"], precise_fp8=True)

                time_variant(model, shape, "ours FP8 precise accum (incl. act quant)", mk(ours_fp8_precise), flops,
                             base, rel_of(ours_fp8_precise), quick, budget)

            def ours_w4a8(s):
                return w4a8_linear_triton(s["x"], s["wp"], s["wg"], s["b"])

            time_variant(model, shape, "ours W4A8 g128 (incl. act quant)", mk(ours_w4a8), flops, base,
                         rel_of(ours_w4a8), quick, budget)

            def ours_w4a8_channel(s):
                return w4a8_linear_triton(s["x"], s["wpc"], s["wgc"], s["b"])

            time_variant(model, shape, "ours W4A8 per channel (incl. act quant)", mk(ours_w4a8_channel), flops, base,
                         rel_of(ours_w4a8_channel), quick, budget)

            def ours_w4a8_channel_gemm(s):
                return w4a8_scaled_mm(s["xq"], s["xs"], s["wpc"], s["wgc"], s["b"])

            time_variant(model, shape, "ours W4A8 per channel gemm only (act quant fused upstream)",
                         mk(ours_w4a8_channel_gemm), flops, base, None, quick, budget)

            def act_quant(s):
                return quantize_rows(s["x"])

            time_variant(model, shape, "  (ours int8 act quant alone)", mk(act_quant), flops, base, None, quick,
                         budget, "TFLOP/s column meaningless")
            if lname == "ff1":
                def bf16_gelu(s):
                    return F.gelu(F.linear(s["x"], s["w"], s["b"]), approximate="tanh")

                base_g = time_variant(model, shape + " +GELU", "bf16 F.linear + F.gelu", mk(bf16_gelu), flops, None,
                                      rel_of(bf16_gelu, exact_gelu), quick, budget)

                def ours_gelu(s):
                    return w8a8_linear_triton(s["x"], s["wq"], s["ws"], s["b"], "gelu_tanh")

                time_variant(model, shape + " +GELU", "ours W8A8 + fused GELU epilogue (incl. quant)",
                             mk(ours_gelu), flops, base_g, rel_of(ours_gelu, exact_gelu), quick, budget)
            del sets, rot, s0, exact, exact_gelu
            if not DRY:
                torch.cuda.empty_cache()


# B, H, N, D; HunyuanVideo-like: 24 heads of 128 at 32,768 tokens (attention only: no linear rows for it)
ATTN_SHAPES = {"CogVideoX-2B": (1, 30, 17776, 64), "Wan2.1-1.3B": (1, 12, 32760, 128),
               "HunyuanVideo-like": (1, 24, 32768, 128)}
ATTN_SHAPES_DRY = {"CogVideoX-2B": (1, 2, 70, 32), "Wan2.1-1.3B": (1, 1, 50, 16), "HunyuanVideo-like": (1, 1, 40, 16)}
# The peers, each timed in its own process (method label -> peer); the first is the speed-up baseline.
ATTN_PEERS = {"SDPA bf16 (backend torch picks)": "sdpa", "SDPA bf16 CUDNN_ATTENTION": "cudnn",
              "SDPA bf16 FLASH_ATTENTION": "flash", "SageAttention2 sageattn (int8 QK, fp8 PV)": "sage"}


def attn_inputs(model: str) -> tuple[str, float, "Rotator", tuple]:
    """The model's attention shape label, FLOPs, rotating q/k/v sets (seeded: the same in every process) and
    the first set."""
    b, h, n, d = (ATTN_SHAPES_DRY if DRY else ATTN_SHAPES)[model]
    sets = [make_qkv(b, h, n, d, seed=i) for i in range(n_buffers(3 * b * h * n * d * 2))]
    return f"attn B={b} H={h} N={n} D={d}", 4.0 * b * h * n * n * d, Rotator(sets), sets[0]


def attn_peer_fn(peer: str) -> Callable[..., torch.Tensor]:
    """One peer's attention call on [B, H, N, D] bf16 q/k/v."""
    if peer == "sdpa":
        return lambda q, k, v: F.scaled_dot_product_attention(q, k, v)
    if peer in ("cudnn", "flash"):
        from torch.nn.attention import SDPBackend, sdpa_kernel

        from workbench.bench.peers import SDPA_BACKENDS
        backend = getattr(SDPBackend, SDPA_BACKENDS[peer])

        def forced(q, k, v):
            with sdpa_kernel(backend):
                return F.scaled_dot_product_attention(q, k, v)
        return forced
    if peer == "sage":
        import sageattention
        return lambda q, k, v: sageattention.sageattn(q, k, v, tensor_layout="HND", is_causal=False)
    raise ValueError(f"unknown attention peer {peer!r}; known: {sorted(set(ATTN_PEERS.values()))}")


def _attn_peer_worker(spec: Dict[str, Any]) -> Dict[str, Any]:
    """`--worker SPEC`: time one attention peer in this fresh process; returns its table row."""
    global DEV, DRY
    from workbench.bench import isolate
    isolate.inject_fault(spec.get("fault"))
    DEV, DRY = spec["device"], spec["dry"]
    torch.backends.cuda.matmul.allow_tf32 = False  # as main(): the fp32 reference must be real fp32
    torch.backends.cudnn.allow_tf32 = False
    model, method, peer = spec["model"], spec["method"], spec["peer"]
    shape, flops, rot, (q0, k0, v0) = attn_inputs(model)
    fn = attn_peer_fn(peer)
    rel = None
    if spec["rel"]:
        ref = attention_fp32_chunked(q0, k0, v0)
        rel = lambda: rel_err(fn(q0, k0, v0), ref)  # noqa: E731
    time_variant(model, shape, method, lambda: (lambda: fn(*rot.next())), flops, spec["base_ms"], rel,
                 spec["quick"], float("inf"), "own process")
    return ROWS[-1]


def attn_peer_row(model: str, method: str, base_ms: Optional[float], quick: bool, budget: float,
                  timeout_s: float) -> Optional[float]:
    """Time one attention peer in its own process (a crash or hang costs its row only); returns its ms."""
    import tempfile
    from pathlib import Path

    from workbench.bench import isolate, peers
    peer = ATTN_PEERS[method]
    b, h, n, d = (ATTN_SHAPES_DRY if DRY else ATTN_SHAPES)[model]
    shape = f"attn B={b} H={h} N={n} D={d}"
    skip = peers.unavailable(torchao=False, sage=peer == "sage")
    if skip is None and DRY and peer == "sage":
        skip = "skipped: SageAttention2 needs a CUDA GPU (dry run)"
    if skip is None and time.time() - T0 > budget:
        skip = "skipped: time budget exhausted"
    if skip:
        add_row(group=model, shape=shape, method=method, ms=None, error=skip)
        return None
    spec = dict(device=DEV, dry=DRY, model=model, method=method, peer=peer, quick=quick, base_ms=base_ms,
                rel=peer in ("sdpa", "sage"))
    with tempfile.TemporaryDirectory(prefix="workbench-micro-") as tmp:
        res = isolate.run_worker("workbench.bench.micro", spec, Path(tmp), f"attn-{peer}", timeout_s, log, method)
    if res.result is None:
        add_row(group=model, shape=shape, method=method, ms=None, error=res.error)
        return None
    ROWS.append(res.result)
    log(f"  {model:12s} {shape:28s} {method:42s} (own process, {res.seconds:.0f} s)")
    return res.result.get("ms")


def bench_attention(quick: bool, budget: float, models: List[str], peer_timeout_s: float = 300.0) -> None:
    """(ii) attention: SDPA (as torch picks, plus explicit backends) and SageAttention2, each in its own process,
    vs ours (in this one)."""
    qa_mod = importlib.import_module("workbench.kernels.attention")
    for model in models:
        b, h, n, d = (ATTN_SHAPES_DRY if DRY else ATTN_SHAPES)[model]
        log(f"attention {model} attn B={b} H={h} N={n} D={d}")
        base = None
        for method in ATTN_PEERS:
            ms = attn_peer_row(model, method, base, quick, budget, peer_timeout_s)
            if ATTN_PEERS[method] == "sdpa":
                base = ms
        shape, flops, rot, (q0, k0, v0) = attn_inputs(model)
        ref = attention_fp32_chunked(q0, k0, v0)

        def rel_of(f):
            return lambda: rel_err(f(q0, k0, v0), ref)

        def mk(f):
            return lambda: (lambda: f(*rot.next()))

        def ours(q, k, v):
            return qa_mod.quant_attention_triton(q, k, v)

        time_variant(model, shape, f"ours int8 QK / fp8 PV (blocks {qa_mod.default_blocks(d)})", mk(ours), flops,
                     base, rel_of(ours), quick, budget, "incl. K/V quant + stats passes")
        best = qa_mod.last_best_config()
        cfg = None
        if best is not None:
            nw = int(best.split("num_warps: ")[1].split(",")[0]) if "num_warps: " in best else 8
            ns = int(best.split("num_stages: ")[1].split(",")[0]) if "num_stages: " in best else 3
            cfg = {"num_warps": nw, "num_stages": ns}
        variants = []
        if not quick:
            variants += [
                ("ours + exp2 via ex2.approx.f16x2 (sm_90: 2 MUFU ops)", dict(exp_f16x2=True)),
                ("ours, other block_n", dict(block_n=64 if d <= 64 else 128)),
                ("ours, fast fp8 PV accum (no promotion)", dict(pv_promote=False)),
                ("ours, pointer loads (no TMA)", dict(impl="ptr")),
                ("ours int8 QK / fp16 PV (SageAttention1)", dict(pv_dtype="fp16")),
            ]
        for label, kw in variants:
            if DRY and kw.get("exp_f16x2"):
                continue
            def v_fn(q, k, v, kw=kw):
                return qa_mod.quant_attention_triton(q, k, v, config=cfg, **kw)
            time_variant(model, shape, label, mk(v_fn), flops, base, rel_of(v_fn), quick, budget,
                         f"config {cfg}")
        del rot, q0, k0, v0, ref
        if not DRY:
            torch.cuda.empty_cache()


# ---------------------------------------------------------------------------------- report

def markdown() -> str:
    """Results as markdown tables."""
    lines = ["| group | shape | method | ms | TFLOP/s | speedup vs bf16/SDPA | rel err vs fp32 | note |",
             "|---|---|---|---:|---:|---:|---:|---|"]
    for r in ROWS:
        if r.get("ms") is None:
            err = r.get("error", "")[:400].replace("|", "/")
            lines.append(f"| {r['group']} | {r['shape']} | {r['method']} | - | - | - | - | {err} |")
        else:
            rel = "-" if r.get("rel_err") is None else f"{r['rel_err']:.2e}"
            lines.append(f"| {r['group']} | {r['shape']} | {r['method']} | {r['ms']:.3f} | {r['tflops']:.1f} | "
                         f"{r['speedup']:.2f}x | {rel} | {r.get('note', '')} |")
    chk = ["| check | rel err | max abs | tol | ok |", "|---|---:|---:|---:|---|"]
    for c in CHECKS:
        if "rel_err" in c:
            chk.append(f"| {c['name']} | {c['rel_err']:.2e} | {c['max_abs']:.2e} | {c['tol']:g} | "
                       f"{'ok' if c['ok'] else 'FAILED'} |")
        else:
            chk.append(f"| {c['name']} | - | - | - | CRASHED |")
    return "\n".join(["## Correctness (GPU kernel vs reference)", "", *chk, "", "## Benchmark", "", *lines])


def env_info() -> Dict[str, Any]:
    """Versions and device facts."""
    import triton
    if DRY:
        return dict(torch=torch.__version__, triton=triton.__version__, device="cpu (dry run, Triton interpreter)")
    p = torch.cuda.get_device_properties(0)
    return dict(torch=torch.__version__, triton=triton.__version__, cuda=torch.version.cuda,
                device=p.name, capability=list(torch.cuda.get_device_capability(0)), sms=p.multi_processor_count,
                l2_bytes=getattr(p, "L2_cache_size", None), python=platform.python_version())


def tuned_configs() -> Dict[str, Optional[str]]:
    """Most recent autotuner picks (last shape tuned)."""
    out: Dict[str, Optional[str]] = {}
    try:
        sm = importlib.import_module("workbench.kernels.scaled_mm")
        out["scaled_mm_tma"] = sm.last_best_config("tma")
        out["scaled_mm_ptr"] = sm.last_best_config("ptr")
        out["w4a8"] = importlib.import_module("workbench.kernels.w4a8_gemm").last_best_config()
        out["attention"] = importlib.import_module("workbench.kernels.attention").last_best_config()
    except Exception as exc:
        out["error"] = str(exc)
    return out


def main(argv: Optional[List[str]] = None) -> int:
    """Entry point."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer variants and shorter timing")
    ap.add_argument("--skip-checks", action="store_true")
    ap.add_argument("--only", choices=["linear", "attention"], default=None)
    ap.add_argument("--models", default="CogVideoX-2B,Wan2.1-1.3B", help="models of the linear rows")
    ap.add_argument("--attn-models", default=",".join(ATTN_SHAPES), help="attention shapes (names of ATTN_SHAPES)")
    ap.add_argument("--budget", type=float, default=225.0, help="seconds after which remaining timings are skipped")
    ap.add_argument("--dry-run-cpu", action="store_true",
                    help="exercise this script on CPU with tiny shapes in the Triton interpreter (no timings)")
    ap.add_argument("--peer-timeout", type=float, default=300.0,
                    help="seconds one attention peer's process may run before it is killed")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # internal: one attention peer, from a spec file
    args = ap.parse_args(argv)
    global DEV, DRY
    if args.worker:
        from workbench.bench.isolate import worker_main
        worker_main(args.worker, _attn_peer_worker)
        return 0
    if args.dry_run_cpu:
        os.environ["TRITON_INTERPRET"] = "1"   # before any triton import
        DEV, DRY = "cpu", True
    elif not torch.cuda.is_available():
        print("No CUDA device: this script is meant for the H100 run.", file=sys.stderr)
        return 2
    from workbench.kernels.dispatch import unavailable_reason
    reason = None if DRY else unavailable_reason("fp8", torch.device("cuda"))
    info = env_info()
    log(f"env {json.dumps(info)}")
    if reason:
        log(f"WARNING: Triton path unavailable: {reason}")
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    attn_models = [m.strip() for m in args.attn_models.split(",") if m.strip()]
    unknown = [m for m in attn_models if m not in ATTN_SHAPES]
    if unknown:
        ap.error(f"unknown --attn-models {unknown}; known: {list(ATTN_SHAPES)}")
    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 references must be real fp32
    torch.backends.cudnn.allow_tf32 = False
    if not args.skip_checks:
        run_checks(args.quick)
    # attention first: it decides the end-to-end speed at these token counts, so a tight budget keeps it
    if args.only in (None, "attention"):
        bench_attention(args.quick, args.budget, attn_models, args.peer_timeout)
    if args.only in (None, "linear"):
        bench_linears(args.quick, args.budget + 20, models)
    md = markdown()
    print("\n" + md + "\n")
    result = dict(env=info, checks=CHECKS, rows=ROWS, failed_checks=FAILED, tuned_configs=tuned_configs(),
                  wall_s=time.time() - T0, args=vars(args))
    out_dir = os.environ.get("OUT")
    if out_dir:
        os.makedirs(out_dir, exist_ok=True)
        with open(os.path.join(out_dir, "gpu_kernels_bench.md"), "w") as f:
            f.write(f"env: `{json.dumps(info)}`\n\n{md}\n")
        with open(os.path.join(out_dir, "gpu_kernels_bench.json"), "w") as f:
            json.dump(result, f, indent=1, default=str)
        log(f"wrote {out_dir}/gpu_kernels_bench.md and .json")
    if FAILED:
        bar = "!" * 80
        print(f"\n{bar}\nFAILED CORRECTNESS CHECKS ({len(FAILED)}):\n  " + "\n  ".join(FAILED) + f"\n{bar}")
        return 1
    log("all correctness checks passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
