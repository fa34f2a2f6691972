"""Fused activation quantization kernels: one pass over bf16 rows -> int8/fp8 codes + per-row fp32 scale.

Variants fuse the producer: plain (``quantize_rows``), LayerNorm (+affine, +AdaLN modulation),
RMSNorm, GELU-tanh, and a DiT block's residual add + LayerNorm + modulation (``residual_norm_quant``, which also
writes the new residual stream). Semantics are defined by the ``*_ref`` functions in ``reference.py``.
"""

from __future__ import annotations

from typing import List, Optional, Tuple

import torch
import triton
import triton.language as tl

from ._triton_utils import gelu_tanh_f32, interpreting, rint_f32, to_fp8_e4m3, use_fast_math

MODE_PLAIN, MODE_LAYERNORM, MODE_RMSNORM, MODE_GELU = 0, 1, 2, 3


@triton.jit
def _layernorm_row(x, mask, K, eps):
    """(x - mean) / sqrt(var + eps) of one row held in registers (masked lanes read as 0 and stay 0)."""
    mean = tl.sum(x, axis=0) / K
    xc = tl.where(mask, x - mean, 0.0)
    var = tl.sum(xc * xc, axis=0) / K
    return xc * tl.math.rsqrt(var + eps)


@triton.jit
def _row_codes(y, mask, OUT_FP8: tl.constexpr, EMULATE_FP8: tl.constexpr):
    """Symmetric per-row codes (e4m3 or int8) and the fp32 scale absmax / QMAX of one row in registers."""
    y = tl.where(mask, y, 0.0)
    amax = tl.maximum(tl.max(tl.abs(y), axis=0), 1e-8)
    if OUT_FP8:
        q = to_fp8_e4m3(y * tl.math.div_rn(448.0, amax), EMULATE_FP8)
        scale = tl.math.div_rn(amax, 448.0)
    else:
        q = tl.minimum(tl.maximum(rint_f32(y * tl.math.div_rn(127.0, amax)), -127.0), 127.0).to(tl.int8)
        scale = tl.math.div_rn(amax, 127.0)
    return q, scale


