"""The fast-math Triton kernels on a CUDA GPU against the pure-torch reference (skipped without CUDA).

What the CPU interpreter cannot check (`_interp_checks.py`): compiled code with inline PTX (tanh.approx.f32 in
the GELU epilogue), the hardware fp8 casts, wgmma and its limited-precision fp8 accumulator, real TMA
descriptors, the autotuned configurations, and production shapes (CogVideoX-2B: 17776 video tokens, width
1920, fused q/k/v N = 5760, FFN 7680, 30 heads of 64; Wan2.1-1.3B: 32760 tokens, heads of 128). Inputs and
outputs are bf16, as in the models. `workbench bench` runs this module and reports its counts on its page.

Each reference runs on the GPU in float64 / fp32 (torch ops; TF32 off) on the *same codes* the kernel
computes with: the GEMMs take the kernel's own activation codes (`quantize_rows`), which are checked against
the reference quantizer separately. Tolerances are derived in `_tolerances.py`:
* GEMMs: elementwise. The bf16 output must be the round-to-nearest of a value within e32 of the fp32
  reference: the epilogue's fp32 rounding (2 gamma(3) of |acc a b| + |bias|), for GELU the formula
  difference (8 u |x|) plus tanh.approx.f32's 2^-10.987, for W4A8 the fp32 sum over groups, for fp8 the
  wgmma accumulator (about 14 bits, modelled as 2^-13 per 32-product instruction; `wgmma_fp8_acc_err`).
* activation quantizers: codes within one step, at most 2^-8 of them different, scales within 1e-6.
* attention: in norm (see `test_quant_attention`), and within 3% of float SDPA.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import _tolerances as TOL
from _producers import kernel_and_reference

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")

DEV = "cuda"
QKV = (17776, 1920, 5760)   # CogVideoX-2B fused q/k/v at 49 frames of 480 x 720
FF1 = (4099, 1920, 7680)    # FFN up-projection (+ fused GELU); M scaled down from 17776 to bound the float64 work
FF2 = (4099, 7680, 1920)    # FFN down-projection: the longest K
SMALL = (37, 1920, 1920)    # ragged M below one tile
ROWS = (2, 4099, 1920)      # activation quantizers: 2 AdaLN batches of 4099 tokens at the model width


def _need(kind: str) -> None:
    """Skip unless the Triton path for kind ('int8' / 'fp8') can run on this GPU."""
    from workbench.kernels.backend import unavailable_reason
    reason = unavailable_reason(kind, torch.device(DEV))
    if reason:
        pytest.skip(reason)


def _hopper() -> bool:
    return torch.cuda.get_device_capability()[0] >= 9


@pytest.fixture(autouse=True)
def _exact_fp32():
    """fp32 reference math must be real fp32 (no TF32)."""
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old
    torch.cuda.empty_cache()


def _inputs(m: int, k: int, n: int, seed: int):
    """bf16 activations (unit-ish with a per-channel offset), a weight with the nn.Linear init scale, bf16 bias."""
    g = torch.Generator(device=DEV).manual_seed(seed)
    x = (torch.randn(m, k, device=DEV, generator=g) * 2 + 0.5 * torch.randn(k, device=DEV, generator=g)).bfloat16()
    w = torch.randn(n, k, device=DEV, generator=g) * k ** -0.5
    b = (torch.randn(n, device=DEV, generator=g) * 0.1).bfloat16()
    return x, w, b


def _check_gemm(out: torch.Tensor, xq, xs, wq, ws, b, act, fp8: bool, promote_every=None) -> None:
    """out (bf16) vs the fp32 reference on the codes (xq, xs, wq, ws): exact rounding bracket (`_tolerances`)."""
    from workbench.kernels import reference as R
    n = wq.shape[0]
    acc = xq.double() @ wq.double().t()
    dq = xs.double()[:, None] * ws.double()[None, :]
    prod = acc * dq
    pre = prod + b.double()[None, :]
    acc_err = 0.0
    if fp8:
        acc_err = TOL.wgmma_fp8_acc_err(xq.double().abs() @ wq.double().abs().t(), xq.shape[1], promote_every) * dq
    ref = (R.fp8_scaled_mm_ref if fp8 else R.int8_scaled_mm_ref)(xq, xs, wq, ws, b.float(), act, torch.float32)
    e32 = TOL.gemm_err(prod.abs(), b.double().abs()[None, :], acc_err, gelu_in=pre if act else None, fast_tanh=True)
    assert out.dtype == torch.bfloat16 and out.shape == ref.shape
    err, tol = TOL.compare(out.reshape(-1, n), ref, e32, interpreter=False)
    assert err <= tol, f"{err:.3g} bf16 ulps outside the rounding of the reference +- its bound"


# ------------------------------------------------------------------------------------- quantizers

@pytest.mark.parametrize("fp8", [False, True], ids=["int8", "fp8"])
@pytest.mark.parametrize("producer", ["rows", "layernorm", "rmsnorm", "gelu"])
def test_activation_quantizers(producer, fp8):
    """Fused producer + per-token quantization at the model width (K=1920, 4099 tokens, AdaLN over 2 batches):
    dequantized values within one code step of the reference, <= 2^-8 of the codes different (a flip needs the
    fp32 value within a few ulps of a rounding midpoint: ~2^-13 of int8 steps; floor / truncation would flip
    about half), scales within 1e-6 (IEEE division on both sides)."""
    _need("fp8" if fp8 else "int8")
    nb, m, k = ROWS
    x = _inputs(nb * m, k, 16, seed=1)[0].reshape(nb, m, k)
    g = torch.Generator(device=DEV).manual_seed(2)
    w, b = torch.randn(k, device=DEV, generator=g), torch.randn(k, device=DEV, generator=g)
    ms, msh = torch.randn(nb, k, device=DEV, generator=g) * 0.3, torch.randn(nb, k, device=DEV, generator=g)
    q, s, qr, sr = kernel_and_reference(producer, x, w, b, ms, msh, fp8)
    assert q.dtype == qr.dtype and q.shape == qr.shape and s.shape == sr.shape
    qf, qrf = q.double(), qr.double()
    step = 2.0 ** (torch.floor(torch.log2(qrf.abs().clamp_min(2 ** -6))) - 3) if fp8 else torch.ones_like(qrf)
    deq = (qf * s.double()[..., None] - qrf * sr.double()[..., None]).abs()
    # one step at the kernel's scale, plus |code| <= 448 times the 1e-6 scale difference
    assert bool((deq <= step * s.double()[..., None] * (1 + 1e-3)).all()), "a code differs by more than one step"
    assert float((qf != qrf).double().mean()) <= 2 ** -8
    assert float(((s.double() - sr.double()).abs() / sr.double()).max()) <= 1e-6


@pytest.mark.parametrize("fp8", [False, True], ids=["int8", "fp8"])
@pytest.mark.parametrize("model", ["cogvideox", "wan"])
def test_residual_norm_quant(model, fp8):
    """A block's residual add + LayerNorm + AdaLN + quantization at the model width: CogVideoX's two segments (226
    text + 4,099 video tokens, K=1,920, gates, affine norm) or Wan's one (K=1,536, per-batch modulation). The new
    residual within one bf16 ulp (the GPU may contract x + y * gate into an FMA), codes as in
    test_activation_quantizers."""
    _need("fp8" if fp8 else "int8")
    from workbench.kernels import act_quant as Q
    from workbench.kernels import reference as R

    g = torch.Generator(device=DEV).manual_seed(3)
    k, ns = (1920, (226, 4099)) if model == "cogvideox" else (1536, (4099,))
    r = lambda *shape: torch.randn(*shape, device=DEV, generator=g)  # noqa: E731
    xs = [(r(2, n, k) * 2).bfloat16() for n in ns]
    y = r(2, sum(ns), k).bfloat16()
    gates = [r(2, 1, k).bfloat16() for _ in ns] if model == "cogvideox" else []
    w, b = (r(k).bfloat16(), r(k).bfloat16()) if model == "cogvideox" else (None, None)
    scales, shifts = [r(2, 1, k) * 0.3 for _ in ns], [r(2, 1, k) for _ in ns]
    q, s, res = Q.residual_norm_quant(xs, y, gates, w, b, 1e-5, scales, shifts, fp8=fp8)
    qr, sr, resr = R.residual_norm_quant_ref(xs, y, gates, w, b, 1e-5, scales, shifts, fp8=fp8)
    for a, c in zip(res, resr):
        ulp = 2.0 ** (torch.floor(torch.log2(c.float().abs().clamp_min(2 ** -100))) - 7)
        assert bool(((a.float() - c.float()).abs() <= ulp).all()), "new residual off by more than one bf16 ulp"
    qf, qrf = q.double(), qr.double()
    step = 2.0 ** (torch.floor(torch.log2(qrf.abs().clamp_min(2 ** -6))) - 3) if fp8 else torch.ones_like(qrf)
    deq = (qf * s.double()[..., None] - qrf * sr.double()[..., None]).abs()
    assert bool((deq <= 2 * step * s.double()[..., None] * (1 + 1e-3)).all()), "a code differs by more than a step"
    assert float((qf != qrf).double().mean()) <= 2 ** -6
    assert float(((s.double() - sr.double()).abs() / sr.double()).max()) <= 1e-2


# ------------------------------------------------------------------------------------------ GEMMs

def _w8a8(shape, act, impl, config, seed):
    from workbench.kernels import reference as R
    from workbench.kernels.act_quant import quantize_rows
    from workbench.kernels.int8_gemm import w8a8_linear_triton
    x, w, b = _inputs(*shape, seed=seed)
    wq, ws = R.quantize_per_channel_int8(w)
    out = w8a8_linear_triton(x, wq, ws, b, act, impl=impl, config=config)
    xq, xs = quantize_rows(x)  # the codes the linear computed with (checked in test_activation_quantizers)
    _check_gemm(out, xq, xs, wq, ws, b, act, fp8=False)


def test_w8a8_cogvideox_qkv_autotuned():
    """The user's path: W8A8 at CogVideoX-2B's fused q/k/v shape, bf16 in / out, autotuned config, auto impl."""
    _need("int8")
    _w8a8(QKV, None, "auto", None, seed=3)


PTR_CFG = {"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 128, "GROUP_M": 8, "num_warps": 8, "num_stages": 4}
TMA_CFG = {"BLOCK_M": 128, "BLOCK_N": 256, "BLOCK_K": 128, "GROUP_M": 8, "num_warps": 8, "num_stages": 3,
           "EPILOGUE_SUBTILE": True}


@pytest.mark.parametrize("impl", ["tma", "ptr"])
@pytest.mark.parametrize("shape,act", [(FF1, "gelu_tanh"), (FF2, None), (SMALL, None)], ids=["ff1_gelu", "ff2", "m37"])
def test_w8a8_production_configs(impl, shape, act):
    """W8A8 with a production tile of each kernel (TMA: 128x256x128 with split epilogue store)."""
    _need("int8")
    if impl == "tma" and not _hopper():
        pytest.skip("TMA needs sm_90+")
    _w8a8(shape, act, impl, TMA_CFG if impl == "tma" else PTR_CFG, seed=4)


@pytest.mark.parametrize("shape,act", [(QKV, None), (FF1, "gelu_tanh"), (SMALL, None)], ids=["qkv", "ff1_gelu", "m37"])
def test_w8a8_asymmetric_activations(shape, act):
    """ViDiT-Q's uint8 per-token activations: the epilogue subtracts zero * rowsum(W) from the int32 accumulator.
    Bound: kernel and fp32 reference each round |acc| + |zero * rowsum| up to three times (int -> fp32, the
    product, the difference)."""
    _need("int8")
    from workbench.kernels import reference as R
    from workbench.kernels.int8_gemm import w8a8_linear_triton
    x, w, b = _inputs(*shape, seed=6)
    wq, ws = R.quantize_per_channel_int8(w)
    wsum = R.weight_row_sums(wq)
    out = w8a8_linear_triton(x, wq, ws, b, act, w_sum=wsum)
    xq, xs, xz = R.quantize_per_token_uint8(x)
    n = wq.shape[0]
    dq = xs.double()[:, None] * ws.double()[None, :]
    acc = xq.double() @ wq.double().t()
    corr = xz.double()[:, None] * wsum.double()[None, :]
    prod = (acc - corr) * dq
    pre = prod + b.double()[None, :]
    acc_err = 2 * TOL.gamma(3) * (acc.abs() + corr.abs()) * dq  # kernel and reference each round 3 times
    ref = R.int8_scaled_mm_ref(xq, xs, wq, ws, b.float(), act, torch.float32, xz, wsum)
    e32 = TOL.gemm_err(prod.abs(), b.double().abs()[None, :], acc_err, gelu_in=pre if act else None, fast_tanh=True)
    assert out.dtype == torch.bfloat16 and out.shape == ref.shape
    err, tol = TOL.compare(out.reshape(-1, n), ref, e32, interpreter=False)
    assert err <= tol, f"{err:.3g} bf16 ulps outside the rounding of the reference +- its bound"


@pytest.mark.parametrize("m", [1, 37])
def test_int8_scaled_mm_pre_quantized(m):
    """The pre-quantized path (after layernorm_quant) with the reference quantizer's codes, M below a tile."""
    _need("int8")
    from workbench.kernels import reference as R
    from workbench.kernels.int8_gemm import int8_scaled_mm
    x, w, b = _inputs(m, 1920, 5760, seed=5)
    xq, xs = R.quantize_per_token_int8(x)
    wq, ws = R.quantize_per_channel_int8(w)
    _check_gemm(int8_scaled_mm(xq, xs, wq, ws, b), xq, xs, wq, ws, b, None, fp8=False)


