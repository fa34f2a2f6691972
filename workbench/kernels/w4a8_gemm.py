"""W4A8 linear: int8 per-token activations x int4 weights, per group (unpacked in the GEMM mainloop) or per channel.

Group-wise: the kernel computes the transposed tile C^T[BLOCK_N, BLOCK_M] = W[BLOCK_N, K] @ A[BLOCK_M, K]^T so
that the freshly unpacked weights are the *A* operand of the MMA (on Hopper wgmma can read A from
registers, so the unpacked int4->int8 tile does not need a shared-memory round trip) while the int8
activations stream through shared memory as the K-major B operand. Each K step covers exactly one
quantization group: the exact int32 partial sum is converted to fp32 with an integer add + fp32 sub
(|partial| <= G*127*8 < 2**22, avoiding the slow I2F path) and accumulated as acc += part * scale[n, g].

Per channel (one scale per output channel, e.g. ViDiT-Q's W4A8): the layer's weight is unpacked to int8 by one
small kernel and multiplied by the int8 GEMM (`scaled_mm`, TMA + wgmma with both operands in shared memory),
the scale applied in its epilogue. On an H200 that ran at the int8 GEMM's speed (CogVideoX-2B ff1 0.484 ms vs
0.482 int8, 0.773 bf16; the unpack 0.02-0.05 ms), while unpacking in the mainloop with the int32 accumulator
ran no faster than bf16 (0.779 ms): Triton waits on each register-A wgmma. Weights at rest stay 4-bit; the int8
copy lives for one call.
"""

from __future__ import annotations

from typing import Any, Dict, Optional

import torch
import triton
import triton.language as tl

from ._triton_utils import (fast_bench, gelu_tanh_f32, grouped_pid, int_to_f32_exact, interpreting, m_bucket,
                            use_fast_math)
from .act_quant import quantize_rows
from .reference import linear_out_dtype
from .scaled_mm import ACTIVATIONS, scaled_mm


@triton.jit
def _unpack_nibbles(b):
    """uint8 [..., n] -> int8 [..., n, 2]: each byte's sign-extended low nibble (even k), then its high one."""
    lo = (b << 4).to(tl.int8, bitcast=True) >> 4
    hi = b.to(tl.int8, bitcast=True) >> 4
    return tl.join(lo, hi)