@triton.jit
def _row_quant_kernel(x_ptr, q_ptr, s_ptr, w_ptr, b_ptr, ms_ptr, msh_ptr,
                      K, stride_xm, stride_qm, rows_per_batch, stride_mod, eps,
                      MODE: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr,
                      HAS_MOD_SCALE: tl.constexpr, HAS_MOD_SHIFT: tl.constexpr,
                      OUT_FP8: tl.constexpr, EMULATE_FP8: tl.constexpr, FAST: tl.constexpr,
                      BLOCK_K: tl.constexpr):
    """One program per row: optional norm/GELU/modulation in fp32, absmax, quantize, store."""
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK_K)
    mask = offs < K
    x = tl.load(x_ptr + row * stride_xm + offs, mask=mask, other=0.0).to(tl.float32)
    if MODE == 1:
        y = _layernorm_row(x, mask, K, eps)
    elif MODE == 2:
        ms = tl.sum(x * x, axis=0) / K
        y = x * tl.math.rsqrt(ms + eps)
    elif MODE == 3:
        y = gelu_tanh_f32(x, FAST)
    else:
        y = x
    if HAS_W:
        y = y * tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_B:
        y = y + tl.load(b_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_MOD_SCALE:
        bidx = row // rows_per_batch
        y = y * (1.0 + tl.load(ms_ptr + bidx * stride_mod + offs, mask=mask, other=0.0).to(tl.float32))
    if HAS_MOD_SHIFT:
        bidx = row // rows_per_batch
        y = y + tl.load(msh_ptr + bidx * stride_mod + offs, mask=mask, other=0.0).to(tl.float32)
    q, scale = _row_codes(y, mask, OUT_FP8, EMULATE_FP8)
    tl.store(q_ptr + row * stride_qm + offs, q, mask=mask)
    tl.store(s_ptr + row, scale)


def _row_launch(k: int, what: str) -> Tuple[int, int]:
    """(BLOCK_K, num_warps) of a one-program-per-row kernel over rows of k elements, held whole in registers."""
    block_k = triton.next_power_of_2(k)
    if block_k > 32768:
        raise ValueError(f"{what} supports K <= 32768, got {k}")
    return block_k, min(max(block_k // 512, 1), 16)


def _launch(x: torch.Tensor, mode: int, fp8: bool, weight: Optional[torch.Tensor] = None,
            bias: Optional[torch.Tensor] = None, eps: float = 0.0, mod_scale: Optional[torch.Tensor] = None,
            mod_shift: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Flatten x to rows, launch the row-quant kernel and restore the leading shape."""
    lead = tuple(x.shape[:-1])
    k = x.shape[-1]
    x2 = x.reshape(-1, k)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    m = x2.shape[0]
    q = torch.empty((m, k), device=x.device, dtype=torch.float8_e4m3fn if fp8 else torch.int8)
    s = torch.empty((m,), device=x.device, dtype=torch.float32)
    if m == 0:
        return q.reshape(*lead, k), s.reshape(lead)
    block_k, num_warps = _row_launch(k, "row quantization")
    mods = [t for t in (mod_scale, mod_shift) if t is not None]
    rows_per_batch, stride_mod = 1, 0
    if mods:
        nb = mods[0].shape[0]
        if m % nb:
            raise ValueError(f"{m} rows are not divisible by the modulation batch {nb}")
        rows_per_batch = m // nb
        mods = [t.reshape(nb, k).contiguous() for t in mods]
        stride_mod = mods[0].stride(0)
        if mod_scale is not None:
            mod_scale = mods.pop(0)
        if mod_shift is not None:
            mod_shift = mods.pop(0)
    dummy = s
    _row_quant_kernel[(m,)](
        x2, q, s,
        weight.contiguous() if weight is not None else dummy,
        bias.contiguous() if bias is not None else dummy,
        mod_scale if mod_scale is not None else dummy,
        mod_shift if mod_shift is not None else dummy,
        k, x2.stride(0), q.stride(0), rows_per_batch, stride_mod, float(eps),
        MODE=mode, HAS_W=weight is not None, HAS_B=bias is not None,
        HAS_MOD_SCALE=mod_scale is not None, HAS_MOD_SHIFT=mod_shift is not None,
        OUT_FP8=fp8, EMULATE_FP8=interpreting(), FAST=use_fast_math(),
        BLOCK_K=block_k, num_warps=num_warps)
    return q.reshape(*lead, k), s.reshape(lead)


def quantize_rows(x: torch.Tensor, fp8: bool = False) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per-token int8 (or e4m3) quantization of x[..., K] in one pass; see quantize_per_token_int8."""
    return _launch(x, MODE_PLAIN, fp8)


def layernorm_quant(x: torch.Tensor, weight: Optional[torch.Tensor] = None, bias: Optional[torch.Tensor] = None,
                    eps: float = 1e-5, mod_scale: Optional[torch.Tensor] = None,
                    mod_shift: Optional[torch.Tensor] = None, fp8: bool = False) -> Tuple[torch.Tensor, torch.Tensor]:
    """LayerNorm(+affine)(+AdaLN y*(1+scale[b])+shift[b]) fused with per-token quantization."""
    return _launch(x, MODE_LAYERNORM, fp8, weight, bias, eps, mod_scale, mod_shift)


def rmsnorm_quant(x: torch.Tensor, weight: Optional[torch.Tensor] = None, eps: float = 1e-6,
                  fp8: bool = False) -> Tuple[torch.Tensor, torch.Tensor]:
    """RMSNorm(+weight) fused with per-token quantization."""
    return _launch(x, MODE_RMSNORM, fp8, weight, None, eps)


def gelu_quant(x: torch.Tensor, fp8: bool = False) -> Tuple[torch.Tensor, torch.Tensor]:
    """GELU-tanh fused with per-token quantization (when GELU is not already in the GEMM epilogue)."""
    return _launch(x, MODE_GELU, fp8)


@triton.jit
def _round_to_dtype(x, DTYPE: tl.constexpr):
    """fp32 x rounded (nearest even) to DTYPE and back; bf16 by integer bit arithmetic, which the interpreter
    (whose fp32 -> bf16 cast truncates) and the GPU agree on."""
    if DTYPE == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + (0x7FFF + ((bits >> 16) & 1))) & 0xFFFF0000
        return bits.to(tl.float32, bitcast=True)
    elif DTYPE == tl.float32:
        return x
    else:
        return x.to(DTYPE).to(tl.float32)


@triton.jit
def _residual_norm_quant_kernel(x_ptr, y_ptr, g_ptr, w_ptr, b_ptr, sc_ptr, sh_ptr, r_ptr, q_ptr, s_ptr,
                                N, K, eps, sxb, sxn, syb, syn, sgb, sgn, scb, scn, shb, shn, srb, srn, sqb, sqn, ssb,
                                HAS_Y: tl.constexpr, HAS_GATE: tl.constexpr, NORM: tl.constexpr,
                                HAS_W: tl.constexpr, HAS_B: tl.constexpr, HAS_SCALE: tl.constexpr,
                                HAS_SHIFT: tl.constexpr, OUT_FP8: tl.constexpr, EMULATE_FP8: tl.constexpr,
                                BLOCK_K: tl.constexpr):
    """One program per token of one segment [B, N, K]: residual (+ gated branch) -> new residual, LayerNorm,
    modulation, rounding to the model dtype, absmax, codes + scale; everything stays in registers."""
    row = tl.program_id(0).to(tl.int64)
    b = row // N
    i = row % N
    offs = tl.arange(0, BLOCK_K)
    mask = offs < K
    dtype: tl.constexpr = x_ptr.dtype.element_ty
    h = tl.load(x_ptr + b * sxb + i * sxn + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_Y:
        y = tl.load(y_ptr + b * syb + i * syn + offs, mask=mask, other=0.0).to(tl.float32)
        if HAS_GATE:
            y = y * tl.load(g_ptr + b * sgb + i * sgn + offs, mask=mask, other=0.0).to(tl.float32)
        h = _round_to_dtype(h + y, dtype)
        tl.store(r_ptr + b * srb + i * srn + offs, h.to(dtype), mask=mask)
    if NORM:
        h = _layernorm_row(h, mask, K, eps)
    if HAS_W:
        h = h * tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_B:
        h = h + tl.load(b_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_SCALE:
        h = h * (1.0 + tl.load(sc_ptr + b * scb + i * scn + offs, mask=mask, other=0.0).to(tl.float32))
    if HAS_SHIFT:
        h = h + tl.load(sh_ptr + b * shb + i * shn + offs, mask=mask, other=0.0).to(tl.float32)
    q, scale = _row_codes(_round_to_dtype(h, dtype), mask, OUT_FP8, EMULATE_FP8)
    tl.store(q_ptr + b * sqb + i * sqn + offs, q, mask=mask)
    tl.store(s_ptr + b * ssb + i, scale)


def _segment_view(t: Optional[torch.Tensor], shape: Tuple[int, int, int], what: str) -> Optional[torch.Tensor]:
    """t broadcast to [B, N, K] with a unit inner stride (broadcast dims get stride 0: nothing is copied)."""
    if t is None:
        return None
    try:
        v = t.expand(shape)
    except RuntimeError as exc:
        raise ValueError(f"residual_norm_quant: {what} of shape {tuple(t.shape)} does not broadcast to "
                         f"{tuple(shape)}") from exc
    return v if v.stride(-1) == 1 else t.contiguous().expand(shape)


def residual_norm_quant(xs: List[torch.Tensor], y: Optional[torch.Tensor], gates: List[torch.Tensor],
                        weight: Optional[torch.Tensor], bias: Optional[torch.Tensor], eps: float,
                        scales: List[torch.Tensor], shifts: List[torch.Tensor], norm: bool = True,
                        fp8: bool = True) -> Tuple[torch.Tensor, torch.Tensor, List[torch.Tensor]]:
    """Residual add (+gate) + LayerNorm (+affine) + AdaLN modulation + per-token quantization of token segments
    the next linear sees concatenated; one launch per segment. Semantics: `reference.residual_norm_quant_ref`."""
    bsz, k = xs[0].shape[0], xs[0].shape[-1]
    ntot = sum(x.shape[1] for x in xs)
    dev = xs[0].device
    q = torch.empty((bsz, ntot, k), device=dev, dtype=torch.float8_e4m3fn if fp8 else torch.int8)
    s = torch.empty((bsz, ntot), device=dev, dtype=torch.float32)
    block_k, num_warps = _row_launch(k, "residual_norm_quant")
    residuals, off = [], 0
    for i, x in enumerate(xs):
        n = x.shape[1]
        shape = (bsz, n, k)
        xv = _segment_view(x, shape, "x")
        yv = _segment_view(None if y is None else y[:, off:off + n], shape, "y")
        gv = _segment_view(gates[i] if gates else None, shape, "gate")
        cv = _segment_view(scales[i] if scales else None, shape, "scale")
        hv = _segment_view(shifts[i] if shifts else None, shape, "shift")
        r = torch.empty(shape, device=dev, dtype=x.dtype) if y is not None else None
        if r is not None:
            residuals.append(r)
        qv, sv = q[:, off:off + n], s[:, off:off + n]
        off += n
        if bsz * n == 0:
            continue
        dummy = s
        strides = [t.stride()[:2] if t is not None else (0, 0) for t in (xv, yv, gv, cv, hv, r, qv)]
        _residual_norm_quant_kernel[(bsz * n,)](
            xv, yv if yv is not None else dummy, gv if gv is not None else dummy,
            weight.contiguous() if weight is not None else dummy, bias.contiguous() if bias is not None else dummy,
            cv if cv is not None else dummy, hv if hv is not None else dummy, r if r is not None else dummy, qv, sv,
            n, k, float(eps), *[v for st in strides for v in st], sv.stride(0),
            HAS_Y=y is not None, HAS_GATE=gv is not None, NORM=norm, HAS_W=weight is not None,
            HAS_B=bias is not None, HAS_SCALE=cv is not None, HAS_SHIFT=hv is not None, OUT_FP8=fp8,
            EMULATE_FP8=interpreting(), BLOCK_K=block_k, num_warps=num_warps)
    return q, s, residuals
