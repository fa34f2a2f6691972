"""Hopper (sm_90) main loop of the quantized attention, written in Gluon (Triton's explicit-layout dialect).

Same math as `attention._sage_attn_kernel` (semantics: `reference.quant_attention_ref`), one warpgroup per 64
query rows, each key block in order like SageAttention2: S = Q8 K8^T (int8 wgmma), its softmax on the CUDA
cores, P V (fp8 wgmma), each waited at once. The kernel is built for occupancy rather than intra-warpgroup
overlap: 128 registers at D=64 (four CTAs per SM) and 167 at D=128 (three), so the CTAs of an SM hide each
other's latencies; FlashAttention-3's order (S[j+1] issued under the softmax of S[j]) needs 238-255 registers,
two CTAs per SM, and measured slower on an H200 at both head dims (NOTES.md). Per key block:

* K and V^T tiles arrive by TMA into a ring of STAGES slots, each refilled as soon as its wgmma returned.
* V^T comes with its tokens permuted inside every 32-token group (`v_column`), so that P, still in the Q.K^T
  accumulator's registers, is already the fp8 wgmma's A operand (no shuffles; SageAttention2 does the same).
* P V starts from zero each key block and is added to the fp32 accumulator on the CUDA cores
  (SageAttention2's two-level accumulation: Hopper's fp8 wgmma accumulates with reduced precision).
"""
from __future__ import annotations

from typing import Any, Dict, Optional

import torch

try:  # Gluon ships with Triton >= 3.5; the CPU reference path needs none of this
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import fence_async_shared, mbarrier, tma, warpgroup_mma
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor as GluonDescriptor
    HAS_GLUON = True
except Exception:  # pragma: no cover - depends on the installed Triton
    HAS_GLUON = False


# head dims at which impl="auto" takes this kernel on sm_90 (measured faster than the Triton kernel there)
FA3_AUTO_HEAD_DIMS = (64, 128)
# per head dim: TMA ring depth and register cap; 128 registers at D=64 (four CTAs per SM), 167 at D=128 (three)
FA3_SCHEDULE: Dict[int, Dict[str, Any]] = {64: dict(stages=2, maxnreg=None), 128: dict(stages=2, maxnreg=None)}


