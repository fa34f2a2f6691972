"""Triton-kernel-vs-reference checks run in a subprocess with TRITON_INTERPRET=1 (CPU interpreter).

Run as ``TRITON_INTERPRET=1 python tests/kernels/_interp_checks.py [name ...]``; prints one JSON line
{name: {"err": float, "tol": float, "error": str | None}} as the last line of stdout.

Every GEMM / attention check returns (max |kernel - reference| / bound, 1.0): the elementwise bound is
derived in `_tolerances.py` from the formats' rounding (exact integer accumulation, fp32 epilogue, the
interpreter's truncating fp32 -> bf16 cast). The references are evaluated on the *same codes* the kernel
computes with, so any wrong code, scale, tile or mask shows up as an error far above the bound.

What the interpreter runs: the kernels' Python bodies, tile by tile, in numpy, including the persistent TMA
GEMM (`impl="tma"`: host-side TensorDescriptors, descriptor loads with out-of-bounds zero fill, the split
epilogue store) and the TMA attention path. What it cannot run: the inline PTX fast-math paths
(tanh.approx.f32 GELU, ex2.approx.f16x2; the kernels take the portable branch, FAST=False), wgmma and its
fp8 accumulator precision (`precise_fp8` / `max_num_imprecise_acc` are ignored), the hardware fp8 cast
(the kernels round onto the e4m3 grid in fp32 first, EMULATE_FP8), autotuning (needs CUDA events:
explicit configs are passed), and real TMA hardware (alignment, swizzle, pipelining). `test_gpu.py` checks
those on a GPU and `test_sm90_compile.py` compiles them for sm_90.
"""

from __future__ import annotations

import json
import os
import sys
import traceback
from typing import Callable, Dict, Tuple

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, ROOT)
sys.path.insert(0, HERE)

import torch  # noqa: E402

import _tolerances as TOL  # noqa: E402
from _producers import kernel_and_reference  # noqa: E402
from workbench.kernels import reference as R  # noqa: E402

CHECKS: Dict[str, Callable[[], Tuple[float, float]]] = {}


def check(fn: Callable[[], Tuple[float, float]]) -> Callable[[], Tuple[float, float]]:
    """Register a check returning (error, tolerance)."""
    CHECKS[fn.__name__] = fn
    return fn


def _g(seed: int) -> torch.Generator:
    """Seeded generator."""
    return torch.Generator().manual_seed(seed)


