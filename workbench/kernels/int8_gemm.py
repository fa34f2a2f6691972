"""W8A8 int8 linear: fused per-token activation quantization + int8 GEMM with dequant/bias/GELU epilogue."""

from __future__ import annotations

from typing import Any, Optional

import torch

from .act_quant import quantize_rows
from .reference import linear_out_dtype, quantize_per_token_uint8
from .scaled_mm import scaled_mm


def int8_scaled_mm(xq: torch.Tensor, x_scale: torch.Tensor, wq: torch.Tensor, w_scale: torch.Tensor,
                   bias: Optional[torch.Tensor] = None, activation: Optional[str] = None,
                   out_dtype: torch.dtype = torch.bfloat16, **kw: Any) -> torch.Tensor:
    """Int8 GEMM on pre-quantized activations (e.g. from layernorm_quant); see int8_scaled_mm_ref."""
    if xq.dtype != torch.int8 or wq.dtype != torch.int8:
        raise ValueError(f"int8_scaled_mm needs int8 operands, got {xq.dtype} / {wq.dtype}")
    return scaled_mm(xq, x_scale, wq, w_scale, bias, activation, out_dtype, **kw)


def w8a8_linear_triton(x: torch.Tensor, wq: torch.Tensor, w_scale: torch.Tensor,
                       bias: Optional[torch.Tensor] = None, activation: Optional[str] = None,
                       w_sum: Optional[torch.Tensor] = None, **kw: Any) -> torch.Tensor:
    """Triton W8A8 linear with the signature and semantics of reference.w8a8_linear_ref (and, with `w_sum`,
    of reference.w8a8_asym_linear_ref: asymmetric per-token activations, quantized in torch)."""
    k = x.shape[-1]
    if wq.shape[1] != k:
        raise ValueError(f"weight has K={wq.shape[1]} but input has {k} features")
    if w_sum is None:
        xq, xs = quantize_rows(x.reshape(-1, k))
        out = scaled_mm(xq, xs, wq, w_scale, bias, activation, linear_out_dtype(x), **kw)
    else:
        xq, xs, xz = quantize_per_token_uint8(x.reshape(-1, k))
        out = scaled_mm(xq, xs, wq, w_scale, bias, activation, linear_out_dtype(x), a_zero=xz, b_sum=w_sum, **kw)
    return out.reshape(*x.shape[:-1], wq.shape[0])
