"""FP8 (e4m3) row-wise linear: fused per-token fp8 quantization + fp8 GEMM with dequant/bias/GELU epilogue."""

from __future__ import annotations

from typing import Any, Optional

import torch

from .act_quant import quantize_rows
from .reference import linear_out_dtype
from .scaled_mm import scaled_mm


def fp8_scaled_mm(xq: torch.Tensor, x_scale: torch.Tensor, wq: torch.Tensor, w_scale: torch.Tensor,
                  bias: Optional[torch.Tensor] = None, activation: Optional[str] = None,
                  out_dtype: torch.dtype = torch.bfloat16, **kw: Any) -> torch.Tensor:
    """E4m3 GEMM on pre-quantized activations (e.g. layernorm_quant(..., fp8=True)); see fp8_scaled_mm_ref."""
    if xq.dtype != torch.float8_e4m3fn or wq.dtype != torch.float8_e4m3fn:
        raise ValueError(f"fp8_scaled_mm needs float8_e4m3fn operands, got {xq.dtype} / {wq.dtype}")
    return scaled_mm(xq, x_scale, wq, w_scale, bias, activation, out_dtype, **kw)


def fp8_linear_triton(x: torch.Tensor, w_fp8: torch.Tensor, w_scale: torch.Tensor,
                      bias: Optional[torch.Tensor] = None, activation: Optional[str] = None,
                      **kw: Any) -> torch.Tensor:
    """Triton FP8 row-wise linear with the signature and semantics of reference.fp8_rowwise_linear_ref."""
    k = x.shape[-1]
    if w_fp8.shape[1] != k:
        raise ValueError(f"weight has K={w_fp8.shape[1]} but input has {k} features")
    xq, xs = quantize_rows(x.reshape(-1, k), fp8=True)
    out = scaled_mm(xq, xs, w_fp8, w_scale, bias, activation, linear_out_dtype(x), **kw)
    return out.reshape(*x.shape[:-1], w_fp8.shape[0])