GEMM_CFG = {"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 32, "num_warps": 4, "num_stages": 2}
# the largest production TMA config (scaled_mm.TMA_CONFIGS[0]: 128x256x128, split epilogue store)
TMA_PROD_CFG = {"BLOCK_M": 128, "BLOCK_N": 256, "BLOCK_K": 128, "num_warps": 8, "num_stages": 3,
                "EPILOGUE_SUBTILE": True}


# ------------------------------------------------------------------------------------------ GEMMs

def _gemm_ref(xq, xs, wq, ws, bias, act, fp8: bool):
    """(fp32 reference output, its bound's ingredients) of a scaled GEMM on the given codes.

    The accumulator is exact in float64 (int8 or e4m3 products); |acc| a b is the magnitude the fp32
    epilogue rounds; for fp8 the kernel sums K exact products in fp32 (interpreter: numpy dot per BLOCK_K,
    GPU: the wgmma accumulator), bounded by gamma(K) sum |x_k w_k| (`_tolerances.fp32_dot_err`).
    """
    acc = xq.double() @ wq.double().t()
    dq = xs.double()[:, None] * ws.double()[None, :]
    pre = acc * dq + (bias.double()[None, :] if bias is not None else 0.0)
    acc_err = 0.0
    if fp8:
        acc_err = TOL.fp32_dot_err(xq.double().abs() @ wq.double().abs().t(), xq.shape[1]) * dq
    refn = R.fp8_scaled_mm_ref if fp8 else R.int8_scaled_mm_ref
    ref = refn(xq, xs, wq, ws, bias, act, torch.float32)
    bias_abs = bias.double().abs()[None, :] if bias is not None else 0.0
    return ref, dict(prod_abs=(acc * dq).abs(), bias_abs=bias_abs, acc_err=acc_err,
                     gelu_in=pre if act else None)


def _gemm_operands(m: int, k: int, n: int, fp8: bool, seed: int):
    """Quantized activations/weights + bias for GEMM checks."""
    g = _g(seed)
    x = torch.randn(m, k, generator=g) * 2
    w = torch.randn(n, k, generator=g)
    b = torch.randn(n, generator=g)
    if fp8:
        return (*R.quantize_per_token_fp8(x), *R.quantize_per_channel_fp8(w), b)
    return (*R.quantize_per_token_int8(x), *R.quantize_per_channel_int8(w), b)


def _scaled_mm_check(fp8: bool, impl: str, act, m: int = 37, k: int = 80, n: int = 48,
                     subtile: bool = False) -> Tuple[float, float]:
    """scaled_mm vs reference in fp32 output (ragged M and K, N not a multiple of BLOCK_N).

    Bound: int8 -> only the fp32 epilogue (2 gamma(3) of |acc a b| + |bias|), in practice bit-exact;
    fp8 -> plus gamma(K) sum |x w| a b for the fp32 sum of K exact products; GELU adds 8 u |x| (+1.13x).
    """
    from workbench.kernels.scaled_mm import scaled_mm
    xq, xs, wq, ws, b = _gemm_operands(m, k, n, fp8, seed=1)
    cfg = dict(GEMM_CFG, EPILOGUE_SUBTILE=subtile)
    out = scaled_mm(xq, xs, wq, ws, b, act, torch.float32, impl=impl, config=cfg)
    ref, parts = _gemm_ref(xq, xs, wq, ws, b, act, fp8)
    return TOL.compare(out, ref, TOL.gemm_err(**parts), interpreter=True)


for _impl in ("ptr", "tma"):
    for _fp8 in (False, True):
        for _act in (None, "gelu_tanh"):
            def _mk(impl=_impl, fp8=_fp8, act=_act):
                def fn():
                    return _scaled_mm_check(fp8, impl, act, subtile=(impl == "tma" and act is None))
                fn.__name__ = f"scaled_mm_{'fp8' if fp8 else 'int8'}_{impl}_{act or 'none'}"
                return fn
            check(_mk())


def _asym_check(impl: str, act, subtile: bool) -> Tuple[float, float]:
    """scaled_mm with asymmetric activations (ViDiT-Q's uint8 per token): codes - 128, zero - 128 and the weight
    row sums, the zero point removed in the epilogue; fp32 output, ragged M/N/K.

    Bound: the int8 accumulator and z * sum_k w are exact integers-by-small-floats (|z| <= 255, |sum| < 2^15),
    so the fp32 epilogue rounds (acc - z bsum) once more than the symmetric path: 2 gamma(3) of
    (|acc| + |z bsum|) a b + |bias| covers it (the terms `gemm_err` sums).
    """
    from workbench.kernels.scaled_mm import scaled_mm
    g = _g(5)
    x = torch.rand(37, 80, generator=g) * 6 - 1  # skewed: the zero point is far from the middle
    w = torch.randn(48, 80, generator=g)
    b = torch.randn(48, generator=g)
    xq, xs, xz = R.quantize_per_token_uint8(x)
    wq, ws = R.quantize_per_channel_int8(w)
    bsum = R.weight_row_sums(wq)
    cfg = dict(GEMM_CFG, EPILOGUE_SUBTILE=subtile)
    out = scaled_mm(xq, xs, wq, ws, b, act, torch.float32, impl=impl, config=cfg, a_zero=xz, b_sum=bsum)
    ref = R.int8_scaled_mm_ref(xq, xs, wq, ws, b, act, torch.float32, xz, bsum)
    acc = xq.double() @ wq.double().t()
    dq = xs.double()[:, None] * ws.double()[None, :]
    zterm = xz.double()[:, None] * bsum.double()[None, :]
    # the reference is the dequantized float64 product of the true codes: check that first, exactly
    true = ((xq.double() + 128 - (xz.double()[:, None] + 128)) @ wq.double().t()) * dq + b.double()[None, :]
    assert torch.equal((acc - zterm) * dq + b.double()[None, :], true)
    pre = (acc - zterm) * dq + b.double()[None, :]
    err = TOL.gemm_err(prod_abs=(acc.abs() + zterm.abs()) * dq, bias_abs=b.double().abs()[None, :],
                       gelu_in=pre if act else None)
    return TOL.compare(out, ref, err, interpreter=True)


for _impl in ("ptr", "tma"):
    for _act in (None, "gelu_tanh"):
        def _mk_asym(impl=_impl, act=_act):
            def fn():
                return _asym_check(impl, act, subtile=(impl == "tma" and act is None))
            fn.__name__ = f"scaled_mm_int8_asym_{impl}_{act or 'none'}"
            return fn
        check(_mk_asym())


def _linear_check(fp8: bool, impl: str, act, x: torch.Tensor, n: int, cfg: dict, seed: int) -> Tuple[float, float]:
    """Full linear path (fused per-token quant kernel + GEMM) on bf16 x with a bf16 bias; bf16 output.

    The reference runs on x.float() (the same values, so the same codes: the interpreter's row quantizer is
    bit-exact, see quant_rows_*) with fp32 output; the kernel's bf16 output must be a truncation of a value
    within the epilogue's fp32 bound of it (`_tolerances.compare`).
    """
    from workbench.kernels.fp8_gemm import fp8_linear_triton
    from workbench.kernels.int8_gemm import w8a8_linear_triton
    g = _g(seed)
    k = x.shape[-1]
    w = torch.randn(n, k, generator=g) * k ** -0.5
    b = (torch.randn(n, generator=g) * 0.1).bfloat16()
    if fp8:
        wq, ws = R.quantize_per_channel_fp8(w)
        out = fp8_linear_triton(x, wq, ws, b, act, config=cfg, impl=impl)
        xq, xs = R.quantize_per_token_fp8(x.float().reshape(-1, k))
    else:
        wq, ws = R.quantize_per_channel_int8(w)
        out = w8a8_linear_triton(x, wq, ws, b, act, config=cfg, impl=impl)
        xq, xs = R.quantize_per_token_int8(x.float().reshape(-1, k))
    assert out.dtype == torch.bfloat16 and out.shape == (*x.shape[:-1], n), (out.dtype, out.shape)
    ref, parts = _gemm_ref(xq, xs, wq, ws, b.float(), act, fp8)
    return TOL.compare(out.reshape(-1, n), ref, TOL.gemm_err(**parts), interpreter=True)


@check
def w8a8_linear_3d_bf16():
    """W8A8 on a 3-D bf16 input (pointer kernel, small tiles); bf16 output.

    The earlier version compared the interpreter's truncated bf16 output with the *round-to-nearest* bf16
    reference and allowed 2^-7 relative: where the two roundings disagree they differ by exactly one ulp,
    up to 2^-7 / (1 + 2^-7) = 0.992 * 2^-7 of the reference, so the check sat at 99% of its tolerance by
    construction, with no room for anything else. Now the fp32 reference is the comparison point: the int8
    accumulator is exact, the epilogue's fp32 difference is bounded, and the output must be a truncation of
    a value within that bound (in practice: the bit-exact truncation of the reference).
    """
    x = (torch.randn(2, 9, 64, generator=_g(2)) * 3).bfloat16()
    return _linear_check(False, "ptr", None, x, 32, GEMM_CFG, seed=2)


def _mk_linear(fp8: bool, act):
    def fn():
        x = (torch.randn(150, 160, generator=_g(20)) * 2 + 0.3).bfloat16()
        return _linear_check(fp8, "tma", act, x, 272, TMA_PROD_CFG, seed=21)
    fn.__name__ = f"{'fp8' if fp8 else 'w8a8'}_linear_bf16_tma_prod_cfg_{act or 'none'}"
    fn.__doc__ = ("bf16 in / bf16 out through the persistent TMA kernel with the production 128x256x128 tile and "
                  "split epilogue store; M=150, N=272, K=160 are ragged in all three dims (descriptor zero fill).")
    return fn


for _fp8 in (False, True):
    for _act in (None, "gelu_tanh"):
        check(_mk_linear(_fp8, _act))


@check
def fp8_linear_fp32():
    """Full FP8 path (fused fp8 quant + GEMM, TMA kernel) with fp32 input/output and fused GELU."""
    from workbench.kernels.fp8_gemm import fp8_linear_triton
    g = _g(3)
    x = torch.randn(21, 96, generator=g)
    w = torch.randn(48, 96, generator=g)
    wf, ws = R.quantize_per_channel_fp8(w)
    out = fp8_linear_triton(x, wf, ws, None, "gelu_tanh", config=GEMM_CFG, impl="tma")
    xq, xs = R.quantize_per_token_fp8(x)
    ref, parts = _gemm_ref(xq, xs, wf, ws, None, "gelu_tanh", fp8=True)
    return TOL.compare(out, ref, TOL.gemm_err(**parts), interpreter=True)


def _w4a8_check(group: int, act, x: torch.Tensor, n: int, cfg: dict, seed: int) -> Tuple[float, float]:
    """W4A8 kernel vs reference on the same codes.

    Per group the int32 partial sum is exact; kernel and reference both accumulate acc += part * s[n, g]
    over ng groups in fp32 (each <= gamma(ng + 1) of sum_g |part_g s_g|), then * x_scale, + bias, GELU,
    output cast (`_tolerances.gemm_err`, `compare`).
    """
    from workbench.kernels.w4a8_gemm import w4a8_linear_triton
    g = _g(seed)
    k = x.shape[-1]
    w = torch.randn(n, k, generator=g)
    wp, wsg = R.quantize_weight_int4_grouped(w, group)
    b = torch.randn(n, generator=g).to(x.dtype)
    out = w4a8_linear_triton(x, wp, wsg, b, act, config=cfg)
    assert out.dtype == x.dtype and out.shape == (*x.shape[:-1], n)
    xq, xs = R.quantize_per_token_int8(x.float().reshape(-1, k))
    ref = R.w4a8_scaled_mm_ref(xq, xs, wp, wsg, b.float(), act, torch.float32)
    ng = k // group
    parts = torch.stack([xq[:, i * group:(i + 1) * group].double() @
                         R.unpack_int4(wp)[:, i * group:(i + 1) * group].double().t() for i in range(ng)])
    scaled = parts * wsg.double().t()[:, None, :]                                 # [ng, M, N]
    prod_abs = scaled.abs().sum(0) * xs.double()[:, None]
    pre = scaled.sum(0) * xs.double()[:, None] + b.double()[None, :]
    e32 = TOL.gemm_err(prod_abs, b.double().abs()[None, :], acc_err=2 * TOL.gamma(ng + 1) * prod_abs,
                       gelu_in=pre if act else None)
    return TOL.compare(out.reshape(-1, n), ref, e32, interpreter=True)


for _grp, _act in ((32, None), (64, "gelu_tanh")):
    def _mk4(grp=_grp, act=_act):
        def fn():
            x = torch.randn(3, 13, 4 * grp, generator=_g(4 + grp))
            return _w4a8_check(grp, act, x, 48, {"BLOCK_N": 16, "BLOCK_M": 32}, seed=4 + grp)
        fn.__name__ = f"w4a8_g{grp}_{act or 'none'}"
        fn.__doc__ = "W4A8, fp32 in/out, small tiles, 4 groups."
        return fn
    check(_mk4())

for _grp, _act in ((128, None), (256, None), (128, "gelu_tanh")):
    def _mk4p(grp=_grp, act=_act):
        def fn():
            x = (torch.randn(3, 50, 2 * grp, generator=_g(40 + grp)) * 2).bfloat16()
            return _w4a8_check(grp, act, x, 144, {"BLOCK_N": 128, "BLOCK_M": 128, "num_warps": 8}, seed=41 + grp)
        fn.__name__ = f"w4a8_bf16_g{grp}_prod_tile_{act or 'none'}"
        fn.__doc__ = (f"W4A8 at a production group size ({grp}) with the production 128x128 tile, bf16 in / out: "
                      "M=150 and N=144 ragged, two groups per row.")
        return fn
    check(_mk4p())


for _k, _act in ((96, None), (256, "gelu_tanh")):
    def _mk4c(k=_k, act=_act):
        def fn():
            x = torch.randn(2, 21, k, generator=_g(70 + k))
            return _w4a8_check(k, act, x, 48, {"BLOCK_N": 16, "BLOCK_M": 32}, seed=71 + k)
        fn.__name__ = f"w4a8_per_channel_k{k}_{act or 'none'}"
        fn.__doc__ = (f"W4A8 with one scale per output channel, K={k}: the int4 unpack kernel, then the int8 GEMM "
                      "(exact int32 accumulation over K, the scale in its epilogue).")
        return fn
    check(_mk4c())


# ------------------------------------------------------------------------------ fused quantizers

def _quant_check(name: str, fp8: bool) -> Tuple[float, float]:
    """Fused producer+quant kernel vs reference.

    Returns max of three normalised errors (each <= 1 passes):
    * every dequantized value within one code step of the reference (codes can flip by one where the fp32
      value before rounding differs by a few ulps: LayerNorm / RMSNorm statistics are summed in another
      order, GELU is another formula; the 1.01 allows the scale's own rounding);
    * the share of codes that differ <= 2^-8: a flip needs the value within a few fp32 ulps of a rounding
      midpoint, about 2^-13 of int8 steps (2^-17 ulp at |y| ~ 64, 8 ulps of slack) and far less for e4m3,
      so 2^-8 has a 32x margin; a wrong rounding mode (floor, truncation) flips about half of them;
    * the scales within 1e-6 relative (absmax / 127 or / 448 in IEEE division on both sides).
    The plain row quantizer does the reference's exact operations, so its codes must match bit for bit.
    """
    g = _g(5)
    x = torch.randn(2, 11, 200, generator=g).bfloat16() * 3 + 1
    w, b = torch.randn(200, generator=g), torch.randn(200, generator=g)
    ms, msh = torch.randn(2, 200, generator=g) * 0.3, torch.randn(2, 200, generator=g)
    q, s, qr, sr = kernel_and_reference(name, x, w, b, ms, msh, fp8)
    assert q.dtype == qr.dtype and q.shape == qr.shape and s.shape == sr.shape
    if name == "rows":
        exact = torch.equal(q.view(torch.int8), qr.view(torch.int8)) and torch.equal(s, sr)
        return (0.0 if exact else float("inf")), 1.0
    return _code_errors(q, s, qr, sr, fp8), 1.0


def _code_errors(q: torch.Tensor, s: torch.Tensor, qr: torch.Tensor, sr: torch.Tensor, fp8: bool) -> float:
    """The largest of `_quant_check`'s three normalised errors (codes within a step, share of flipped codes,
    scales)."""
    step = s[..., None] * (32.0 if fp8 else 1.0)   # the largest e4m3 step at |code| <= 448 is 32
    code_err = float(((q.float() * s[..., None] - qr.float() * sr[..., None]).abs() / (step * 1.01)).max())
    flip_share = float((q.float() != qr.float()).float().mean()) / 2 ** -8
    scale_err = float(((s.double() - sr.double()).abs() / sr.double()).max()) / 1e-6
    return max(code_err, flip_share, scale_err)


for _name in ("rows", "layernorm", "rmsnorm", "gelu"):
    for _fp8 in (False, True):
        def _mkq(name=_name, fp8=_fp8):
            def fn():
                return _quant_check(name, fp8)
            fn.__name__ = f"quant_{name}_{'fp8' if fp8 else 'int8'}"
            return fn
        check(_mkq())


def _residual_norm_check(fp8: bool, two_segments: bool) -> Tuple[float, float]:
    """`residual_norm_quant` (residual + gated branch -> new residual, LayerNorm, AdaLN, quantization) vs its reference:
    CogVideoX's form (text and video segments with their own gates / modulation, affine norm, per-batch vectors
    [B, 1, K]) or Wan's (one segment, no gate, per-token modulation [B, N, K]). The new residual must match bit for
    bit (same fp32 sum, round to nearest even bf16 on both sides); codes and scales as in `_quant_check`."""
    from workbench.kernels import act_quant as Q
    g = _g(9)
    k, bsz = 200, 2
    ns = (3, 11) if two_segments else (13,)
    xs = [torch.randn(bsz, n, k, generator=g).bfloat16() * 2 + 1 for n in ns]
    y = torch.randn(bsz, sum(ns), k, generator=g).bfloat16()
    if two_segments:
        gates = [torch.randn(bsz, 1, k, generator=g).bfloat16() for _ in ns]
        scales = [(torch.randn(bsz, 1, k, generator=g) * 0.3).bfloat16() for _ in ns]
        shifts = [torch.randn(bsz, 1, k, generator=g).bfloat16() for _ in ns]
        w, b = torch.randn(k, generator=g).bfloat16(), torch.randn(k, generator=g).bfloat16()
    else:
        gates, w, b = [], None, None
        scales = [torch.randn(bsz, ns[0], k, generator=g) * 0.3]
        shifts = [torch.randn(bsz, ns[0], k, generator=g)]
    q, s, res = Q.residual_norm_quant(xs, y, gates, w, b, 1e-5, scales, shifts, fp8=fp8)
    qr, sr, resr = R.residual_norm_quant_ref(xs, y, gates, w, b, 1e-5, scales, shifts, fp8=fp8)
    assert q.dtype == qr.dtype and q.shape == qr.shape == (bsz, sum(ns), k) and s.shape == sr.shape
    if len(res) != len(ns) or not all(torch.equal(a, c) for a, c in zip(res, resr)):
        return float("inf"), 1.0
    return _code_errors(q, s, qr, sr, fp8), 1.0


for _fp8 in (False, True):
    for _two in (False, True):
        def _mkr(fp8=_fp8, two=_two):
            def fn():
                return _residual_norm_check(fp8, two)
            fn.__name__ = f"residual_norm_{'cogvideox' if two else 'wan'}_{'fp8' if fp8 else 'int8'}"
            return fn
        check(_mkr())


# ------------------------------------------------------------------------------------- attention

def _attn_check(impl: str, pv: str, d: int, layout: str, dtype=torch.float32, block_m: int = 16,
                block_n: int = 16, nq: int = 37, nk: int = 45, h: int = 2, b: int = 2) -> Tuple[float, float]:
    """Quant attention kernel vs quant_attention_ref on the same codes (`_tolerances.dyadic_qkv`), ragged NQ / NK.

    Bound (`_tolerances.attention_err`): 2 (block_n + 2 nb + 5) u (1 + 2^-4) A + 3 u |O| for the fp32
    softmax and P.V sums, A = max_j |v_j - mean v| per channel, then the output cast (bf16: truncation).
    Not covered: an e4m3 code of P flipping because numpy's and torch's exp2 differ by an ulp exactly at an
    e4m3 rounding midpoint (chance about 2^-20 per score, about 1e-2 per check here; the seeds are fixed).
    The output must also stay within 3% of float SDPA (the quantization itself).
    """
    from workbench.kernels.attention import quant_attention_triton
    q, k, v = TOL.dyadic_qkv(b, h, nq, nk, d, seed=6 + d, dtype=dtype, layout=layout)
    out = quant_attention_triton(q, k, v, block_m=block_m, block_n=block_n, pv_dtype=pv, impl=impl)
    assert out.dtype == dtype and out.shape == q.shape
    ref = R.quant_attention_ref(q.float(), k.float(), v.float(), block_m=block_m, block_n=block_n, pv_dtype=pv)
    assert R.rel_error(out, R.sdpa_ref(q, k, v)) < 0.03
    return TOL.compare(out, ref, TOL.attention_err(ref, v, block_n, pv_fp8=pv == "fp8"), interpreter=True)


for _impl, _pv, _d, _layout in (("ptr", "fp8", 32, "bhnd"), ("tma", "fp8", 16, "bnhd"),
                                ("ptr", "fp16", 16, "bnhd"), ("tma", "fp16", 32, "bhnd")):
    def _mka(impl=_impl, pv=_pv, d=_d, layout=_layout):
        def fn():
            return _attn_check(impl, pv, d, layout)
        fn.__name__ = f"attn_{impl}_{pv}_d{d}_{layout}"
        fn.__doc__ = "fp32 in / out, 16 x 16 blocks, several heads and batches."
        return fn
    check(_mka())

for _impl in ("ptr", "tma"):
    for _d in (64, 128):
        def _mkap(impl=_impl, d=_d):
            def fn():
                bm, bn = R.default_blocks(d)   # the production query / key blocks
                return _attn_check(impl, "fp8", d, "bnhd", torch.bfloat16, block_m=bm, block_n=bn,
                                   nq=150, nk=150, h=2, b=1)
            fn.__name__ = f"attn_bf16_{impl}_d{d}_prod_blocks"
            fn.__doc__ = (f"Production case: head_dim {d}, bf16 in / out, fp8 P.V, the default query and key "
                          "blocks; 150 queries and keys (two or three query blocks, a ragged last key block).")
            return fn
        check(_mkap())



@check
def attn_fa3_refused_off_hopper():
    """impl='fa3' (the Gluon sm_90 kernel) off a Hopper GPU is a ValueError that names impl='auto'; 'auto' there
    keeps the Triton kernel (the D=128 default blocks, 64 x 128)."""
    from workbench.kernels.attention import quant_attention_triton
    q, k, v = (torch.randn(1, 2, 150, 128, generator=_g(s)) for s in (1, 2, 3))
    try:
        quant_attention_triton(q, k, v, impl="fa3")
    except ValueError as exc:
        assert "impl='auto'" in str(exc)
    else:
        raise AssertionError("impl='fa3' ran without a Hopper GPU")
    out = quant_attention_triton(q, k, v)
    ref = R.quant_attention_ref(q, k, v, block_m=64, block_n=128)
    return float((out - ref).abs().max()), 1e-4

@check
def attn_kv_quant_permuted_v_and_rounding_bias():
    """The K/V pass with PERMUTE_V (the Gluon kernel's V^T) writes exactly the unpermuted V^T's codes, each token
    at `attention_sm90.v_column` of its index, and both passes' per-block rounding-error sums add up to
    `reference.v_rounding_bias` (x nk)."""
    from workbench.kernels.attention import _kv_quant_kernel
    from workbench.kernels.attention_sm90 import v_column
    bh, nk, d, bn = 2, 150, 64, 64
    nkb = -(-nk // bn)
    k = torch.randn(1, bh, nk, d, generator=_g(4))
    v = torch.randn(1, bh, nk, d, generator=_g(5)) + 0.3
    km, vm = k.mean(2)[0].contiguous(), v.mean(2)[0].contiguous()
    vamax = (v[0] - vm[:, None]).abs().amax(1).clamp_min(R.EPS)
    vinv, vs = R._div(R.FP8_MAX, vamax).contiguous(), R._sdiv(vamax, R.FP8_MAX).contiguous()
    outs = []
    for perm, split in ((False, False), (True, False), (True, True)):
        k8 = torch.zeros(bh * nkb * bn, d, dtype=torch.int8)
        ks = torch.zeros(bh, nkb)
        vt = torch.zeros(bh * d, nkb * bn, dtype=torch.float8_e4m3fn)
        vb = torch.zeros(bh, nkb, d)
        _kv_quant_kernel[(nkb, bh, 2 if split else 1)](k, v, km, vm, vinv, vs, k8, ks, vt, vb, bh, nk, nkb * bn, nkb,
                                                       *k.stride(), *v.stride(), HEAD_DIM=d, BLOCK_N=bn, SMOOTH_K=True,
                                                       SMOOTH_V=True, PV_FP8=True, EMULATE_FP8=True, PERMUTE_V=perm,
                                                       SPLIT_KV=split, num_warps=4)
        outs.append((vt.float(), vb, k8, ks))
    (vt0, vb0, _, _), (vt1, vb1, k81, ks1), (vt2, vb2, k82, ks2) = outs
    # K and V in separate programs (SPLIT_KV): the same codes, scales and bias sums bit for bit
    assert torch.equal(vt2, vt1) and torch.equal(vb2, vb1) and torch.equal(k82, k81) and torch.equal(ks2, ks1)
    cols = v_column(torch.arange(nkb * bn))
    assert sorted(cols.tolist()) == list(range(nkb * bn)), "v_column is not a permutation"
    assert torch.equal(vt1[:, cols], vt0), "PERMUTE_V moved codes elsewhere than v_column"
    vc = v[0] - vm[:, None]
    v8 = vt0.view(bh, d, -1)[:, :, :nk].transpose(1, 2)
    want = R.v_rounding_bias(vc[None], v8[None], vs[None, :, None, :])[0, :, 0] * nk    # [BH, D]
    assert torch.equal(vb0, vb1)
    return float((vb0.sum(1) - want).abs().max()), 1e-4


@check
def attn_kv_stats_two_tiles_a_step():
    """The statistics pass loading two token tiles a step (UNROLL=2, ragged split ends included) gives the one-tile
    pass's sums, minima and maxima bit for bit, and they match torch's reductions."""
    from workbench.kernels.attention import _kv_stats_kernel
    bh, nk, d, bt, tps = 2, 150, 32, 16, 48       # 4 splits: 48, 48, 48, 6 tokens (3 tiles a split: odd)
    splits = -(-nk // tps)
    k = torch.randn(1, bh, nk, d, generator=_g(6)) + 2.0
    v = torch.randn(1, bh, nk, d, generator=_g(7))
    got = []
    for unroll in (1, 2):
        part = torch.zeros(4, bh, splits, d)
        _kv_stats_kernel[(bh, splits)](k, v, part[0], part[1], part[2], part[3], bh, nk, tps, splits, *k.stride(),
                                       *v.stride(), HEAD_DIM=d, BLOCK_T=bt, UNROLL=unroll, num_warps=4)
        got.append(part)
    assert torch.equal(got[0], got[1]), "UNROLL=2 changed the statistics"
    want = torch.stack([k[0].sum(1), v[0].sum(1), v[0].amin(1), v[0].amax(1)])
    have = torch.stack([got[1][0].sum(1), got[1][1].sum(1), got[1][2].amin(1), got[1][3].amax(1)])
    return float((have - want).abs().max()), 1e-3


@check
def attn_stats_and_bias_finalize_many_steps():
    """The two finalize kernels over more rows than one step (70 token splits, 45 key blocks: three / two steps of
    32, the last ragged): K / V means, V's e4m3 scale and inverse, and V's mean plus rounding bias, against the
    same reductions in torch (fp32 sums in another order: a few ulps)."""
    from workbench.kernels.attention import _kv_stats_finalize_kernel, _v_bias_finalize_kernel
    bh, splits, nkb, d, nk = 3, 70, 45, 64, 2240
    part = torch.randn(4, bh, splits, d, generator=_g(8))
    part[2] -= 3.0  # min(V) below max(V)
    part[3] += 3.0
    km, vm, vinv, vs = torch.empty(4, bh, d).unbind(0)
    _kv_stats_finalize_kernel[(bh,)](part, km, vm, vinv, vs, bh, splits, float(nk), HEAD_DIM=d, SMOOTH_V=True,
                                     EPS=R.EPS, QMAX=R.FP8_MAX, BLOCK_R=32, num_warps=4)
    want_vm = part[1].sum(1) / nk
    want_amax = torch.maximum(part[3].amax(1) - want_vm, want_vm - part[2].amin(1)).clamp_min(R.EPS)
    vb = torch.randn(bh, nkb, d, generator=_g(9))
    out = torch.empty(bh, d)
    _v_bias_finalize_kernel[(bh,)](vm, vb, out, nkb, float(nk), HEAD_DIM=d, BLOCK_R=32, num_warps=4)
    errs = [(km - part[0].sum(1) / nk).abs().max() / (part[0].sum(1) / nk).abs().max(),
            (vm - want_vm).abs().max() / want_vm.abs().max(),
            ((vs - want_amax / R.FP8_MAX) / vs).abs().max(), ((vinv - R.FP8_MAX / want_amax) / vinv).abs().max(),
            (out - (vm + vb.sum(1) / nk)).abs().max() / out.abs().max()]
    return float(max(errs)), 1e-5


def main(names) -> None:
    """Run the selected checks and print the JSON summary."""
    assert os.environ.get("TRITON_INTERPRET") == "1", "run with TRITON_INTERPRET=1"
    results = {}
    for name in names or list(CHECKS):
        try:
            err, tol = CHECKS[name]()
            results[name] = {"err": float(err), "tol": float(tol), "error": None}
        except Exception:  # report, keep going
            results[name] = {"err": float("nan"), "tol": 0.0, "error": traceback.format_exc()[-3000:]}
    print(json.dumps(results))


if __name__ == "__main__":
    main(sys.argv[1:])