def _fp8(shape, act, impl, config, precise, seed):
    from workbench.kernels import reference as R
    from workbench.kernels.act_quant import quantize_rows
    from workbench.kernels.fp8_gemm import fp8_linear_triton
    x, w, b = _inputs(*shape, seed=seed)
    wf, ws = R.quantize_per_channel_fp8(w)
    out = fp8_linear_triton(x, wf, ws, b, act, impl=impl, config=config, precise_fp8=precise)
    xq, xs = quantize_rows(x, fp8=True)
    block_k = (config or {}).get("BLOCK_K", 128)  # every autotune config uses BLOCK_K = 128
    _check_gemm(out, xq, xs, wf, ws, b, act, fp8=True, promote_every=block_k if precise else None)


@pytest.mark.parametrize("precise", [False, True], ids=["fast_accum", "precise_accum"])
def test_fp8_cogvideox_qkv_autotuned(precise):
    """FP8 row-wise at the fused q/k/v shape, autotuned, with the default fast and the promoted accumulation."""
    _need("fp8")
    _fp8(QKV, None, "auto", None, precise, seed=6)


@pytest.mark.parametrize("precise", [False, True], ids=["fast_accum", "precise_accum"])
def test_fp8_library_path(precise):
    """The cuBLAS row-wise path (`impl="cublas"`, which `auto` picks per shape where it measured faster) within the
    same bound as the Triton kernel; `auto` then records one pick per shape key and an ineligible product (GELU)
    is refused by name."""
    _need("fp8")
    if not _hopper():
        pytest.skip("torch._scaled_mm row-wise needs sm_90+")
    from workbench.kernels import scaled_mm as S
    _fp8(QKV, None, "cublas", None, precise, seed=9)
    _fp8(QKV, None, "auto", None, precise, seed=9)
    assert any(key[1:3] == (QKV[2], QKV[1]) for key in S._LIBRARY)
    a = torch.zeros(64, 128, device=DEV).to(torch.float8_e4m3fn)
    one = torch.ones(64, device=DEV)
    with pytest.raises(ValueError, match="gelu_tanh"):
        S.scaled_mm(a, one, a, one, None, "gelu_tanh", impl="cublas")


