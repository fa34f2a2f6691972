"""SageAttention-style quantized attention (int8 Q.K^T, fp8/fp16 P.V, online softmax) in Triton.

Pipeline (5 launches, two of them tiny), semantics = reference.quant_attention_ref:
1. ``_kv_stats_kernel``: one pass over K and V -> per-(b, h, channel) partial sums of K and V and
   min/max of V (split over tokens so that even B*H=12 fills the GPU); ``_kv_stats_finalize_kernel`` reduces
   the splits to the means and V's scales (``_v_bias_finalize_kernel`` adds V's rounding bias after pass 2).
2. ``_kv_quant_kernel``: K - mean_K (smoothing; softmax is invariant to it), int8 per block of
   BLOCK_N tokens; V - mean_V, per-channel e4m3 (scale absmax/448) written *transposed*
   ([D, N], token-contiguous) because Hopper fp8 wgmma needs K-major B operands.
3. ``_sage_attn_kernel``: per (BLOCK_M queries, b, h): loads Q in its original layout and
   quantizes it to int8 in registers (per-block scale with sm_scale*log2e folded in), then loops
   over key blocks: S = Q8 K8^T (int32, exact), int32->fp32 via an integer add of 0x4B400000
   + fp32 sub (no I2F on the MUFU-class pipe), one FFMA per element gives the base-2 logit minus
   the running max (+8 so that P spans (0, 256] in e4m3), exp2, P -> e4m3, acc += P V (fp32; on
   Hopper the fp8 wgmma accumulator is promoted to fp32 every key block, like SageAttention2's
   two-level accumulation). Epilogue: acc / l * v_scale + mean_V.
"""

from __future__ import annotations

from typing import Any, Dict, Optional

import math
import torch
import triton
import triton.language as tl

from ._triton_utils import (TensorDescriptor, fast_bench, int_to_f32_exact, interpreting, is_hopper_or_newer, num_sms,
                            rint_f32, tma_ok, to_fp8_e4m3)
from .reference import EPS, FP8_MAX, LOG2E, default_blocks


# launch choices of the K/V passes per head dim (the same codes whichever is chosen, up to the order of the
# statistics' fp32 sums when stats_block_t changes the token splits): stats_block_t - token rows of the statistics
# pass's register tile, stats_unroll - tiles loaded together a step (1 or 2), split_kv - the quant pass's K and V
# blocks in separate programs, quant_warps - its warps. D = 64 / 128: chosen by `scripts/kv_pass_sweep.py --choose`
# on an H200 (2026-11-30): K and V in two programs took the quant pass from 98 / 199 / 352 us to 79 / 131 / 237 us
# (CogVideoX-2B / Wan2.1-1.3B / HunyuanVideo-like shapes); two statistics tiles a step were slower at every shape.
KV_PASSES: Dict[int, Dict[str, Any]] = {d: dict(stats_block_t=2048 // d, stats_unroll=1, split_kv=d in (64, 128),
                                             quant_warps=4) for d in (16, 32, 64, 128)}


