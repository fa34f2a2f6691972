"""The kernels as `torch.library` custom ops, so `torch.compile` traces a quantized model without graph breaks.

Inductor treats each op as one opaque kernel and fuses the work around it. In particular the per-token
activation quantization, written in plain torch (`reference.quantize_per_token_*`), fuses into the
LayerNorm / AdaLN modulation / concat that produces the activations: the "quantization fused upstream"
case of the microbenchmarks, without a hand-written kernel per producer. Each op runs the Triton kernel
as its `backend` argument says (`workbench.kernels.backend`).
"""
from __future__ import annotations

from collections import Counter
from typing import Optional

import torch
from torch.library import custom_op

from . import reference as ref
from .backend import use_triton

# How often each op really ran (eagerly or inside a compiled graph); the benchmark reads it to prove routing.
CALLS: Counter = Counter()


@custom_op("workbench::scaled_mm", mutates_args=())
def scaled_mm(xq: torch.Tensor, x_scale: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor,
              bias: Optional[torch.Tensor], activation: Optional[str], out_dtype: torch.dtype,
              backend: str = "auto", x_zero: Optional[torch.Tensor] = None,
              w_sum: Optional[torch.Tensor] = None) -> torch.Tensor:
    """(xq @ w.T - x_zero w_sum^T) * x_scale[:, None] * w_scale[None, :] + bias (+GELU) for int8 or e4m3
    operands (the zero-point term only for asymmetric int8 activations)."""
    CALLS["scaled_mm"] += 1
    kind = "int8" if xq.dtype == torch.int8 else "fp8"
    if use_triton("ops.scaled_mm", kind, xq.device, backend):
        from .scaled_mm import scaled_mm as triton_scaled_mm
        return triton_scaled_mm(xq, x_scale, w, w_scale, bias, activation, out_dtype, a_zero=x_zero, b_sum=w_sum)
    if kind == "int8":
        return ref.int8_scaled_mm_ref(xq, x_scale, w, w_scale, bias, activation, out_dtype, x_zero, w_sum)
    return ref.fp8_scaled_mm_ref(xq, x_scale, w, w_scale, bias, activation, out_dtype)


@scaled_mm.register_fake
def _scaled_mm_fake(xq, x_scale, w, w_scale, bias, activation, out_dtype, backend="auto", x_zero=None,  # noqa: ANN001, ANN202
                    w_sum=None):  # noqa: ANN001, ANN202
    torch._check(xq.shape[1] == w.shape[1], lambda: f"scaled_mm: K mismatch {xq.shape[1]} vs {w.shape[1]}")
    return xq.new_empty((xq.shape[0], w.shape[0]), dtype=out_dtype)


@custom_op("workbench::w4a8_scaled_mm", mutates_args=())
def w4a8_scaled_mm(xq: torch.Tensor, x_scale: torch.Tensor, w_packed: torch.Tensor, w_scales: torch.Tensor,
                   bias: Optional[torch.Tensor], activation: Optional[str], out_dtype: torch.dtype,
                   backend: str = "auto") -> torch.Tensor:
    """int8 tokens x group-wise int4 weights (two per byte), dequant + bias (+GELU) in the epilogue."""
    CALLS["w4a8_scaled_mm"] += 1
    if use_triton("ops.w4a8_scaled_mm", "int8", xq.device, backend):
        from .w4a8_gemm import w4a8_scaled_mm as triton_w4a8
        return triton_w4a8(xq, x_scale, w_packed, w_scales, bias, activation, out_dtype)
    return ref.w4a8_scaled_mm_ref(xq, x_scale, w_packed, w_scales, bias, activation, out_dtype)


@w4a8_scaled_mm.register_fake
def _w4a8_fake(xq, x_scale, w_packed, w_scales, bias, activation, out_dtype, backend="auto"):  # noqa: ANN001, ANN202
    torch._check(xq.shape[1] == 2 * w_packed.shape[1], lambda: "w4a8_scaled_mm: K mismatch")
    return xq.new_empty((xq.shape[0], w_packed.shape[0]), dtype=out_dtype)


