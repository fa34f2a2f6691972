"""Hopper (sm_90) main loop of the quantized attention, written in Gluon for explicit wgmma scheduling.

Same math as `attention._sage_attn_kernel` (semantics: `reference.quant_attention_ref`), scheduled like
FlashAttention-3's intra-warpgroup overlap, which Triton's pipeliner does not produce (it waits for a Q.K^T
wgmma right after issuing it when the scores feed the softmax). Per key block j, in one warpgroup of 64 rows:

    issue S[j+1] = Q8 K8[j+1]^T (async)  ->  softmax of S[j] on the CUDA cores while the tensor cores run
    ->  fold P[j-1] V[j-1] into the fp32 accumulator  ->  P[j] V[j] (fp8 wgmma from zero; retires S[j+1])

K and V^T tiles arrive by TMA into a ring of STAGES slots, each refilled as soon as the wgmma reading it
has completed. P.V starts from zero each key block and is added to the fp32 accumulator on the CUDA cores
(SageAttention2's two-level accumulation: Hopper's fp8 wgmma accumulates with reduced precision).
Measured on an H200 (docs/benchmarks.md, workbench/kernels/NOTES.md): faster than the Triton kernel at
head_dim 128 with 128-key blocks and 64-query CTAs (two CTAs per SM), no faster at head_dim 64.
"""
from __future__ import annotations

import torch

try:  # Gluon ships with Triton >= 3.5; the CPU reference path needs none of this
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import (fence_async_shared, mbarrier, tma, warpgroup_mma,
                                                                  warpgroup_mma_wait)
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor as GluonDescriptor
    HAS_GLUON = True
except Exception:  # pragma: no cover - depends on the installed Triton
    HAS_GLUON = False


