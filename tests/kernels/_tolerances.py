"""Error bounds of the Triton kernels against their pure-torch references, derived from the formats' rounding.

Used by the interpreter checks (`_interp_checks.py`, CPU, TRITON_INTERPRET=1) and the GPU tests
(`test_gpu.py`). Notation: u = 2^-24, the unit roundoff of fp32; gamma(n) = n u / (1 - n u), the classic
bound on the relative error of an n-term fp32 sum in any order (Higham, "Accuracy and Stability of
Numerical Algorithms", 3.1). The references are always evaluated on the *same codes* the kernel uses and
with fp32 output, so a check compares the kernel with the exact reference value r and needs two parts:

1. e32, an elementwise float64 bound on |t - r| where t is the kernel's fp32 value before its output cast:
   * GEMM epilogue (`gemm_err`): both sides evaluate acc * a_scale * b_scale (+ bias) in fp32, each with
     at most 3 roundings (2 products, 1 sum; a fused multiply-add on the GPU rounds fewer times), so with
     identical accumulators they differ by at most 2 gamma(3) (|acc a b| + |bias|). Integer accumulation
     (int8 GEMM, W4A8 group partials) is exact; fp32 sums of exact fp8 products add gamma(K) sum |x_k w_k|
     (`fp32_dot_err`); W4A8's fp32 sum over groups adds gamma(groups + 1) per side.
   * GELU-tanh: the kernel evaluates x * sigmoid(2 u(x)) with exp2 (interpreter) or 0.5 x (1 +
     tanh.approx(u(x))) (GPU), the reference 0.5 x (1 + tanh(u(x))) in fp32. Each fp32 formula is within
     2.02 u |x| of the exact GELU on a 2e6-point grid over [-12, 12] (about 10 roundings, each scaled by at
     most |x|), so the two differ by <= 4.04 u |x|; the bound uses 8 u |x| (2x margin). An input
     difference e propagates by at most max |GELU'| = 1.13. On the GPU tanh.approx.f32 has a maximum
     relative error of 2^-10.987 (PTX ISA), which adds 0.5 |x| 2^-10.987.
   * attention: `attention_err`.
2. the output cast. fp32 outputs: t itself, so the check is max |out - r| / e32 <= 1 (`ratio`). bf16 /
   fp16 outputs: the cast is monotone, so out must lie in [cast(r - e32), cast(r + e32)]
   (`rounding_violation`, 0 passes). That is exact, not a relative tolerance: a bf16 output one ulp off is
   caught. The casts: bf16 round-to-nearest-even on the GPU (|err| <= 2^-8 |t|); the Triton 3.6 interpreter
   *truncates* fp32 -> bf16 (round toward zero, |err| < 2^-7 |t|: its outputs equal the fp32 value with the
   low 16 bits cleared); fp16 rounds to nearest on both.

Why the bracket and not a relative tolerance: truncation's error reaches 2^-7 / (1 + 2^-7) = 0.992 * 2^-7
of the value wherever the dropped bits are all ones, so `|out - r| <= 2^-7 |r|` is always used to 99%
(what the old w8a8_linear_3d_bf16 check showed) and leaves no room for the fp32 part; the bracket states
the rounding model itself.
"""

from __future__ import annotations

from typing import Optional

import torch

U = 2.0 ** -24
TANH_APPROX = 2.0 ** -10.987
GELU_EVAL = 8 * U          # |gelu_kernel(x) - gelu_ref(x)| <= 8 u |x| for the same fp32 x (module docstring)
GELU_LIPSCHITZ = 1.13      # max |d/dx GELU-tanh(x)| = 1.129 at x = 2.42
TINY = 1e-30               # a zero bound demands an exact match (0 / TINY = 0, anything else is huge)


def gamma(n: int) -> float:
    """Relative error bound of an n-term fp32 sum (any order): n u / (1 - n u)."""
    return n * U / (1 - n * U)


