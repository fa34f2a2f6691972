"""Triton-kernel-vs-reference checks run in a subprocess with TRITON_INTERPRET=1 (CPU interpreter).

Run as ``TRITON_INTERPRET=1 python tests/kernels/_interp_checks.py [name ...]``; prints one JSON line
{name: {"err": float, "tol": float, "error": str | None}} as the last line of stdout.
"""

from __future__ import annotations

import json
import os
import sys
import traceback
from typing import Callable, Dict, Tuple

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)

import torch  # noqa: E402

from workbench.kernels import reference as R  # noqa: E402

CHECKS: Dict[str, Callable[[], Tuple[float, float]]] = {}


def check(fn: Callable[[], Tuple[float, float]]) -> Callable[[], Tuple[float, float]]:
    """Register a check returning (error, tolerance)."""
    CHECKS[fn.__name__] = fn
    return fn


def _g(seed: int) -> torch.Generator:
    """Seeded generator."""
    return torch.Generator().manual_seed(seed)


def _max_rel(out: torch.Tensor, ref: torch.Tensor, floor: float = 1e-3) -> float:
    """Max elementwise |out-ref| / (|ref| + floor)."""
    return float(((out.double() - ref.double()).abs() / (ref.double().abs() + floor)).max())


GEMM_CFG = {"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 32, "num_warps": 4, "num_stages": 2}


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
    """scaled_mm vs reference in fp32 output (ragged M and K, N not a multiple of BLOCK_N)."""
    from workbench.kernels.scaled_mm import scaled_mm
    xq, xs, wq, ws, b = _gemm_operands(m, k, n, fp8, seed=1)
    cfg = dict(GEMM_CFG, EPILOGUE_SUBTILE=subtile)
    out = scaled_mm(xq, xs, wq, ws, b, act, torch.float32, impl=impl, config=cfg)
    refn = R.fp8_scaled_mm_ref if fp8 else R.int8_scaled_mm_ref
    ref = refn(xq, xs, wq, ws, b, act, torch.float32)
    tol = 1e-3 if act else (1e-5 if fp8 else 1e-6)
    return _max_rel(out, ref), tol


for _impl in ("ptr", "tma"):
    for _fp8 in (False, True):
        for _act in (None, "gelu_tanh"):
            def _mk(impl=_impl, fp8=_fp8, act=_act):
                def fn():
                    return _scaled_mm_check(fp8, impl, act, subtile=(impl == "tma" and act is None))
                fn.__name__ = f"scaled_mm_{'fp8' if fp8 else 'int8'}_{impl}_{act or 'none'}"
                return fn
            check(_mk())


@check
def w8a8_linear_3d_bf16():
    """Full W8A8 path (fused quant + GEMM) on a 3-D bf16 input; bf16 output within 1 ulp."""
    from workbench.kernels.int8_gemm import w8a8_linear_triton
    g = _g(2)
    x = (torch.randn(2, 9, 64, generator=g) * 3).bfloat16()
    w = torch.randn(32, 64, generator=g)
    wq, ws = R.quantize_per_channel_int8(w)
    b = torch.randn(32, generator=g).bfloat16()
    out = w8a8_linear_triton(x, wq, ws, b, config=GEMM_CFG, impl="ptr")
    ref = R.w8a8_linear_ref(x, wq, ws, b)
    assert out.shape == ref.shape and out.dtype == torch.bfloat16
    return _max_rel(out, ref, floor=1e-2), 2 ** -7  # interpreter casts fp32->bf16 by truncation


@check
def fp8_linear_fp32():
    """Full FP8 path (fused fp8 quant + GEMM) with fp32 input/output."""
    from workbench.kernels.fp8_gemm import fp8_linear_triton
    g = _g(3)
    x = torch.randn(21, 96, generator=g)
    w = torch.randn(48, 96, generator=g)
    wf, ws = R.quantize_per_channel_fp8(w)
    out = fp8_linear_triton(x, wf, ws, None, "gelu_tanh", config=GEMM_CFG, impl="tma")
    ref = R.fp8_rowwise_linear_ref(x, wf, ws, None, "gelu_tanh")
    return _max_rel(out, ref), 1e-3


def _w4a8_check(group: int, act) -> Tuple[float, float]:
    """W4A8 kernel vs reference (fp32 output)."""
    from workbench.kernels.w4a8_gemm import w4a8_linear_triton
    g = _g(4 + group)
    x = torch.randn(3, 13, 4 * group, generator=g)
    w = torch.randn(48, 4 * group, generator=g)
    wp, wsg = R.quantize_weight_int4_grouped(w, group)
    b = torch.randn(48, generator=g)
    out = w4a8_linear_triton(x, wp, wsg, b, act, config={"BLOCK_N": 16, "BLOCK_M": 32})
    ref = R.w4a8_linear_ref(x, wp, wsg, b, act)
    return _max_rel(out, ref), (1e-3 if act else 1e-5)


for _grp, _act in ((32, None), (64, "gelu_tanh")):
    def _mk4(grp=_grp, act=_act):
        def fn():
            return _w4a8_check(grp, act)
        fn.__name__ = f"w4a8_g{grp}_{act or 'none'}"
        return fn
    check(_mk4())


def _quant_check(name: str, fp8: bool) -> Tuple[float, float]:
    """Fused producer+quant kernel vs reference: codes exact (tolerance 1 code), scales to 1e-6."""
    from workbench.kernels import act_quant as Q
    g = _g(5)
    x = torch.randn(2, 11, 200, generator=g).bfloat16() * 3 + 1
    w, b = torch.randn(200, generator=g), torch.randn(200, generator=g)
    ms, msh = torch.randn(2, 200, generator=g) * 0.3, torch.randn(2, 200, generator=g)
    if name == "rows":
        q, s = Q.quantize_rows(x, fp8=fp8)
        qr, sr = (R.quantize_per_token_fp8 if fp8 else R.quantize_per_token_int8)(x)
    elif name == "layernorm":
        q, s = Q.layernorm_quant(x, w, b, 1e-5, ms, msh, fp8=fp8)
        qr, sr = R.layernorm_quant_ref(x, w, b, 1e-5, ms, msh, fp8=fp8)
    elif name == "rmsnorm":
        q, s = Q.rmsnorm_quant(x, w, 1e-6, fp8=fp8)
        qr, sr = R.rmsnorm_quant_ref(x, w, 1e-6, fp8=fp8)
    else:
        q, s = Q.gelu_quant(x, fp8=fp8)
        qr, sr = R.gelu_quant_ref(x, fp8=fp8)
    assert q.dtype == qr.dtype and q.shape == qr.shape and s.shape == sr.shape
    # normalized metric <= 1: dequantized values within one (largest) code step where float
    # summation order differs, and scales within 1e-6 relative
    step = s[..., None] * (32.0 if fp8 else 1.0)
    code_err = float(((q.float() * s[..., None] - qr.float() * sr[..., None]).abs() / (step * 1.01)).max())
    return max(code_err, _max_rel(s, sr, floor=0.0) / 1e-6), 1.0


for _name in ("rows", "layernorm", "rmsnorm", "gelu"):
    for _fp8 in (False, True):
        def _mkq(name=_name, fp8=_fp8):
            def fn():
                return _quant_check(name, fp8)
            fn.__name__ = f"quant_{name}_{'fp8' if fp8 else 'int8'}"
            return fn
        check(_mkq())


def _attn_check(impl: str, pv: str, d: int, layout: str) -> Tuple[float, float]:
    """Quant attention kernel vs reference (fp32 in/out, ragged NQ/NK, several heads)."""
    from workbench.kernels.attention import quant_attention_triton
    g = _g(6 + d)
    b, h, nq, nk = 2, 2, 37, 45
    q = torch.randn(b, h, nq, d, generator=g) * 1.5 + 0.5 * torch.randn(d, generator=g)
    k = torch.randn(b, h, nk, d, generator=g) * 1.5 + 3.0 * torch.randn(d, generator=g)
    v = torch.randn(b, h, nk, d, generator=g) + 2.0 * torch.randn(d, generator=g)
    if layout == "bnhd":  # strided views like q.view(B, N, H, D).transpose(1, 2)
        q, k, v = (t.transpose(1, 2).contiguous().transpose(1, 2) for t in (q, k, v))
    out = quant_attention_triton(q, k, v, block_m=16, block_n=16, pv_dtype=pv, impl=impl)
    ref = R.quant_attention_ref(q, k, v, block_m=16, block_n=16, pv_dtype=pv)
    err = R.rel_error(out, ref)
    assert R.rel_error(out, R.sdpa_ref(q, k, v)) < 0.03
    return err, 2e-3


for _impl, _pv, _d, _layout in (("ptr", "fp8", 32, "bhnd"), ("tma", "fp8", 16, "bnhd"),
                                ("ptr", "fp16", 16, "bnhd"), ("tma", "fp16", 32, "bhnd")):
    def _mka(impl=_impl, pv=_pv, d=_d, layout=_layout):
        def fn():
            return _attn_check(impl, pv, d, layout)
        fn.__name__ = f"attn_{impl}_{pv}_d{d}_{layout}"
        return fn
    check(_mka())


@check
def attn_bf16_output_dtype():
    """bf16 inputs give bf16 output of the right shape within bf16 rounding of the reference."""
    from workbench.kernels.attention import quant_attention_triton
    g = _g(7)
    q, k, v = (torch.randn(1, 1, 20, 16, generator=g).bfloat16() for _ in range(3))
    out = quant_attention_triton(q, k, v, block_m=16, block_n=16)
    ref = R.quant_attention_ref(q, k, v, block_m=16, block_n=16)
    assert out.dtype == torch.bfloat16 and out.shape == q.shape
    return R.rel_error(out, ref), 2 ** -7


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