@triton.jit
def _kv_stats_kernel(k_ptr, v_ptr, ksum_ptr, vsum_ptr, vmin_ptr, vmax_ptr,
                     H, NK, TOK_PER_SPLIT, SPLITS,
                     skb, skh, skn, skd, svb, svh, svn, svd,
                     HEAD_DIM: tl.constexpr, BLOCK_T: tl.constexpr, UNROLL: tl.constexpr = 1):
    """Partial per-channel sum(K), sum(V), min(V), max(V) over one token split of one (b, h).

    The loop accumulates element-wise into [BLOCK_T, HEAD_DIM] registers and reduces over tokens once at the end:
    a reduction per tile (cross-warp, through shared memory) made the pass latency-bound (H200: 108 -> 58 us on
    CogVideoX-2B's K and V, 259 -> 129 us on the HunyuanVideo-like shape). UNROLL (1 or 2) tiles are loaded before
    any is added (more bytes in flight a program), added in token order: the same sums bit for bit."""
    pid_bh = tl.program_id(0)
    pid_s = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    k_base = k_ptr + b * skb + h * skh
    v_base = v_ptr + b * svb + h * svh
    offs_t = tl.arange(0, BLOCK_T)
    offs_d = tl.arange(0, HEAD_DIM)
    ksum = tl.zeros([BLOCK_T, HEAD_DIM], dtype=tl.float32)
    vsum = tl.zeros([BLOCK_T, HEAD_DIM], dtype=tl.float32)
    vmin = tl.full([BLOCK_T, HEAD_DIM], float("inf"), dtype=tl.float32)
    vmax = tl.full([BLOCK_T, HEAD_DIM], float("-inf"), dtype=tl.float32)
    start = pid_s * TOK_PER_SPLIT
    end = tl.minimum(start + TOK_PER_SPLIT, NK)
    for t0 in range(start, end, BLOCK_T * UNROLL):
        tt = (t0 + offs_t).to(tl.int64)
        msk = (tt < end)[:, None]
        kt = tl.load(k_base + tt[:, None] * skn + offs_d[None, :] * skd, mask=msk, other=0.0).to(tl.float32)
        vt = tl.load(v_base + tt[:, None] * svn + offs_d[None, :] * svd, mask=msk, other=0.0).to(tl.float32)
        if UNROLL == 2:
            tt2 = tt + BLOCK_T
            msk2 = (tt2 < end)[:, None]
            kt2 = tl.load(k_base + tt2[:, None] * skn + offs_d[None, :] * skd, mask=msk2, other=0.0).to(tl.float32)
            vt2 = tl.load(v_base + tt2[:, None] * svn + offs_d[None, :] * svd, mask=msk2, other=0.0).to(tl.float32)
        ksum += kt
        vsum += vt
        vmin = tl.minimum(vmin, tl.where(msk, vt, float("inf")))
        vmax = tl.maximum(vmax, tl.where(msk, vt, float("-inf")))
        if UNROLL == 2:
            ksum += kt2
            vsum += vt2
            vmin = tl.minimum(vmin, tl.where(msk2, vt2, float("inf")))
            vmax = tl.maximum(vmax, tl.where(msk2, vt2, float("-inf")))
    o = (pid_bh * SPLITS + pid_s) * HEAD_DIM + offs_d
    tl.store(ksum_ptr + o, tl.sum(ksum, axis=0))
    tl.store(vsum_ptr + o, tl.sum(vsum, axis=0))
    tl.store(vmin_ptr + o, tl.min(vmin, axis=0))
    tl.store(vmax_ptr + o, tl.max(vmax, axis=0))


@triton.jit
def _kv_stats_finalize_kernel(part_ptr, km_ptr, vm_ptr, vinv_ptr, vs_ptr, BH, SPLITS, NK_F,
                              HEAD_DIM: tl.constexpr, SMOOTH_V: tl.constexpr, EPS: tl.constexpr,
                              QMAX: tl.constexpr, BLOCK_R: tl.constexpr):
    """Per (b, h): the token splits' partial statistics -> K mean, V mean (0 without V smoothing) and V's
    per-channel e4m3 scale (absmax of V - mean = max(max - mean, mean - min), exact) and its inverse.
    BLOCK_R splits a step, so the loads are in flight together (a split a step would be latency-bound)."""
    pid_bh = tl.program_id(0)
    offs_d = tl.arange(0, HEAD_DIM)
    offs_r = tl.arange(0, BLOCK_R)
    part = BH * SPLITS * HEAD_DIM                      # elements between sum(K), sum(V), min(V), max(V)
    base = part_ptr + pid_bh * SPLITS * HEAD_DIM
    ksum = tl.zeros([HEAD_DIM], dtype=tl.float32)
    vsum = tl.zeros([HEAD_DIM], dtype=tl.float32)
    vmin = tl.full([HEAD_DIM], float("inf"), dtype=tl.float32)
    vmax = tl.full([HEAD_DIM], float("-inf"), dtype=tl.float32)
    for r0 in range(0, SPLITS, BLOCK_R):
        ok = ((r0 + offs_r) < SPLITS)[:, None]
        p = base + (r0 + offs_r)[:, None] * HEAD_DIM + offs_d[None, :]
        ksum += tl.sum(tl.load(p, mask=ok, other=0.0), axis=0)
        vsum += tl.sum(tl.load(p + part, mask=ok, other=0.0), axis=0)
        vmin = tl.minimum(vmin, tl.min(tl.load(p + 2 * part, mask=ok, other=float("inf")), axis=0))
        vmax = tl.maximum(vmax, tl.max(tl.load(p + 3 * part, mask=ok, other=float("-inf")), axis=0))
    o = pid_bh * HEAD_DIM + offs_d
    tl.store(km_ptr + o, tl.math.div_rn(ksum, NK_F))
    vm = tl.math.div_rn(vsum, NK_F) if SMOOTH_V else tl.zeros([HEAD_DIM], dtype=tl.float32)
    vamax = tl.maximum(tl.maximum(vmax - vm, vm - vmin), EPS)
    tl.store(vm_ptr + o, vm)
    tl.store(vinv_ptr + o, tl.math.div_rn(QMAX, vamax))
    tl.store(vs_ptr + o, tl.math.div_rn(vamax, QMAX))