@pytest.mark.parametrize("impl", ["tma", "ptr"])
@pytest.mark.parametrize("shape,act", [(FF1, "gelu_tanh"), (FF2, None)], ids=["ff1_gelu", "ff2"])
def test_fp8_production_configs(impl, shape, act):
    """FP8 with a production tile of each kernel, promoted accumulation (the tighter bound)."""
    _need("fp8")
    if impl == "tma" and not _hopper():
        pytest.skip("TMA needs sm_90+")
    _fp8(shape, act, impl, TMA_CFG if impl == "tma" else PTR_CFG, True, seed=7)


@pytest.mark.parametrize("shape,group,act", [(QKV, 128, None), (FF1, 64, "gelu_tanh"), (FF2, 256, None),
                                             (QKV, QKV[1], None), (FF1, FF1[1], "gelu_tanh"), (FF2, FF2[1], None)],
                         ids=["qkv_g128", "ff1_g64_gelu", "ff2_g256", "qkv_per_channel", "ff1_per_channel_gelu",
                              "ff2_per_channel"])
def test_w4a8(shape, group, act):
    """W4A8 at production group sizes, autotuned: exact int32 group partials, fp32 sum over K / group groups
    (gamma(groups + 1) per side, FMA or not), x_scale, bias, GELU, bf16 rounding. group = K: one scale per
    channel (unpacked to int8, the int8 GEMM: one exact partial)."""
    _need("int8")
    from workbench.kernels import reference as R
    from workbench.kernels.act_quant import quantize_rows
    from workbench.kernels.w4a8_gemm import w4a8_linear_triton
    x, w, b = _inputs(*shape, seed=8)
    wp, wg = R.quantize_weight_int4_grouped(w, group)
    out = w4a8_linear_triton(x, wp, wg, b, act)
    xq, xs = quantize_rows(x)
    ref = R.w4a8_scaled_mm_ref(xq, xs, wp, wg, b.float(), act, torch.float32)
    wc = R.unpack_int4(wp).double()
    ng = shape[1] // group
    prod_abs = torch.zeros(ref.shape, dtype=torch.float64, device=DEV)
    pre = torch.zeros_like(prod_abs)
    for i in range(ng):
        part = (xq[:, i * group:(i + 1) * group].double() @ wc[:, i * group:(i + 1) * group].t()) \
            * wg[:, i].double()[None, :]
        prod_abs += part.abs()
        pre += part
    prod_abs *= xs.double()[:, None]
    pre = pre * xs.double()[:, None] + b.double()[None, :]
    e32 = TOL.gemm_err(prod_abs, b.double().abs()[None, :], 2 * TOL.gamma(ng + 1) * prod_abs,
                       gelu_in=pre if act else None, fast_tanh=True)
    assert out.dtype == torch.bfloat16
    err, tol = TOL.compare(out, ref, e32, interpreter=False)
    assert err <= tol, f"{err:.3g} bf16 ulps outside the rounding of the reference +- its bound"