@triton.jit
def _w4a8_kernel(a_ptr, w_ptr, ws_ptr, a_scale_ptr, bias_ptr, c_ptr,
                 M, N, K, M_BUCKET, stride_am, stride_wn, stride_wsn, stride_cm,
                 BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, GROUP: tl.constexpr, GROUP_M: tl.constexpr,
                 HAS_BIAS: tl.constexpr, ACT: tl.constexpr, FAST: tl.constexpr):
    """One [BLOCK_N, BLOCK_M] output tile; the K loop walks quantization groups."""
    pid = tl.program_id(axis=0)
    pid_m, pid_n = grouped_pid(pid, tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N), GROUP_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    wn = tl.where(offs_n < N, offs_n, 0).to(tl.int64)
    am = tl.where(offs_m < M, offs_m, 0).to(tl.int64)
    offs_kp = tl.arange(0, GROUP // 2)
    offs_k = tl.arange(0, GROUP)
    w_ptrs = w_ptr + wn[:, None] * stride_wn + offs_kp[None, :]
    a_ptrs = a_ptr + am[:, None] * stride_am + offs_k[None, :]
    s_ptrs = ws_ptr + wn * stride_wsn
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    for g in range(K // GROUP):
        wp = tl.load(w_ptrs)                                   # uint8 [BLOCK_N, GROUP/2]
        w = tl.reshape(_unpack_nibbles(wp), (BLOCK_N, GROUP))  # int8 [BLOCK_N, GROUP]
        a = tl.load(a_ptrs)                                     # int8 [BLOCK_M, GROUP]
        part = tl.dot(w, a.T, out_dtype=tl.int32)
        gs = tl.load(s_ptrs + g)
        acc += int_to_f32_exact(part) * gs[:, None]
        w_ptrs += GROUP // 2
        a_ptrs += GROUP
    a_s = tl.load(a_scale_ptr + offs_m, mask=offs_m < M, other=0.0)
    out = acc * a_s[None, :]
    if HAS_BIAS:
        out = out + tl.load(bias_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[:, None]
    if ACT == 1:
        out = gelu_tanh_f32(out, FAST)
    c_ptrs = c_ptr + offs_m.to(tl.int64)[None, :] * stride_cm + offs_n[:, None]
    tl.store(c_ptrs, out.to(c_ptr.dtype.element_ty), mask=(offs_m[None, :] < M) & (offs_n[:, None] < N))


# (BLOCK_N, BLOCK_M, num_warps, num_stages): a large token tile amortizes the per-weight unpack.
W4A8_CONFIGS = [
    (128, 256, 8, 3),
    (128, 128, 8, 3),
    (128, 128, 4, 4),
    (256, 128, 8, 3),
    (64, 256, 4, 3),
]
_tuned = triton.autotune(
    configs=[triton.Config({"BLOCK_N": bn, "BLOCK_M": bm, "GROUP_M": 8}, num_warps=w, num_stages=s)
             for bn, bm, w, s in W4A8_CONFIGS],
    key=["M_BUCKET", "N", "K", "GROUP", "HAS_BIAS", "ACT"], do_bench=fast_bench)(_w4a8_kernel)


@triton.jit
def _unpack_int4_kernel(p_ptr, out_ptr, n_bytes, BLOCK: tl.constexpr):
    """uint8 bytes -> two sign-extended int8 codes each (low nibble first), the layout of reference.unpack_int4."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < n_bytes
    pair = _unpack_nibbles(tl.load(p_ptr + offs, mask=ok, other=0))  # [BLOCK, 2]
    tl.store(out_ptr + (2 * offs.to(tl.int64))[:, None] + tl.arange(0, 2)[None, :], pair, mask=ok[:, None])


def unpack_int4_triton(w_packed: torch.Tensor) -> torch.Tensor:
    """Packed int4 [N, K/2] -> int8 codes [N, K] on the GPU (reference.unpack_int4's semantics)."""
    w_packed = w_packed.contiguous()
    out = torch.empty((*w_packed.shape[:-1], w_packed.shape[-1] * 2), device=w_packed.device, dtype=torch.int8)
    n = w_packed.numel()
    if n:
        block = 1024
        _unpack_int4_kernel[(triton.cdiv(n, block),)](w_packed, out, n, BLOCK=block, num_warps=4)
    return out


def last_best_config() -> Optional[str]:
    """String form of the config the W4A8 autotuner picked most recently."""
    cfg = getattr(_tuned, "best_config", None)
    return None if cfg is None else str(cfg)


def w4a8_scaled_mm(xq: torch.Tensor, x_scale: torch.Tensor, w_packed: torch.Tensor, w_scales_grouped: torch.Tensor,
                   bias: Optional[torch.Tensor] = None, activation: Optional[str] = None,
                   out_dtype: torch.dtype = torch.bfloat16, *, config: Optional[Dict[str, int]] = None
                   ) -> torch.Tensor:
    """W4A8 GEMM on pre-quantized int8 activations; semantics of reference.w4a8_scaled_mm_ref.
    w_scales_grouped [N, K / group]; one column ([N, 1]) means per-channel scales (unpack + the int8 GEMM)."""
    if xq.dtype != torch.int8 or w_packed.dtype != torch.uint8:
        raise ValueError(f"w4a8 needs int8 activations and uint8 packed weights, got {xq.dtype} / {w_packed.dtype}")
    m, k = xq.shape
    n = w_packed.shape[0]
    if w_packed.shape[1] * 2 != k:
        raise ValueError(f"packed weight holds K={w_packed.shape[1] * 2}, activations have K={k}")
    if k % 16 or n % 16:
        raise ValueError(f"w4a8: K={k} and N={n} must both be multiples of 16")
    ng = w_scales_grouped.shape[1]
    if w_scales_grouped.shape[0] != n or k % ng:
        raise ValueError(f"group scales {tuple(w_scales_grouped.shape)} do not match N={n}, K={k}")
    if ng == 1:  # one scale per output channel: unpack to int8, then the int8 GEMM (module docstring)
        gemm_config = config if config and "BLOCK_K" in config else None  # a W4A8 tile config does not apply
        return scaled_mm(xq, x_scale.reshape(-1), unpack_int4_triton(w_packed), w_scales_grouped.reshape(-1).float(),
                         bias, activation, out_dtype, config=gemm_config)
    group = k // ng
    if group not in (32, 64, 128, 256):
        raise ValueError(f"w4a8 kernel supports group sizes 32/64/128/256 or one scale per channel, got {group}")
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {list(ACTIVATIONS)}, got {activation!r}")
    xq = xq if xq.stride(1) == 1 else xq.contiguous()
    w_packed = w_packed.contiguous()
    ws = w_scales_grouped.float().contiguous()
    xs = x_scale.reshape(-1).float().contiguous()
    c = torch.empty((m, n), device=xq.device, dtype=out_dtype)
    if m == 0:
        return c
    args = (xq, w_packed, ws, xs, bias.contiguous() if bias is not None else xs, c,
            m, n, k, m_bucket(m), xq.stride(0), w_packed.stride(0), ws.stride(0), c.stride(0))
    common = dict(GROUP=group, HAS_BIAS=bias is not None, ACT=ACTIVATIONS[activation], FAST=use_fast_math())
    if config is None and interpreting():  # the autotuner needs CUDA events
        config = {"BLOCK_N": 32, "BLOCK_M": 32}
    if config is None:
        grid = lambda meta: (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),)
        _tuned[grid](*args, **common)
    else:
        cfg = dict(config)
        nw, ns = cfg.pop("num_warps", 4), cfg.pop("num_stages", 3)
        cfg.setdefault("GROUP_M", 8)
        grid = (triton.cdiv(m, cfg["BLOCK_M"]) * triton.cdiv(n, cfg["BLOCK_N"]),)
        _w4a8_kernel[grid](*args, num_warps=nw, num_stages=ns, **cfg, **common)
    return c


def w4a8_linear_triton(x: torch.Tensor, w_packed: torch.Tensor, w_scales_grouped: torch.Tensor,
                       bias: Optional[torch.Tensor] = None, activation: Optional[str] = None,
                       **kw: Any) -> torch.Tensor:
    """Triton W4A8 linear with the signature and semantics of reference.w4a8_linear_ref."""
    k = x.shape[-1]
    xq, xs = quantize_rows(x.reshape(-1, k))
    out = w4a8_scaled_mm(xq, xs, w_packed, w_scales_grouped, bias, activation, linear_out_dtype(x), **kw)
    return out.reshape(*x.shape[:-1], w_packed.shape[0])