@triton.jit
def _v_bias_finalize_kernel(vm_ptr, vb_ptr, out_ptr, NKB, NK_F, HEAD_DIM: tl.constexpr, BLOCK_R: tl.constexpr):
    """Per (b, h): V's mean plus its rounding bias, the key blocks' sums of V - dequant(V8) over all tokens
    (BLOCK_R key blocks a step)."""
    pid_bh = tl.program_id(0)
    offs_d = tl.arange(0, HEAD_DIM)
    offs_r = tl.arange(0, BLOCK_R)
    acc = tl.zeros([HEAD_DIM], dtype=tl.float32)
    for r0 in range(0, NKB, BLOCK_R):
        ok = ((r0 + offs_r) < NKB)[:, None]
        p = vb_ptr + (pid_bh * NKB + r0 + offs_r)[:, None] * HEAD_DIM + offs_d[None, :]
        acc += tl.sum(tl.load(p, mask=ok, other=0.0), axis=0)
    o = pid_bh * HEAD_DIM + offs_d
    tl.store(out_ptr + o, tl.load(vm_ptr + o) + tl.math.div_rn(acc, NK_F))


@triton.jit
def _quant_k_block(k, pid_n, pid_bh, tok, valid, offs_d, km_ptr, k8_ptr, ks_ptr, NK_PAD, NKB,
                   HEAD_DIM: tl.constexpr, SMOOTH_K: tl.constexpr):
    """K block (fp32 tile) -> K - mean (smoothing), int8 with one scale for the block."""
    if SMOOTH_K:
        k = k - tl.load(km_ptr + pid_bh * HEAD_DIM + offs_d)[None, :]
    k = tl.where(valid, k, 0.0)
    amax = tl.maximum(tl.max(tl.max(tl.abs(k), axis=1), axis=0), 1e-8)
    k8 = tl.minimum(tl.maximum(rint_f32(k * tl.math.div_rn(127.0, amax)), -127.0), 127.0).to(tl.int8)
    row = pid_bh.to(tl.int64) * NK_PAD + tok
    tl.store(k8_ptr + row[:, None] * HEAD_DIM + offs_d[None, :], k8)
    tl.store(ks_ptr + pid_bh * NKB + pid_n, tl.math.div_rn(amax, 127.0))