def gemm_err(prod_abs: torch.Tensor, bias_abs: torch.Tensor | float, acc_err: torch.Tensor | float = 0.0,
             gelu_in: Optional[torch.Tensor] = None, fast_tanh: bool = False) -> torch.Tensor:
    """e32 of a scaled GEMM (module docstring, part 1).

    prod_abs: |acc * a_scale * b_scale| (float64); bias_abs: |bias| broadcast to the output;
    acc_err: bound on the dequantized accumulator difference (0 for exact integer GEMMs);
    gelu_in: the reference pre-activation (float64) when GELU is fused; fast_tanh: the GPU's tanh.approx.
    """
    e = torch.as_tensor(acc_err, dtype=torch.float64) * (1 + 3 * U) + 2 * gamma(3) * (prod_abs + bias_abs)
    if gelu_in is not None:
        x = gelu_in.double().abs()
        e = GELU_LIPSCHITZ * e + GELU_EVAL * x + (0.5 * TANH_APPROX * x if fast_tanh else 0.0)
    return e


def fp32_dot_err(abs_dot: torch.Tensor, k: int) -> torch.Tensor:
    """Bound on |fp32 dot - exact| of k-term dot products whose products are exact in fp32 (e4m3 x e4m3 has
    at most 8 significant bits): gamma(k) sum |a_i b_i|, plus one rounding of the float64 reference to fp32."""
    return (gamma(k) + U) * abs_dot