# -------------------------------------------------------------------------------------- attention

@pytest.mark.parametrize("pv", ["fp8", "fp16"])
@pytest.mark.parametrize("impl", ["auto", "ptr", "fa3"])
@pytest.mark.parametrize("n,d", [(17776, 64), (32760, 128)], ids=["cogvideox_d64", "wan_d128"])
def test_quant_attention(n, d, impl, pv):
    """Quantized attention at the production token counts and head dims (2 heads each), bf16 in / out, strided
    [B, N, H, D] views, default blocks (`reference.default_blocks`: 64 x 128; ragged
    last key block); "fa3" is the Gluon sm_90 kernel (64-query blocks, fp8 P.V only).

    Inputs are on a 1/8 grid (`_tolerances.dyadic_qkv`), so channel sums are exact and the codes of K and V
    agree with the reference up to the last bit of the mean (CUDA's mean multiplies by 1/N). In Frobenius norm:
    ||out - ref|| <= ||2^-8 |ref| + e32|| + 2^-10 ||A||, where 2^-8 |ref| is bf16 round-to-nearest, e32 the fp32
    bound of `attention_err` with the fp8 wgmma accumulator promoted every key block ((block_n / 32) 2^-13 of
    the P.V sums; fp16 P.V accumulates in fp32), A = max_j |v_j - mean v| per channel, and 2^-10 ||A|| the
    allowance for rare code flips: where ex2.approx.f32 and torch's exp2 straddle an e4m3 midpoint, a P code
    flips and moves its term by <= 2^-3 of itself, so a share f of flipped P codes moves O by about 2^-3 f A
    (2^-10 covers f = 2^-7; a flip needs a 2-ulp difference at a midpoint, f ~ 2^-19); an int8 Q / K code
    flipping (the last bit of the mean, a fused rounding) moves one logit by one code step. On an H100 the
    whole difference was 5.3e-4 of ||ref|| at N=1999 (docs/kernel-checks-h100.md, bf16 vs bf16), while the
    bound allows about 6e-3 here. Also within 3% of float SDPA (the quantization budget).
    """
    _need("fp8" if pv == "fp8" else "int8")
    from workbench.kernels import reference as R
    from workbench.kernels.attention import quant_attention_triton
    if impl == "fa3" and (pv != "fp8" or torch.cuda.get_device_capability()[0] != 9):
        pytest.skip("the Gluon kernel is sm_90 only, fp8 P.V")
    q, k, v = TOL.dyadic_qkv(1, 2, n, n, d, seed=9, dtype=torch.bfloat16, layout="bnhd", device=DEV)
    bm, bn = R.default_blocks(d)
    if impl == "fa3":
        bm = 64
    out = quant_attention_triton(q, k, v, pv_dtype=pv, impl=impl, block_m=bm)
    assert out.dtype == torch.bfloat16 and out.shape == q.shape
    ref = R.quant_attention_ref(q.float(), k.float(), v.float(), block_m=bm, block_n=bn, pv_dtype=pv)
    acc_rel = (bn // 32) * 2.0 ** -13 if pv == "fp8" else 0.0
    e32 = TOL.attention_err(ref, v, bn, pv_fp8=pv == "fp8", acc_rel=acc_rel)
    vf = v.double()
    a = (vf - vf.mean(2, keepdim=True)).abs().amax(2, keepdim=True).expand_as(ref)
    diff = float((out.double() - ref.double()).norm())
    allowed = float((2.0 ** -8 * ref.double().abs() + e32).norm()) + 2.0 ** -10 * float(a.norm())
    assert diff <= allowed, f"||out - ref|| = {diff:.4g} > {allowed:.4g}"
    sd = F.scaled_dot_product_attention(q.float(), k.float(), v.float())
    assert R.rel_error(out, sd) < 0.03