@triton.jit
def _quant_v_block(v, pid_n, pid_bh, tok, valid, offs_d, vm_ptr, vinv_ptr, vs_ptr, vt_ptr, vb_ptr, NK_PAD, NKB,
                   HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, SMOOTH_V: tl.constexpr, PV_FP8: tl.constexpr,
                   EMULATE_FP8: tl.constexpr, PERMUTE_V: tl.constexpr):
    """V block (fp32 tile) -> V - mean, e4m3 per channel (or fp16) stored transposed, and the block's per-channel
    sum of the rounding error."""
    if SMOOTH_V:
        v = v - tl.load(vm_ptr + pid_bh * HEAD_DIM + offs_d)[None, :]
    v = tl.where(valid, v, 0.0)
    if PV_FP8:
        v8 = to_fp8_e4m3(v * tl.load(vinv_ptr + pid_bh * HEAD_DIM + offs_d)[None, :], EMULATE_FP8)
        deq = v8.to(tl.float32) * tl.load(vs_ptr + pid_bh * HEAD_DIM + offs_d)[None, :]
    else:
        v8 = v.to(tl.float16)
        deq = v8.to(tl.float32)
    tl.store(vb_ptr + (pid_bh * NKB + pid_n) * HEAD_DIM + offs_d, tl.sum(v - deq, axis=0))
    if PERMUTE_V:  # token 16a + 8b + 2c + e (a, b, e < 2, c < 4) -> column 16a + 4c + 2b + e
        v8 = tl.reshape(tl.permute(tl.reshape(v8, [BLOCK_N // 32, 2, 2, 4, 2, HEAD_DIM]), [0, 1, 3, 2, 4, 5]),
                        [BLOCK_N, HEAD_DIM])
    vrow = pid_bh.to(tl.int64) * HEAD_DIM + offs_d
    tl.store(vt_ptr + vrow[None, :] * NK_PAD + tok[:, None], v8)


@triton.jit
def _kv_quant_kernel(k_ptr, v_ptr, km_ptr, vm_ptr, vinv_ptr, vs_ptr, k8_ptr, ks_ptr, vt_ptr, vb_ptr,
                     H, NK, NK_PAD, NKB,
                     skb, skh, skn, skd, svb, svh, svn, svd,
                     HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, SMOOTH_K: tl.constexpr,
                     SMOOTH_V: tl.constexpr, PV_FP8: tl.constexpr, EMULATE_FP8: tl.constexpr,
                     PERMUTE_V: tl.constexpr, SPLIT_KV: tl.constexpr = False):
    """Smooth + int8-quantize one K block (per-block scale), quantize + transpose one V block and write the
    block's per-channel sum of V's rounding error (reference.v_rounding_bias; `_v_bias_finalize_kernel` sums them).

    PERMUTE_V: store token n of each 32-token group at column `attention_sm90.v_column(n)`, the order in which
    the Gluon kernel's P registers already sit as a wgmma A operand (no shuffles of P before P.V). The tile is
    permuted in registers (reshape / permute) so the transposed store stays token-contiguous: storing to permuted
    columns scattered it into 2-byte pieces (H200: 222 -> 133 us on Wan2.1-1.3B's K and V).
    SPLIT_KV: the K block and the V block in two programs (grid axis 2 of size 2), each streaming one tensor (at
    D=64 with half the registers, so twice the programs an SM); the same codes bit for bit (H200: 199 -> 131 us on
    Wan2.1-1.3B's K and V as views of a fused QKV projection)."""
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    valid = (offs_n < NK)[:, None]
    tok = offs_n.to(tl.int64)
    k_tile = k_ptr + b * skb + h * skh + tok[:, None] * skn + offs_d[None, :] * skd
    v_tile = v_ptr + b * svb + h * svh + tok[:, None] * svn + offs_d[None, :] * svd
    if SPLIT_KV:
        if tl.program_id(2) == 0:
            k = tl.load(k_tile, mask=valid, other=0.0).to(tl.float32)
            _quant_k_block(k, pid_n, pid_bh, tok, valid, offs_d, km_ptr, k8_ptr, ks_ptr, NK_PAD, NKB, HEAD_DIM,
                           SMOOTH_K)
        else:
            v = tl.load(v_tile, mask=valid, other=0.0).to(tl.float32)
            _quant_v_block(v, pid_n, pid_bh, tok, valid, offs_d, vm_ptr, vinv_ptr, vs_ptr, vt_ptr, vb_ptr, NK_PAD,
                           NKB, HEAD_DIM, BLOCK_N, SMOOTH_V, PV_FP8, EMULATE_FP8, PERMUTE_V)
    else:
        k = tl.load(k_tile, mask=valid, other=0.0).to(tl.float32)
        v = tl.load(v_tile, mask=valid, other=0.0).to(tl.float32)                  # both loads in flight at once
        _quant_k_block(k, pid_n, pid_bh, tok, valid, offs_d, km_ptr, k8_ptr, ks_ptr, NK_PAD, NKB, HEAD_DIM, SMOOTH_K)
        _quant_v_block(v, pid_n, pid_bh, tok, valid, offs_d, vm_ptr, vinv_ptr, vs_ptr, vt_ptr, vb_ptr, NK_PAD, NKB,
                       HEAD_DIM, BLOCK_N, SMOOTH_V, PV_FP8, EMULATE_FP8, PERMUTE_V)


@triton.jit
def _attn_step(acc, l_i, m_i, q8, c_q, k, v, ks, offs_n, n_valid,
               MASK: tl.constexpr, PV_FP8: tl.constexpr, PV_PROMOTE: tl.constexpr,
               EXP_F16X2: tl.constexpr, EMULATE_FP8: tl.constexpr, BLOCK_N: tl.constexpr):
    """One key block of the online softmax: int8 QK^T, exp2, quantized P, P.V accumulate."""
    s = tl.dot(q8, k.T, out_dtype=tl.int32)
    # exact int32 -> fp32 with IADD + FADD (|s| <= D*127*127 < 2**22), keeping the MUFU-class
    # pipe (I2F, 16/clk/SM like ex2) free for the exponentials
    sf = int_to_f32_exact(s)
    if MASK:
        sf = tl.where((offs_n < n_valid)[None, :], sf, float("-inf"))
    c = c_q * ks
    m_new = tl.maximum(m_i, tl.max(sf, axis=1) * c)
    if PV_FP8:
        bias = m_new - 8.0                                   # P = 2**(logit - m + 8) in (0, 256]
    else:
        bias = m_new
    x = sf * c - bias[:, None]                               # one FFMA per element
    if EXP_F16X2:
        ph = tl.inline_asm_elementwise("ex2.approx.f16x2 $0, $1;", "=r,r", [x.to(tl.float16)],
                                       dtype=tl.float16, is_pure=True, pack=2)
        l_ij = tl.sum(ph.to(tl.float32), axis=1)
        if PV_FP8:
            pq = ph.to(tl.float8e4nv)
        else:
            pq = ph
    else:
        p = tl.math.exp2(x)
        l_ij = tl.sum(p, axis=1)
        if PV_FP8:
            if EMULATE_FP8:
                pq = to_fp8_e4m3(p, True)
            else:
                pq = p.to(tl.float8e4nv)                     # cvt.rn.satfinite, no clamp needed
        else:
            pq = p.to(tl.float16)
    alpha = tl.math.exp2(m_i - m_new)
    l_i = l_i * alpha + l_ij
    acc = acc * alpha[:, None]
    if PV_FP8 and PV_PROMOTE:
        acc = tl.dot(pq, v, acc, max_num_imprecise_acc=BLOCK_N)
    else:
        acc = tl.dot(pq, v, acc)
    return acc, l_i, m_new


@triton.jit
def _sage_attn_kernel(q_ptr, k_src, ks_ptr, v_src, vs_ptr, vm_ptr, o_ptr,
                      H, NQ, NK, NK_PAD, NKB, qk_scale,
                      stride_qb, stride_qh, stride_qn, stride_qd,
                      stride_ob, stride_oh, stride_on, stride_od,
                      HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                      USE_TMA: tl.constexpr, PV_FP8: tl.constexpr, PV_PROMOTE: tl.constexpr,
                      EXP_F16X2: tl.constexpr, EMULATE_FP8: tl.constexpr):
    """Fused quantized attention for BLOCK_M queries of one (b, h)."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    offs_n = tl.arange(0, BLOCK_N)
    row_ok = (offs_m < NQ)[:, None]

    # --- Q: load in the caller's layout, per-block int8 quantization in registers
    q = tl.load(q_ptr + b * stride_qb + h * stride_qh + offs_m.to(tl.int64)[:, None] * stride_qn
                + offs_d[None, :] * stride_qd, mask=row_ok, other=0.0).to(tl.float32)
    q_amax = tl.maximum(tl.max(tl.max(tl.abs(q), axis=1), axis=0), 1e-8)
    q8 = tl.minimum(tl.maximum(rint_f32(q * tl.math.div_rn(127.0, q_amax)), -127.0), 127.0).to(tl.int8)
    c_q = tl.math.div_rn(q_amax, 127.0) * qk_scale

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    kv_row0 = pid_bh * NK_PAD
    v_row0 = pid_bh * HEAD_DIM
    ks_base = ks_ptr + pid_bh * NKB
    if not USE_TMA:
        k_ptrs = k_src + (kv_row0 + offs_n).to(tl.int64)[:, None] * HEAD_DIM + offs_d[None, :]
        v_ptrs = v_src + (v_row0 + offs_d).to(tl.int64)[None, :] * NK_PAD + offs_n[:, None]  # [BLOCK_N, D] of V^T
    n_full = NK // BLOCK_N
    for j in range(0, n_full):
        if USE_TMA:
            k = k_src.load([kv_row0 + j * BLOCK_N, 0])
            v = v_src.load([v_row0, j * BLOCK_N]).T
        else:
            k = tl.load(k_ptrs)
            v = tl.load(v_ptrs)
            k_ptrs += BLOCK_N * HEAD_DIM
            v_ptrs += BLOCK_N
        ks = tl.load(ks_base + j)
        acc, l_i, m_i = _attn_step(acc, l_i, m_i, q8, c_q, k, v, ks, offs_n, BLOCK_N, False,
                                   PV_FP8, PV_PROMOTE, EXP_F16X2, EMULATE_FP8, BLOCK_N)
    if n_full * BLOCK_N < NK:  # ragged last key block: padded rows are zero, mask their logits
        if USE_TMA:
            k = k_src.load([kv_row0 + n_full * BLOCK_N, 0])
            v = v_src.load([v_row0, n_full * BLOCK_N]).T
        else:
            k = tl.load(k_ptrs)
            v = tl.load(v_ptrs)
        ks = tl.load(ks_base + n_full)
        acc, l_i, m_i = _attn_step(acc, l_i, m_i, q8, c_q, k, v, ks, offs_n, NK - n_full * BLOCK_N, True,
                                   PV_FP8, PV_PROMOTE, EXP_F16X2, EMULATE_FP8, BLOCK_N)

    out = acc / l_i[:, None]
    if PV_FP8:
        out = out * tl.load(vs_ptr + pid_bh * HEAD_DIM + offs_d)[None, :]
    out = out + tl.load(vm_ptr + pid_bh * HEAD_DIM + offs_d)[None, :]    # V mean (if smoothed) + rounding bias
    tl.store(o_ptr + b * stride_ob + h * stride_oh + offs_m.to(tl.int64)[:, None] * stride_on
             + offs_d[None, :] * stride_od, out.to(o_ptr.dtype.element_ty), mask=row_ok)


# (num_warps, num_stages); block sizes are fixed by the caller because they define the
# quantization granularity (Q per BLOCK_M rows, K per BLOCK_N tokens).
ATTN_CONFIGS = [(4, 3), (8, 2), (8, 3), (8, 4)]
_attn_tuned = triton.autotune(
    configs=[triton.Config({}, num_warps=w, num_stages=s) for w, s in ATTN_CONFIGS],
    key=["HEAD_DIM", "BLOCK_M", "BLOCK_N", "USE_TMA", "PV_FP8", "PV_PROMOTE", "EXP_F16X2"],
    do_bench=fast_bench)(_sage_attn_kernel)


def last_best_config() -> Optional[str]:
    """String form of the config the attention autotuner picked most recently."""
    cfg = getattr(_attn_tuned, "best_config", None)
    return None if cfg is None else str(cfg)


def quant_attention_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, sm_scale: Optional[float] = None,
                           block_m: Optional[int] = None, block_n: Optional[int] = None, pv_dtype: str = "fp8",
                           smooth_k: bool = True, smooth_v: bool = True, *, impl: str = "auto",
                           exp_f16x2: bool = False, pv_promote: bool = True,
                           config: Optional[Dict[str, int]] = None) -> torch.Tensor:
    """Triton quantized attention for [B, H, N, D] q/k/v (any strides); semantics of quant_attention_ref.

    block_m / block_n: query / key block (Q- and K-scale granularity); None: `default_blocks(D)`.
    impl: "auto" (on sm_90 the Gluon kernel of attention_sm90.py at D = 64 and 128, else TMA K/V loads on sm_90+),
    "fa3" (that Gluon kernel), "tma" or "ptr". exp_f16x2: compute exp2 two-at-a-time
    with ex2.approx.f16x2 (GPU only; halves MUFU work, P rounded to fp16 before fp8). pv_promote:
    promote the fp8 P.V wgmma accumulator to fp32 every key block. config: {num_warps, num_stages}.
    """
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError("quant_attention expects [B, H, N, D] tensors")
    bsz, h, nq, d = q.shape
    nk = k.shape[2]
    if k.shape != (bsz, h, nk, d) or v.shape != k.shape:
        raise ValueError(f"incompatible shapes q{tuple(q.shape)} k{tuple(k.shape)} v{tuple(v.shape)}")
    if d not in (16, 32, 64, 128):
        raise ValueError(f"head_dim must be 16, 32, 64 or 128, got {d}")
    if pv_dtype not in ("fp8", "fp16"):
        raise ValueError("pv_dtype must be 'fp8' or 'fp16'")
    default_m, default_n = default_blocks(d)
    block_m = default_m if block_m is None else block_m
    block_n = default_n if block_n is None else block_n
    for name, blk in (("block_m", block_m), ("block_n", block_n)):
        if blk < 16 or blk & (blk - 1):
            raise ValueError(f"{name} must be a power of two >= 16, got {blk}")
    if exp_f16x2 and interpreting():
        raise ValueError("exp_f16x2 uses inline PTX and cannot run in the Triton interpreter")
    scale = 1.0 / math.sqrt(d) if sm_scale is None else float(sm_scale)
    dev = q.device
    out = torch.empty_like(q)  # q's memory layout: diffusers' [B, N, H, D] behind a [B, H, N, D] view stays free to undo
    if nq == 0 or bsz * h == 0:
        return out
    if nk == 0:
        raise ValueError("attention over zero keys is undefined")
    bh = bsz * h
    pv_fp8 = pv_dtype == "fp8"
    emulate = interpreting()

    # 1) statistics for K smoothing and V smoothing / per-channel V scale
    passes = KV_PASSES[d]
    block_t = passes["stats_block_t"]  # ~4 programs per SM (swept on an H200, NOTES.md)
    target = 4 * num_sms(dev)
    splits = max(1, min(triton.cdiv(nk, block_t), triton.cdiv(target, bh)))
    tok_per_split = triton.cdiv(triton.cdiv(nk, splits), block_t) * block_t
    splits = triton.cdiv(nk, tok_per_split)
    part = torch.empty((4, bh, splits, d), device=dev, dtype=torch.float32)
    _kv_stats_kernel[(bh, splits)](k, v, part[0], part[1], part[2], part[3], h, nk, tok_per_split, splits,
                                   *k.stride(), *v.stride(), HEAD_DIM=d, BLOCK_T=block_t,
                                   UNROLL=passes["stats_unroll"], num_warps=4)
    # the splits' partials -> K / V means and V's scales in one tiny launch (was ~12 torch kernels a call)
    km, vm, vinv, vs = torch.empty((4, bh, d), device=dev, dtype=torch.float32).unbind(0)
    _kv_stats_finalize_kernel[(bh,)](part, km, vm, vinv, vs, bh, splits, float(nk), HEAD_DIM=d,
                                     SMOOTH_V=smooth_v, EPS=EPS, QMAX=FP8_MAX, BLOCK_R=32, num_warps=4)

    # the Gluon sm_90 kernel (attention_sm90.py) or the Triton kernel below
    use_fa3 = False
    if impl in ("auto", "fa3"):
        from .attention_sm90 import FA3_AUTO_HEAD_DIMS, fa3_supported, launch_fa3
        gluon_ok = not exp_f16x2 and pv_promote and fa3_supported(q, d, block_m, block_n, pv_fp8)
        if impl == "fa3" and not gluon_ok:
            raise ValueError("impl='fa3' needs a Hopper GPU, Gluon (Triton >= 3.5), pv_dtype='fp8', head_dim 64 or "
                             "128, block_m 64, block_n 64 or 128, pv_promote and no exp_f16x2; use impl='auto'")
        use_fa3 = impl == "fa3" or (gluon_ok and d in FA3_AUTO_HEAD_DIMS and config is None)

    # 2) K int8 per block (smoothed), V^T e4m3 per channel (or fp16), padded to BLOCK_N
    nkb = triton.cdiv(nk, block_n)
    nk_pad = nkb * block_n
    k8 = torch.empty((bh * nk_pad, d), device=dev, dtype=torch.int8)
    ks = torch.empty((bh, nkb), device=dev, dtype=torch.float32)
    vt = torch.empty((bh * d, nk_pad), device=dev, dtype=torch.float8_e4m3fn if pv_fp8 else torch.float16)
    vb = torch.empty((bh, nkb, d), device=dev, dtype=torch.float32)
    split = passes["split_kv"]
    _kv_quant_kernel[(nkb, bh, 2 if split else 1)](k, v, km, vm, vinv, vs, k8, ks, vt, vb, h, nk, nk_pad, nkb,
                                                   *k.stride(), *v.stride(), HEAD_DIM=d, BLOCK_N=block_n,
                                                   SMOOTH_K=smooth_k, SMOOTH_V=smooth_v, PV_FP8=pv_fp8,
                                                   EMULATE_FP8=emulate, PERMUTE_V=use_fa3, SPLIT_KV=split,
                                                   num_warps=passes["quant_warps"])
    vm_bias = torch.empty_like(vm)                           # the epilogue adds V's mean and its rounding bias
    _v_bias_finalize_kernel[(bh,)](vm, vb, vm_bias, nkb, float(nk), HEAD_DIM=d, BLOCK_R=32, num_warps=4)
    vm = vm_bias

    # 3) fused attention
    if use_fa3:
        launch_fa3(q, k8, ks, vt, vs, vm, out, h, nk, nk_pad, nkb, scale * LOG2E, block_m, block_n)
        return out
    if impl == "auto":
        impl = "tma" if is_hopper_or_newer(dev) and tma_ok(k8, vt) else "ptr"
    if impl == "tma":
        k_src = TensorDescriptor(k8, list(k8.shape), list(k8.stride()), [block_n, d])
        v_src = TensorDescriptor(vt, list(vt.shape), list(vt.stride()), [d, block_n])
    elif impl == "ptr":
        k_src, v_src = k8, vt
    else:
        raise ValueError(f"impl must be 'auto', 'fa3', 'tma' or 'ptr', got {impl!r}")
    grid = (triton.cdiv(nq, block_m), bh)
    args = (q, k_src, ks, v_src, vs, vm, out, h, nq, nk, nk_pad, nkb, scale * LOG2E,
            *q.stride(), *out.stride())
    flags = dict(HEAD_DIM=d, BLOCK_M=block_m, BLOCK_N=block_n, USE_TMA=impl == "tma", PV_FP8=pv_fp8,
                 PV_PROMOTE=pv_promote and pv_fp8, EXP_F16X2=exp_f16x2, EMULATE_FP8=emulate)
    if config is None and not interpreting():
        _attn_tuned[grid](*args, **flags)
    else:
        cfg = config or {}
        _sage_attn_kernel[grid](*args, **flags, num_warps=cfg.get("num_warps", 4),
                                num_stages=cfg.get("num_stages", 2))
    return out