@custom_op("workbench::quant_attention", mutates_args=())
def quant_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, sm_scale: Optional[float],
                    pv_dtype: str, backend: str = "auto") -> torch.Tensor:
    """SageAttention-style attention for [B, H, N, D] (int8 Q.K^T with K smoothing, fp8 or fp16 P.V)."""
    CALLS["quant_attention"] += 1
    from .dispatch import quant_attention as run
    out = run(q, k, v, sm_scale=sm_scale, pv_dtype=pv_dtype, backend=backend)
    like = torch.empty_like(q)  # the layout the fake promises: q's, so the caller's transpose back is a view
    if out.stride() != like.stride():
        like.copy_(out)
        out = like
    return out


@quant_attention.register_fake
def _quant_attention_fake(q, k, v, sm_scale, pv_dtype, backend="auto"):  # noqa: ANN001, ANN202
    return torch.empty_like(q)


@custom_op("workbench::quantize_rows", mutates_args=())
def quantize_rows(x: torch.Tensor, fp8: bool, backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row int8 / e4m3 codes and fp32 scales of a 2-d x in one pass (the Triton row kernel), opaque to Inductor.
    For inputs that an opaque kernel produced (a GEMM with GELU in its epilogue): there is no producer to fuse
    into, and Inductor's looped reduction over a long row reads it twice."""
    CALLS["quantize_rows"] += 1
    if use_triton("ops.quantize_rows", "fp8" if fp8 else "int8", x.device, backend):
        from .act_quant import quantize_rows as triton_quantize_rows
        return triton_quantize_rows(x, fp8)
    return ref.quantize_per_token_fp8(x) if fp8 else ref.quantize_per_token_int8(x)


@quantize_rows.register_fake
def _quantize_rows_fake(x, fp8, backend="auto"):  # noqa: ANN001, ANN202
    return (x.new_empty(x.shape, dtype=ref.FP8_DTYPE if fp8 else torch.int8),
            x.new_empty(x.shape[:-1], dtype=torch.float32))


@custom_op("workbench::residual_norm_quant", mutates_args=())
def residual_norm_quant(xs: list[torch.Tensor], y: Optional[torch.Tensor], gates: list[torch.Tensor],
                        weight: Optional[torch.Tensor], bias: Optional[torch.Tensor], eps: float,
                        scales: list[torch.Tensor], shifts: list[torch.Tensor], norm: bool, fp8: bool,
                        backend: str = "auto") -> list[torch.Tensor]:
    """A DiT block's residual add + LayerNorm + AdaLN modulation + per-token quantization in one pass
    (`reference.residual_norm_quant_ref`); returns [codes, scales, *new residual segments]. A hand-written
    producer: Inductor's own version is a looped reduction for rows over 1,024 elements (NOTES.md)."""
    CALLS["residual_norm_quant"] += 1
    if use_triton("ops.residual_norm_quant", "fp8" if fp8 else "int8", xs[0].device, backend):
        from .act_quant import residual_norm_quant as run
    else:
        run = ref.residual_norm_quant_ref
    q, s, residuals = run(xs, y, gates, weight, bias, eps, scales, shifts, norm=norm, fp8=fp8)
    return [q, s, *residuals]


@residual_norm_quant.register_fake
def _residual_norm_quant_fake(xs, y, gates, weight, bias, eps, scales, shifts, norm, fp8,  # noqa: ANN001, ANN202
                              backend="auto"):  # noqa: ANN001
    bsz, k = xs[0].shape[0], xs[0].shape[-1]
    ntot = sum(x.shape[1] for x in xs)
    q = xs[0].new_empty((bsz, ntot, k), dtype=ref.FP8_DTYPE if fp8 else torch.int8)
    s = xs[0].new_empty((bsz, ntot), dtype=torch.float32)
    return [q, s, *([x.new_empty(x.shape) for x in xs] if y is not None else [])]


def quantize_tokens(x: torch.Tensor, fp8: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token quantization in plain torch (the reference math) so that Inductor fuses it into the producer."""
    x2 = x.reshape(-1, x.shape[-1])
    return ref.quantize_per_token_fp8(x2) if fp8 else ref.quantize_per_token_int8(x2)


def quantize_tokens_asym(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric per-token 8-bit quantization in plain torch (codes - 128, scale, zero - 128)."""
    return ref.quantize_per_token_uint8(x.reshape(-1, x.shape[-1]))
