"""Dispatch: the backend switch (availability reasons, single fallback warning, TRITON refused where it cannot
run, REFERENCE silent), reference fallback results, nn.Modules."""

import warnings

import pytest
import torch
import torch.nn as nn

from workbench.kernels import backend as B
from workbench.kernels import dispatch as D
from workbench.kernels import reference as R
from workbench.kernels.backend import Backend


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
    x = torch.randn(3, 64)
    wq, ws = R.quantize_per_channel_int8(torch.randn(32, 64))
    with pytest.raises(RuntimeError, match="backend 'triton' was asked for, but no CUDA device available"):
        D.w8a8_linear(x, wq, ws, backend="triton")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = D.w8a8_linear(x, wq, ws, backend=Backend.REFERENCE)
    assert torch.equal(out, R.w8a8_linear_ref(x, wq, ws))
    with pytest.raises(ValueError, match=r"unknown kernel backend 'gpu'.*'auto', 'triton', 'reference'"):
        Backend.parse("gpu")
    mod = D.W8A8Linear.from_linear(nn.Linear(64, 32), backend="triton")
    with pytest.raises(RuntimeError, match="W8A8Linear.*backend 'triton'|w8a8_linear.*backend 'triton'"):
        mod(x)
    assert D.set_backend(nn.Sequential(mod, nn.ReLU()), "reference") == 1 and mod.backend is Backend.REFERENCE
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        mod(x)


def test_fallback_warns_once_and_matches_reference():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 64, generator=g).bfloat16()
    wq, ws = R.quantize_per_channel_int8(torch.randn(32, 64, generator=g))
    with pytest.warns(RuntimeWarning, match=r"w8a8_linear: using the slow pure-torch reference path because"):
        out = D.w8a8_linear(x, wq, ws)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out2 = D.w8a8_linear(x, wq, ws)  # second call: no warning
    assert torch.equal(out, R.w8a8_linear_ref(x, wq, ws)) and torch.equal(out, out2)


def test_all_functional_fallbacks_match_references():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 7, 128, generator=g)
    w = torch.randn(48, 128, generator=g)
    b = torch.randn(48, generator=g)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        wf, wfs = R.quantize_per_channel_fp8(w)
        assert torch.equal(D.fp8_linear(x, wf, wfs, b, "gelu_tanh"),
                           R.fp8_rowwise_linear_ref(x, wf, wfs, b, "gelu_tanh"))
        wp, wg = R.quantize_weight_int4_grouped(w, 64)
        assert torch.equal(D.w4a8_linear(x, wp, wg, b), R.w4a8_linear_ref(x, wp, wg, b))
        q, k, v = (torch.randn(1, 2, 33, 64, generator=g) for _ in range(3))
        assert torch.equal(D.quant_attention(q, k, v), R.quant_attention_ref(q, k, v, block_n=128))
        qa = D.layernorm_quant(x, fp8=True)
        qr, sr = R.layernorm_quant_ref(x, fp8=True)
        assert qa.lead_shape == (2, 7) and torch.equal(qa.q.float(), qr.reshape(14, 128).float())


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
        # pre-quantized activations (e.g. from a fused layernorm_quant) give the same result
        qa = D.quantize_activation(x, fp8=cls is D.FP8Linear)
        assert torch.allclose(mod(qa).float(), y.float(), rtol=1e-2, atol=1e-2)


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