def wgmma_fp8_acc_err(abs_dot: torch.Tensor, k: int, promote_every: int | None) -> torch.Tensor:
    """Bound on |accumulator - exact| of Hopper fp8 GEMMs (wgmma), as a multiple of sum_k |a_k b_k|.

    The fp8 wgmma accumulator keeps about 14 bits (DeepSeek-V3 technical report, 3.3.2); modelled with one
    bit of margin as: every wgmma instruction (32 products along K) adds with a relative error <= 2^-13 of
    the magnitudes summed so far. Without promotion (`promote_every=None`, the default fast accumulation)
    that is <= (K / 32) 2^-13 sum |a b|; with promotion to an fp32 register every `promote_every` products
    (`precise_fp8`: BLOCK_K) <= (promote_every / 32) 2^-13 sum |a b| plus gamma(K / promote_every) for the
    fp32 sum of the chunks. The same model is applied to sm_89's fp8 mma.
    """
    chunk = k if promote_every is None else min(promote_every, k)
    rel = (-(-chunk // 32)) * 2.0 ** -13 + (0.0 if promote_every is None else gamma(-(-k // chunk)))
    return (rel + U) * abs_dot


def attention_err(ref32: torch.Tensor, v: torch.Tensor, block_n: int, pv_fp8: bool = True,
                  smooth_v: bool = True, acc_rel: float = 0.0) -> torch.Tensor:
    """e32 of quantized attention vs quant_attention_ref when both use the same int8 / fp8 codes.

    O = acc / l * v_scale + v_mean with acc = sum_j P_j V8_j (online over nb key blocks of block_n) and
    l = sum_j p_j. With identical codes S = Q8 K8^T is identical (exact int32 / float64); the rest is fp32:
    the block dot (gamma(block_n)), acc * alpha + dot per block (2 roundings, 2 nb in all), exp2 (libm or
    ex2.approx: <= 2 ulps apart), the division, the scale and the mean (3). So each side's relative error on
    the sums is at most (block_n + 2 nb + 5) u, and the sums are bounded by sum_j P_j |V8_j| <= l (1 + 2^-4)
    max_j |V8_j| (an e4m3 P is within 2^-4 of p; fp16: 2^-11), with v_scale max_j |V8_j| = max_j |v_j -
    v_mean| =: A per (b, h, channel) (exactly the fp8 scale's absmax). Both sides contribute (factor 2):
    |dO| <= (2 (block_n + 2 nb + 5) u + acc_rel) (1 + 2^-4) A + 3 u |O|.
    acc_rel: an extra relative error of the P.V sums (the GPU's limited-precision fp8 wgmma accumulator).
    """
    vf = v.double()
    nk = vf.shape[2]
    nb = -(-nk // block_n)
    vm = vf.mean(2, keepdim=True) if smooth_v else torch.zeros_like(vf[:, :, :1])
    a = (vf - vm).abs().amax(2, keepdim=True)                                    # [B, H, 1, D]
    p_rel = 2.0 ** -4 if pv_fp8 else 2.0 ** -11
    return (2 * (block_n + 2 * nb + 5) * U + acc_rel) * (1 + p_rel) * a + 3 * U * ref32.double().abs()


def ratio(out: torch.Tensor, ref: torch.Tensor, bound: torch.Tensor) -> float:
    """max |out - ref| / bound (<= 1 passes); a zero bound entry demands equality there."""
    d = (out.double() - ref.double()).abs()
    return float((d / bound.double().clamp_min(TINY)).max())


def cast(x: torch.Tensor, dtype: torch.dtype, interpreter: bool) -> torch.Tensor:
    """float64 x rounded to fp32 and then cast to dtype as the kernel's store does (float64 result)."""
    x32 = x.double().float()
    if dtype == torch.bfloat16 and interpreter:   # round toward zero: clear the low 16 bits
        return (x32.view(torch.int32) & -65536).view(torch.float32).double()
    return x32.to(dtype).double()


def rounding_violation(out: torch.Tensor, ref32: torch.Tensor, e32: torch.Tensor, interpreter: bool) -> float:
    """How far `out` (bf16 / fp16) leaves [cast(ref32 - e32), cast(ref32 + e32)], in ulps of the output
    format at |ref32| (0: every element is a possible output of a kernel within e32 of the reference)."""
    r, e = ref32.double(), e32.double().expand_as(ref32)
    lo, hi = cast(r - e, out.dtype, interpreter), cast(r + e, out.dtype, interpreter)
    o = out.double()
    below, above = (lo - o).clamp_min(0), (o - hi).clamp_min(0)
    mant = 8 if out.dtype == torch.bfloat16 else 11
    ulp = torch.exp2(torch.floor(torch.log2(r.abs().clamp_min(2.0 ** -126))) - (mant - 1))
    return float((torch.maximum(below, above) / ulp).max())


def compare(out: torch.Tensor, ref32: torch.Tensor, e32: torch.Tensor, interpreter: bool) -> tuple[float, float]:
    """(error, tolerance) of a kernel output against the fp32 reference: `ratio` vs 1 for fp32 outputs,
    `rounding_violation` vs 0 for bf16 / fp16 outputs (module docstring, part 2)."""
    if out.dtype == torch.float32:
        return ratio(out, ref32, e32), 1.0
    return rounding_violation(out, ref32, e32, interpreter), 0.0


def dyadic_qkv(b: int, h: int, nq: int, nk: int, d: int, seed: int, dtype=torch.float32, layout: str = "bhnd",
               device: str = "cpu"):
    """DiT-like q/k/v (unit-ish activations, per-channel offsets, K strongly biased) rounded to multiples of
    1/8 with |x| < 32: exactly representable in bf16, and every sum over <= 2^16 tokens is exact in fp32 in any
    order (|sum| < 2^21 on a 2^-3 grid). So a kernel's split-and-reduce channel means of K and V (sum / N) equal
    torch's CPU mean (also sum / N) bit for bit, and with them the int8 / fp8 codes of Q, K and V: a comparison
    with quant_attention_ref isolates the fp32 softmax / P.V arithmetic. (CUDA's mean multiplies by 1 / N
    instead, which can move the mean by its last bit.)
    layout "bnhd": strided views like q.view(B, N, H, D).transpose(1, 2)."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, h, nq, d, generator=g) * 1.5 + 0.5 * torch.randn(d, generator=g)
    k = torch.randn(b, h, nk, d, generator=g) * 1.5 + 3.0 * torch.randn(d, generator=g)
    v = torch.randn(b, h, nk, d, generator=g) + 2.0 * torch.randn(d, generator=g)
    q, k, v = ((t * 8).round().clamp(-255, 255) / 8 for t in (q, k, v))
    q, k, v = (t.to(device=device, dtype=dtype) for t in (q, k, v))
    if layout == "bnhd":
        q, k, v = (t.transpose(1, 2).contiguous().transpose(1, 2) for t in (q, k, v))
    return q, k, v

