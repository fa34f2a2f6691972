"""Dispatch: the backend switch (availability reasons, single fallback warning, TRITON refused where it cannot
run, REFERENCE silent), reference fallback results, nn.Modules.

The CPU fallbacks are checked against computations written out here, not against the reference functions they
call: inputs are built on the quantization grids (a row / channel / group holds codes times a power of two,
with one code at the format's maximum), so every correct quantizer recovers exactly those codes and scales,
and the expected output is a float64 matmul of the known codes. A wrong reference (rounding, a dropped scale,
another absmax) then differs from it by far more than the fp32 / bf16 rounding bounds of `_tolerances`.
"""

import math
import warnings

import pytest
import torch
import torch.nn as nn

import _tolerances as TOL
from workbench.kernels import backend as B
from workbench.kernels import dispatch as D
from workbench.kernels import reference as R
from workbench.kernels.backend import Backend

E4M3 = torch.float8_e4m3fn


def _int_grid(rows: int, k: int, qmax: int, g: torch.Generator, group: int | None = None, exps=(3, 8)):
    """(codes [rows, k] float64, scales 2^-e [rows, k // group], e in range(*exps)) with every group's absmax
    code = qmax."""
    group = group or k
    codes = torch.randint(-qmax, qmax + 1, (rows, k), generator=g).double()
    codes[:, ::group] = qmax * torch.where(torch.rand(rows, k // group, generator=g) < 0.5, -1.0, 1.0)
    scales = torch.exp2(-torch.randint(*exps, (rows, k // group), generator=g).double())
    return codes, scales


def _e4m3_grid(rows: int, k: int, g: torch.Generator):
    """(e4m3 code values [rows, k] float64, power-of-two scales [rows, 1]) with |code| reaching 448 in each row."""
    codes = (torch.randn(rows, k, generator=g) * 120).clamp(-448, 448).to(E4M3).double()
    codes[:, 0] = 448.0
    return codes, torch.exp2(-torch.randint(3, 8, (rows, 1), generator=g).double())


def _dequant(codes: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """codes * scale, each scale repeated over its group of columns."""
    return codes * scales.repeat_interleave(codes.shape[1] // scales.shape[1], dim=1)


def _gelu64(x: torch.Tensor) -> torch.Tensor:
    """GELU, tanh approximation, written out in float64."""
    return 0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x ** 3)))


def _expected_linear(x_codes, x_scale, w_codes, w_scale, bias=None, gelu=False):
    """(expected float64 output, its fp32 bound e32) of a quantized linear on known codes and scales."""
    prod = _dequant(x_codes, x_scale) @ _dequant(w_codes, w_scale).t()  # exact: small integers times 2^-e
    b = torch.zeros(prod.shape[1], dtype=torch.float64) if bias is None else bias.double()
    pre = prod + b
    exp = _gelu64(pre) if gelu else pre
    return exp, TOL.gemm_err(prod.abs(), b.abs(), gelu_in=pre if gelu else None)


@pytest.fixture(autouse=True)
def _fresh_warnings(monkeypatch):
    """Reset the warn-once registry for every test."""
    monkeypatch.setattr(B, "_WARNED", set())


def _fake_gpu(monkeypatch, cc):
    """Pretend a CUDA device of compute capability cc exists."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: cc)


def test_reasons(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert not D.available()
    assert "no CUDA" in D.unavailable_reason("int8")
    _fake_gpu(monkeypatch, (7, 5))
    assert "GPU too old" in D.unavailable_reason("int8") and "8.0" in D.unavailable_reason("int8")
    _fake_gpu(monkeypatch, (8, 6))
    assert D.unavailable_reason("int8") is None or "triton" in D.unavailable_reason("int8")
    assert "8.9" in D.unavailable_reason("fp8")
    _fake_gpu(monkeypatch, (9, 0))
    monkeypatch.setattr(B, "_triton_error", lambda: "ModuleNotFoundError: No module named 'triton'")
    assert "triton missing" in D.unavailable_reason("fp8")
    assert not D.available("fp8")
    assert "not CUDA" in D.unavailable_reason("int8", torch.device("cpu"))


def test_backend_switch(monkeypatch):
    """TRITON where it cannot run is an error naming why; REFERENCE never asks and never warns; a wrong name
    lists the choices; a module's backend is honoured by its forward."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    g = torch.Generator().manual_seed(4)
    xc, xs = _int_grid(3, 64, 127, g)
    wc, wsc = _int_grid(32, 64, 127, g)
    x = _dequant(xc, xs).float()
    wq, ws = R.quantize_per_channel_int8(_dequant(wc, wsc).float())
    assert torch.equal(wq.double(), wc) and torch.equal(ws.double(), wsc[:, 0])  # the grid's codes and scales
    with pytest.raises(RuntimeError, match="backend 'triton' was asked for, but no CUDA device available"):
        D.w8a8_linear(x, wq, ws, backend="triton")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = D.w8a8_linear(x, wq, ws, backend=Backend.REFERENCE)
    exp, e32 = _expected_linear(xc, xs, wc, wsc)
    assert TOL.ratio(out, exp, e32) <= 1
    with pytest.raises(ValueError, match=r"unknown kernel backend 'gpu'.*'auto', 'triton', 'reference'"):
        Backend.parse("gpu")
    mod = D.W8A8Linear.from_linear(nn.Linear(64, 32), backend="triton")
    with pytest.raises(RuntimeError, match="W8A8Linear.*backend 'triton'|w8a8_linear.*backend 'triton'"):
        mod(x)
    assert D.set_backend(nn.Sequential(mod, nn.ReLU()), "reference") == 1 and mod.backend is Backend.REFERENCE
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        mod(x)


def test_fallback_warns_once_and_matches_the_written_out_math():
    """bf16 in, bf16 out: the output is the round-to-nearest bf16 of a value within the fp32 epilogue bound
    of the float64 product of the known codes (`_tolerances.compare`: exact rounding model)."""
    g = torch.Generator().manual_seed(0)
    xc, xs = _int_grid(5, 64, 127, g)
    wc, wsc = _int_grid(32, 64, 127, g)
    x = _dequant(xc, xs).bfloat16()  # 7-bit codes times 2^-e: exact in bf16
    wq, ws = wc.to(torch.int8), wsc[:, 0].float()
    bias = torch.randn(32, generator=g).bfloat16()
    with pytest.warns(RuntimeWarning, match=r"w8a8_linear: using the slow pure-torch reference path because"):
        out = D.w8a8_linear(x, wq, ws, bias)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out2 = D.w8a8_linear(x, wq, ws, bias)  # second call: no warning
    assert out.dtype == torch.bfloat16 and torch.equal(out, out2)
    exp, e32 = _expected_linear(xc, xs, wc, wsc, bias)
    assert TOL.compare(out, exp, e32, interpreter=False) == (0.0, 0.0)


def test_fp8_and_w4a8_fallbacks_match_the_written_out_math():
    """FP8 (e4m3 codes x power-of-two scales, GELU written out) and W4A8 (int4 groups of 64, each with its own
    power-of-two scale) against float64 matmuls of the known codes; the quantizers must recover them exactly."""
    g = torch.Generator().manual_seed(1)
    xc, xs = _e4m3_grid(14, 128, g)
    wc, wsc = _e4m3_grid(48, 128, g)
    x = _dequant(xc, xs).float().reshape(2, 7, 128)
    b = torch.randn(48, generator=g)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        wf, wfs = R.quantize_per_channel_fp8(_dequant(wc, wsc).float())
        assert torch.equal(wf.double(), wc) and torch.equal(wfs.double(), wsc[:, 0])
        out = D.fp8_linear(x, wf, wfs, b, "gelu_tanh")
        assert out.shape == (2, 7, 48) and out.dtype == torch.float32
        exp, e32 = _expected_linear(xc, xs, wc, wsc, b, gelu=True)
        assert TOL.ratio(out.reshape(14, 48), exp, e32) <= 1

        ic, isc = _int_grid(14, 128, 127, g)
        w4c, w4s = _int_grid(48, 128, 7, g, group=64)
        xi = _dequant(ic, isc).float().reshape(2, 7, 128)
        wp, wg = R.quantize_weight_int4_grouped(_dequant(w4c, w4s).float(), 64)
        assert torch.equal(R.unpack_int4(wp).double(), w4c) and torch.equal(wg.double(), w4s)
        out4 = D.w4a8_linear(xi, wp, wg, b)
        exp4, e4 = _expected_linear(ic, isc, w4c, w4s, b)
        # plus the fp32 sum over the 2 groups on the reference's side: gamma(3) of the summed magnitudes
        e4 = e4 + TOL.gamma(3) * (_dequant(ic, isc).abs() @ _dequant(w4c, w4s).abs().t())
        assert TOL.ratio(out4.reshape(14, 48), exp4, e4) <= 1


def test_layernorm_quant_fallback_matches_float64_layernorm():
    """Per-token e4m3 codes of an AdaLN-modulated LayerNorm written out in float64: codes may differ only where
    the fp32 value sits within a few ulps of an e4m3 rounding midpoint (<= 2^-8 of them, one step each)."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 7, 128, generator=g) * 2 + 1
    w, b = torch.randn(128, generator=g), torch.randn(128, generator=g)
    ms, msh = torch.randn(2, 128, generator=g) * 0.3, torch.randn(2, 128, generator=g)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        qa = D.layernorm_quant(x, w, b, 1e-5, ms, msh, fp8=True)
    assert qa.lead_shape == (2, 7) and qa.q.shape == (14, 128) and qa.q.dtype == E4M3
    xd = x.double()
    y = (xd - xd.mean(-1, keepdim=True)) / torch.sqrt(xd.var(-1, unbiased=False, keepdim=True) + 1e-5)
    y = (y * w.double() + b.double()) * (1 + ms.double()[:, None]) + msh.double()[:, None]
    y = y.reshape(14, 128)
    amax = y.abs().amax(-1)
    assert torch.allclose(qa.scale.double(), amax / 448, rtol=1e-6, atol=0)
    codes = (y * (448 / amax)[:, None]).float().to(E4M3).double()
    got = qa.q.double()
    step = 2.0 ** (torch.floor(torch.log2(codes.abs().clamp_min(2 ** -6))) - 3)  # one e4m3 step at |code|
    assert ((got - codes).abs() <= step).all()
    assert (got != codes).double().mean() <= 2 ** -8


def test_quant_attention_fallback_matches_the_written_out_quantized_softmax():
    """Q, K, V built on the quantization grids, so the reference's codes are known: per head, Q and K are int8
    codes times a power of two with one code at 127 (64 tokens: one 128-token block each); K's codes come in
    +- pairs (channel mean exactly 0) plus an integer offset per channel that the smoothing removes exactly;
    V holds e4m3 codes >= 1 in magnitude times a power of two per channel with one at 448, in +- pairs, plus 2
    (channel mean exactly 2; all sums exact in fp32).

    Written out in float64 (one key block, so the running max is the row max): base-2 logits
    t = q.k / sqrt(d) / ln 2, P = e4m3(2^(t - max t + 8)), O = sum_j P_j (v_j - 2) / sum_j 2^(t_j - max t + 8) + 2.
    The reference computes t in fp32 from the codes (<= 4 u |t| per logit, so each p within
    delta = (7 T + 14) u of ours, T = max |t|) and sums in fp32 (gamma(N) + 4 u), giving
    |dO| <= (2 delta + gamma(N) + 4 u) (1 + 2^-4) A + 3 u |O|, A = max_j |v_j - 2| per channel. Not covered: a P
    code flipping because the two p straddle an e4m3 midpoint (chance ~ delta / 2^-4 per score; none here)."""
    g = torch.Generator().manual_seed(2)
    h, n, d = 2, 64, 64
    qc, qs = _int_grid(h, n * d, 127, g, exps=(6, 7))     # logits with a spread of about 1.3 (not one-hot)
    q = (qc * qs).reshape(1, h, n, d)
    kc, ks = _int_grid(h, n // 2 * d, 127, g, exps=(6, 7))
    half = (kc * ks).reshape(1, h, n // 2, d)
    k = torch.cat([half, -half], dim=2) + torch.randint(-6, 7, (d,), generator=g).double()
    vc, vs = _e4m3_grid(h * d, n // 2, g)
    vc = torch.where(vc.abs() < 1, torch.zeros_like(vc), vc)
    vdev = (vc * vs).reshape(1, h, d, n // 2).transpose(-1, -2)
    v = torch.cat([vdev, -vdev], dim=2) + 2.0
    q, k, v = q.float(), k.float(), v.float()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = D.quant_attention(q, k, v)
    assert out.shape == q.shape and out.dtype == torch.float32
    t = (q.double() @ k.double().transpose(-1, -2)) / math.sqrt(d) / math.log(2)
    p = torch.exp2(t - t.amax(-1, keepdim=True) + 8)
    pq = p.float().to(E4M3).double()
    exp = pq @ (v.double() - 2.0) / p.sum(-1, keepdim=True) + 2.0
    a = (v.double() - 2.0).abs().amax(2, keepdim=True)
    delta = (7 * float(t.abs().max()) + 14) * TOL.U
    bound = (2 * delta + TOL.gamma(n) + 4 * TOL.U) * (1 + 2 ** -4) * a + 3 * TOL.U * exp.abs()
    assert TOL.ratio(out, exp, bound) <= 1


@pytest.mark.parametrize("cls,kw,tol", [(D.W8A8Linear, {}, 0.02), (D.FP8Linear, {}, 0.06),
                                        (D.W4A8Linear, {"group_size": 64}, 0.2)])
def test_modules_drop_in(cls, kw, tol):
    torch.manual_seed(2)
    lin = nn.Linear(128, 64)
    x = torch.randn(3, 10, 128)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        mod = cls.from_linear(lin, **kw)
        y = mod(x)
        assert y.shape == (3, 10, 64)
        assert R.rel_error(y, lin(x).detach()) < tol
        # codes and scales are buffers, the bias a frozen parameter; state_dict round trip, dtype-preserving .to()
        assert [n for n, _ in mod.named_parameters()] == ["bias"] and not mod.bias.requires_grad
        sd = mod.state_dict()
        mod2 = cls(128, 64, **kw)
        mod2.load_state_dict(sd)
        assert torch.equal(mod2(x), y)
        dtypes = {k: t.dtype for k, t in sd.items()}
        mod.to(torch.bfloat16)
        assert {k: t.dtype for k, t in mod.state_dict().items()} == dtypes
        # pre-quantized activations (e.g. from a fused layernorm_quant) run the same math: the same result
        qa = D.quantize_activation(x, fp8=cls is D.FP8Linear)
        assert torch.equal(mod(qa), y)


def test_module_gelu_and_swap_linears():
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(64, 128), nn.GELU(approximate="tanh"), nn.Linear(128, 64))
    x = torch.randn(4, 64)
    ref = model(x).detach()
    n = D.swap_linears(model, D.W8A8Linear.from_linear)
    assert n == 2 and isinstance(model[0], D.W8A8Linear)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert R.rel_error(model(x), ref) < 0.03
        fused = D.W8A8Linear.from_linear(nn.Linear(64, 128), activation="gelu_tanh")
        assert "gelu_tanh" in repr(fused)


def test_library_gemm_eligibility_names_each_reason():
    """Which products `scaled_mm(impl="auto")` may hand to torch._scaled_mm row-wise, and why not the others."""
    from workbench.kernels.scaled_mm import library_ineligible, scaled_mm

    f8 = torch.zeros(32, 64).to(torch.float8_e4m3fn)
    i8 = torch.zeros(32, 64, dtype=torch.int8)
    assert "int8" in library_ineligible(i8, i8, None, None, torch.bfloat16, False)
    assert "gelu_tanh" in library_ineligible(f8, f8, None, "gelu_tanh", torch.bfloat16, False)
    assert "asymmetric" in library_ineligible(f8, f8, None, None, torch.bfloat16, True)
    assert "float16" in library_ineligible(f8, f8, None, None, torch.float16, False)
    assert "multiple of 16" in library_ineligible(f8[:, :40], f8[:24, :40], None, None, torch.bfloat16, False)
    assert "sm_90" in library_ineligible(f8, f8, None, None, torch.bfloat16, False)  # this CPU
    with pytest.raises(ValueError, match="impl='cublas' cannot compute this product: not an sm_90"):
        scaled_mm(f8, torch.ones(32), f8, torch.ones(32), impl="cublas")