def v_column(n: torch.Tensor) -> torch.Tensor:
    """Column of token n in the permuted V^T: inside each 32-token group, token 8b + 2c + e (b < 4, c < 4, e < 2)
    goes to 16 (b // 2) + 4c + 2 (b % 2) + e, the k index that P's accumulator register holding that token has
    in the fp8 wgmma A-operand layout (attention._kv_quant_kernel, PERMUTE_V)."""
    r = n % 32
    return n - r + 16 * (r // 16) + 4 * ((r % 8) // 2) + 2 * ((r // 8) % 2) + r % 2


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
    def _p_operand(p, p_layout: gl.constexpr):
        """P rounded to e4m3 as wgmma's A operand, in the token order of the permuted V^T (`v_column`): the
        reshape / permute only renames registers, so the layout conversion moves no data."""
        BM: gl.constexpr = p.shape[0]
        BN: gl.constexpr = p.shape[1]
        p8 = p.to(gl.float8e4nv)
        p8 = gl.reshape(p8, [BM, BN // 32, 2, 2, 4, 2])
        p8 = gl.permute(p8, [0, 1, 2, 4, 3, 5])
        p8 = gl.reshape(p8, [BM, BN])
        return gl.convert_layout(p8, p_layout)

    @gluon.jit
    def _key_block(j, q_smem, k_smem, v_smem, kbar, vbar, k_desc, v_desc, kv_row0, v_row0, NKB,
                   acc, l_i, m_i, c, offs_n, n_valid, zero_s, zero_o,
                   p_layout: gl.constexpr, o_layout: gl.constexpr,
                   STAGES: gl.constexpr, BLOCK_N: gl.constexpr, MASK: gl.constexpr):
        """Key block j: S, softmax, P V, each of its K and V slots refilled with block j + STAGES as soon as the
        wgmma reading it returned."""
        slot = j % STAGES
        phase = (j // STAGES) & 1
        nxt = j + STAGES
        mbarrier.wait(kbar.index(slot), phase)
        s = warpgroup_mma(q_smem, k_smem.index(slot).permute((1, 0)), zero_s, use_acc=False)
        mbarrier.expect(kbar.index(slot), k_desc.block_type.nbytes, pred=nxt < NKB)
        tma.async_copy_global_to_shared(k_desc, [kv_row0 + nxt * BLOCK_N, 0], kbar.index(slot), k_smem.index(slot),
                                        pred=nxt < NKB)
        p, m_i, alpha = _softmax_block(s, m_i, c, offs_n, n_valid, MASK)
        l_i = l_i * alpha + gl.sum(p, axis=1)
        mbarrier.wait(vbar.index(slot), phase)
        pv = warpgroup_mma(_p_operand(p, p_layout), v_smem.index(slot).permute((1, 0)), zero_o, use_acc=False)
        acc = acc * gl.convert_layout(alpha, gl.SliceLayout(1, o_layout))[:, None] + pv
        mbarrier.expect(vbar.index(slot), v_desc.block_type.nbytes, pred=nxt < NKB)
        tma.async_copy_global_to_shared(v_desc, [v_row0, nxt * BLOCK_N], vbar.index(slot), v_smem.index(slot),
                                        pred=nxt < NKB)
        return acc, l_i, m_i

    @gluon.jit
    def _fa3_attn_kernel(q_ptr, k_desc, ks_ptr, v_desc, vs_ptr, vm_ptr, o_ptr,
                         H, NQ, NK, NK_PAD, NKB, qk_scale,
                         stride_qb, stride_qh, stride_qn, stride_qd,
                         stride_ob, stride_oh, stride_on, stride_od,
                         HEAD_DIM: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr,
                         STAGES: gl.constexpr, num_warps: gl.constexpr):
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
        acc = gl.zeros([BLOCK_M, HEAD_DIM], gl.float32, o_layout)
        zero_s = gl.zeros([BLOCK_M, BLOCK_N], gl.int32, s_layout)
        zero_o = gl.zeros([BLOCK_M, HEAD_DIM], gl.float32, o_layout)
        l_i = gl.zeros([BLOCK_M], gl.float32, gl.SliceLayout(1, s_layout))
        offs_n = gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, s_layout))
        ks_base = ks_ptr + pid_bh * NKB
        for j in range(0, NKB - 1):
            acc, l_i, m_i = _key_block(j, q_smem, k_smem, v_smem, kbar, vbar, k_desc, v_desc, kv_row0, v_row0, NKB,
                                       acc, l_i, m_i, c_q * gl.load(ks_base + j), offs_n, BLOCK_N, zero_s, zero_o,
                                       p_layout, o_layout, STAGES, BLOCK_N, False)
        # last key block (ragged: padded keys are masked)
        acc, l_i, m_i = _key_block(NKB - 1, q_smem, k_smem, v_smem, kbar, vbar, k_desc, v_desc, kv_row0, v_row0,
                                   NKB, acc, l_i, m_i, c_q * gl.load(ks_base + NKB - 1), offs_n,
                                   NK - (NKB - 1) * BLOCK_N, zero_s, zero_o, p_layout, o_layout, STAGES, BLOCK_N,
                                   True)
        for i in gl.static_range(STAGES):
            mbarrier.invalidate(kbar.index(i))
            mbarrier.invalidate(vbar.index(i))

        # --- epilogue: O = acc / l * v_scale + V mean (if smoothed) + V rounding bias
        om = pid_m * BLOCK_M + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, o_layout))
        od = gl.arange(0, HEAD_DIM, layout=gl.SliceLayout(0, o_layout))
        out = acc / gl.convert_layout(l_i, gl.SliceLayout(1, o_layout))[:, None]
        out = (out * gl.load(vs_ptr + pid_bh * HEAD_DIM + od)[None, :]
               + gl.load(vm_ptr + pid_bh * HEAD_DIM + od)[None, :])
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
               block_m: int, block_n: int, stages: Optional[int] = None, maxnreg: Optional[int] = None) -> None:
    """Run the Gluon kernel on K/V already quantized by attention._kv_quant_kernel (k8 [BH*NK_PAD, D], vt [BH*D, NK_PAD]
    with V's tokens in `v_column` order); stages / maxnreg default to `FA3_SCHEDULE[head_dim]`."""
    bsz_h, nq, d = q.shape[0] * q.shape[1], q.shape[2], q.shape[3]
    k_layout = gl.NVMMASharedLayout.get_default_for([block_n, d], gl.int8)
    v_layout = gl.NVMMASharedLayout.get_default_for([d, block_n], gl.float8e4nv)
    k_desc = GluonDescriptor(k8, list(k8.shape), list(k8.stride()), [block_n, d], k_layout)
    v_desc = GluonDescriptor(vt, list(vt.shape), list(vt.stride()), [d, block_n], v_layout)
    sched = FA3_SCHEDULE[d]
    stages = sched["stages"] if stages is None else stages
    maxnreg = sched["maxnreg"] if maxnreg is None else maxnreg
    extra = {} if maxnreg is None else {"maxnreg": maxnreg}
    warps = block_m // 16   # one warp per 16 rows: warpgroups of 64 query rows
    grid = ((nq + block_m - 1) // block_m, bsz_h)
    _fa3_attn_kernel[grid](q, k_desc, ks, v_desc, vs, vm, out, heads, nq, nk, nk_pad, nkb, qk_scale,
                           *q.stride(), *out.stride(), HEAD_DIM=d, BLOCK_M=block_m, BLOCK_N=block_n,
                           STAGES=stages, num_warps=warps, **extra)