if HAS_GLUON:
    @gluon.jit
    def _softmax_block(s, m_i, c, offs_n, n_valid, MASK: gl.constexpr):
        """Base-2 online softmax of one key block of int32 scores: P = 2**(logit - m + 8) in (0, 256].

        The int32 -> fp32 conversion is folded into the logit FFMA: the bits of s + 0x4B400000 read as fp32
        are exactly 1.5 * 2**23 + s, whose max is the max of s, and (1.5 * 2**23 + s) * c - (1.5 * 2**23 * c + b)
        is s * c - b up to one rounding of that per-row constant (below 1 unit of c, less than the int8 error).
        """
        sb = (s + 0x4B400000).to(gl.float32, bitcast=True)                # 1.5 * 2**23 + s, exact
        if MASK:
            sb = gl.where((offs_n < n_valid)[None, :], sb, float("-inf"))
        m_new = gl.maximum(m_i, (gl.max(sb, axis=1) - 12582912.0) * c)
        p = gl.exp2(sb * c - (12582912.0 * c + (m_new - 8.0))[:, None])  # one FFMA per score
        alpha = gl.exp2(m_i - m_new)
        return p, m_new, alpha

    @gluon.jit
    def _pv_block(p, v_view, zero_o, p_layout: gl.constexpr):
        """P V of one key block from zero: P rounded to e4m3 and moved into wgmma's A-operand registers."""
        p8 = gl.convert_layout(p.to(gl.float8e4nv), p_layout)
        return warpgroup_mma(p8, v_view, zero_o, use_acc=False)

    @gluon.jit
    def _fa3_attn_kernel(q_ptr, k_desc, ks_ptr, v_desc, vs_ptr, vm_ptr, o_ptr,
                         H, NQ, NK, NK_PAD, NKB, qk_scale,
                         stride_qb, stride_qh, stride_qn, stride_qd,
                         stride_ob, stride_oh, stride_on, stride_od,
                         HEAD_DIM: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr,
                         STAGES: gl.constexpr, SMOOTH_V: gl.constexpr, num_warps: gl.constexpr):
        """BLOCK_M queries of one (b, h) against every key block; num_warps // 4 warpgroups of 64 rows."""
        pid_m = gl.program_id(0)
        pid_bh = gl.program_id(1)
        b = (pid_bh // H).to(gl.int64)
        h = (pid_bh % H).to(gl.int64)

        s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                           instr_shape=[16, BLOCK_N, 32])
        o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                           instr_shape=[16, HEAD_DIM, 32])
        p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=4)
        ld_layout: gl.constexpr = gl.BlockedLayout([1, 8], [4, 8], [num_warps, 1], [1, 0])

        # --- Q: caller's layout, int8 per BLOCK_M rows (sm_scale * log2 e folded into its scale), into SMEM
        offs_m = pid_m * BLOCK_M + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, ld_layout))
        offs_d = gl.arange(0, HEAD_DIM, layout=gl.SliceLayout(0, ld_layout))
        q = gl.load(q_ptr + b * stride_qb + h * stride_qh + offs_m.to(gl.int64)[:, None] * stride_qn
                    + offs_d[None, :] * stride_qd, mask=(offs_m < NQ)[:, None], other=0.0).to(gl.float32)
        q_amax = gl.maximum(gl.max(gl.max(gl.abs(q), axis=1), axis=0), 1e-8)
        q8 = (q * gl.div_rn(127.0, q_amax) + 12582912.0) - 12582912.0          # round half to even
        q8 = gl.minimum(gl.maximum(q8, -127.0), 127.0).to(gl.int8)
        c_q = gl.div_rn(q_amax, 127.0) * qk_scale
        q_smem = gl.allocate_shared_memory(gl.int8, [BLOCK_M, HEAD_DIM],
                                           gl.NVMMASharedLayout.get_default_for([BLOCK_M, HEAD_DIM], gl.int8))
        q_smem.store(q8)
        fence_async_shared()
        gl.thread_barrier()

        # --- K / V^T ring, filled by TMA
        k_smem = gl.allocate_shared_memory(gl.int8, [STAGES, BLOCK_N, HEAD_DIM], k_desc.layout)
        v_smem = gl.allocate_shared_memory(gl.float8e4nv, [STAGES, HEAD_DIM, BLOCK_N], v_desc.layout)
        kbar = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        vbar = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        for i in gl.static_range(STAGES):
            mbarrier.init(kbar.index(i), count=1)
            mbarrier.init(vbar.index(i), count=1)
        kv_row0 = pid_bh * NK_PAD
        v_row0 = pid_bh * HEAD_DIM
        for i in gl.static_range(STAGES):
            ok = i < NKB
            mbarrier.expect(kbar.index(i), k_desc.block_type.nbytes, pred=ok)
            tma.async_copy_global_to_shared(k_desc, [kv_row0 + i * BLOCK_N, 0], kbar.index(i), k_smem.index(i),
                                            pred=ok)
            mbarrier.expect(vbar.index(i), v_desc.block_type.nbytes, pred=ok)
            tma.async_copy_global_to_shared(v_desc, [v_row0, i * BLOCK_N], vbar.index(i), v_smem.index(i), pred=ok)

        m_i = gl.full([BLOCK_M], float("-inf"), gl.float32, gl.SliceLayout(1, s_layout))
        l_i = gl.zeros([BLOCK_M], gl.float32, gl.SliceLayout(1, s_layout))
        acc = gl.zeros([BLOCK_M, HEAD_DIM], gl.float32, o_layout)
        zero_s = gl.zeros([BLOCK_M, BLOCK_N], gl.int32, s_layout)
        zero_o = gl.zeros([BLOCK_M, HEAD_DIM], gl.float32, o_layout)
        pv = zero_o                                   # P V of the previous block, folded in one block late
        alpha_prev = gl.full([BLOCK_M], 1.0, gl.float32, gl.SliceLayout(1, o_layout))
        offs_n = gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, s_layout))
        ks_base = ks_ptr + pid_bh * NKB

        # --- prologue: S[0]
        mbarrier.wait(kbar.index(0), 0)
        s = warpgroup_mma(q_smem, k_smem.index(0).permute((1, 0)), zero_s, use_acc=False)
        nxt = STAGES < NKB
        mbarrier.expect(kbar.index(0), k_desc.block_type.nbytes, pred=nxt)
        tma.async_copy_global_to_shared(k_desc, [kv_row0 + STAGES * BLOCK_N, 0], kbar.index(0), k_smem.index(0),
                                        pred=nxt)

        for j in range(0, NKB - 1):
            # Q.K^T of block j+1 on the tensor cores ...
            ks_slot = (j + 1) % STAGES
            mbarrier.wait(kbar.index(ks_slot), ((j + 1) // STAGES) & 1)
            s_next = warpgroup_mma(q_smem, k_smem.index(ks_slot).permute((1, 0)), zero_s, use_acc=False,
                                   is_async=True)
            # ... while the softmax of block j runs on the CUDA cores
            p, m_i, alpha = _softmax_block(s, m_i, c_q * gl.load(ks_base + j), offs_n, BLOCK_N, False)
            l_i = l_i * alpha + gl.sum(p, axis=1)
            # fold in the previous block's P V while S[j+1] still runs
            acc = acc * alpha_prev[:, None] + pv
            vs_slot = j % STAGES
            mbarrier.wait(vbar.index(vs_slot), (j // STAGES) & 1)
            pv = _pv_block(p, v_smem.index(vs_slot).permute((1, 0)), zero_o, p_layout)   # retires S[j+1] too
            alpha_prev = gl.convert_layout(alpha, gl.SliceLayout(1, o_layout))
            s = warpgroup_mma_wait(0, deps=(s_next,))
            # both slots are free: V[j]'s takes block j+STAGES, K[j+1]'s block j+1+STAGES
            v_blk = j + STAGES
            mbarrier.expect(vbar.index(vs_slot), v_desc.block_type.nbytes, pred=v_blk < NKB)
            tma.async_copy_global_to_shared(v_desc, [v_row0, v_blk * BLOCK_N], vbar.index(vs_slot),
                                            v_smem.index(vs_slot), pred=v_blk < NKB)
            k_blk = j + 1 + STAGES
            mbarrier.expect(kbar.index(ks_slot), k_desc.block_type.nbytes, pred=k_blk < NKB)
            tma.async_copy_global_to_shared(k_desc, [kv_row0 + k_blk * BLOCK_N, 0], kbar.index(ks_slot),
                                            k_smem.index(ks_slot), pred=k_blk < NKB)

        # --- last key block (ragged: padded keys are masked)
        last = NKB - 1
        p, m_i, alpha = _softmax_block(s, m_i, c_q * gl.load(ks_base + last), offs_n, NK - last * BLOCK_N, True)
        l_i = l_i * alpha + gl.sum(p, axis=1)
        acc = acc * alpha_prev[:, None] + pv
        vs_slot = last % STAGES
        mbarrier.wait(vbar.index(vs_slot), (last // STAGES) & 1)
        pv = _pv_block(p, v_smem.index(vs_slot).permute((1, 0)), zero_o, p_layout)
        acc = acc * gl.convert_layout(alpha, gl.SliceLayout(1, o_layout))[:, None] + pv
        for i in gl.static_range(STAGES):
            mbarrier.invalidate(kbar.index(i))
            mbarrier.invalidate(vbar.index(i))

        # --- epilogue: O = acc / l * v_scale + mean(V)
        om = pid_m * BLOCK_M + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, o_layout))
        od = gl.arange(0, HEAD_DIM, layout=gl.SliceLayout(0, o_layout))
        out = acc / gl.convert_layout(l_i, gl.SliceLayout(1, o_layout))[:, None]
        out = out * gl.load(vs_ptr + pid_bh * HEAD_DIM + od)[None, :]
        if SMOOTH_V:
            out = out + gl.load(vm_ptr + pid_bh * HEAD_DIM + od)[None, :]
        gl.store(o_ptr + b * stride_ob + h * stride_oh + om.to(gl.int64)[:, None] * stride_on + od[None, :] * stride_od,
                 out.to(o_ptr.dtype.element_ty), mask=(om < NQ)[:, None])


def fa3_supported(q: torch.Tensor, head_dim: int, block_m: int, block_n: int, pv_fp8: bool) -> bool:
    """True where the Gluon sm_90 loop applies: Hopper, fp8 P.V, D in {64, 128}, one warpgroup of 64 query rows,
    an int8 wgmma N for BLOCK_N."""
    if not HAS_GLUON or not q.is_cuda or not pv_fp8 or block_m != 64:
        return False
    if torch.cuda.get_device_capability(q.device)[0] != 9:
        return False
    return head_dim in (64, 128) and block_n in (64, 128)


def launch_fa3(q: torch.Tensor, k8: torch.Tensor, ks: torch.Tensor, vt: torch.Tensor, vs: torch.Tensor,
               vm: torch.Tensor, out: torch.Tensor, heads: int, nk: int, nk_pad: int, nkb: int, qk_scale: float,
               block_m: int, block_n: int, smooth_v: bool, stages: int = 3) -> None:
    """Run the Gluon kernel on K/V already quantized by attention._kv_quant_kernel (k8 [BH*NK_PAD, D], vt [BH*D, NK_PAD])."""
    bsz_h, nq, d = q.shape[0] * q.shape[1], q.shape[2], q.shape[3]
    k_layout = gl.NVMMASharedLayout.get_default_for([block_n, d], gl.int8)
    v_layout = gl.NVMMASharedLayout.get_default_for([d, block_n], gl.float8e4nv)
    k_desc = GluonDescriptor(k8, list(k8.shape), list(k8.stride()), [block_n, d], k_layout)
    v_desc = GluonDescriptor(vt, list(vt.shape), list(vt.stride()), [d, block_n], v_layout)
    warps = block_m // 16   # one warp per 16 rows: warpgroups of 64 query rows
    grid = ((nq + block_m - 1) // block_m, bsz_h)
    _fa3_attn_kernel[grid](q, k_desc, ks, v_desc, vs, vm, out, heads, nq, nk, nk_pad, nkb, qk_scale,
                           *q.stride(), *out.stride(), HEAD_DIM=d, BLOCK_M=block_m, BLOCK_N=block_n,
                           STAGES=stages, SMOOTH_V=smooth_v,
                           num_warps=warps)
