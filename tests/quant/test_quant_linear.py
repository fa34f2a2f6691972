"""QuantLinear: equivalence with nn.Linear, error vs bits, smoothing, rotation, caching, extras."""

import copy

import pytest
import torch
from torch import nn

from workbench.quant import (
    QuantLinear,
    QuantSpec,
    hadamard,
    observing,
    quant_disabled,
    random_orthogonal,
    rotation_matrix,
    smooth_scales,
)


def _linear(i=64, o=48, seed=0):
    torch.manual_seed(seed)
    return nn.Linear(i, o)


def _inputs(i=64, seed=1, outlier=True):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 10, i, generator=g)
    if outlier:
        x[..., 3] *= 30.0  # a hot input channel, as in DiT activations
    return x


def _specs(bits_w, bits_a):
    return QuantSpec(f"int{bits_w}", "channel"), QuantSpec(f"int{bits_a}", "token", dynamic=True)


def _rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def test_shares_parameters_and_state_dict_names():
    lin = _linear()
    q = QuantLinear.from_linear(lin, *_specs(8, 8))
    assert q.weight is lin.weight and q.bias is lin.bias
    keys = set(q.state_dict())
    assert {"weight", "bias"} <= keys
    assert q.to_linear().weight is lin.weight


def test_equals_linear_when_quantizers_off():
    lin, x = _linear(), _inputs()
    q = QuantLinear.from_linear(lin, *_specs(4, 4))
    with quant_disabled(q):
        torch.testing.assert_close(q(x), lin(x), rtol=0, atol=0)


def test_error_shrinks_with_bits():
    lin, x = _linear(), _inputs()
    ref = lin(x)
    errs = [_rel(QuantLinear.from_linear(lin, *_specs(b, b))(x), ref) for b in (8, 6, 4, 3)]
    assert errs[0] < errs[1] < errs[2] < errs[3]
    assert errs[0] < 0.03


@pytest.mark.parametrize("gran", ["tensor", "channel", "group"])
def test_weight_granularities_run(gran):
    lin, x = _linear(), _inputs()
    q = QuantLinear.from_linear(lin, QuantSpec("int8", gran, group_size=16), None)
    assert _rel(q(x), lin(x)) < 0.02


def test_smoothing_is_exact_when_off_and_helps_when_on():
    lin, x = _linear(), _inputs()
    w_spec, a_spec = QuantSpec("int8", "channel"), QuantSpec("int8", "tensor", dynamic=True)
    q = QuantLinear.from_linear(lin, w_spec, a_spec)
    before = _rel(q(x), lin(x))
    with observing(q):
        q(x)
    assert q.input_absmax.shape == (64,)
    s = q.smooth_(alpha=0.5)
    torch.testing.assert_close(s, smooth_scales(x.abs().amax((0, 1)), lin.weight, 0.5))
    with quant_disabled(q):
        torch.testing.assert_close(q(x), lin(x), rtol=1e-5, atol=1e-5)
    after = _rel(q(x), lin(x))
    assert after < before / 2


@pytest.mark.parametrize("n", [64, 48])
def test_rotation_is_exact_when_off(n):
    lin, x = _linear(i=n), _inputs(i=n)
    q = QuantLinear.from_linear(lin, *_specs(4, 8))
    q.set_rotation(rotation_matrix(n, seed=3))
    with quant_disabled(q):
        torch.testing.assert_close(q(x), lin(x), rtol=1e-5, atol=1e-5)
    # the dequantized weight in the original basis reproduces the weight-only quantized layer
    with torch.no_grad():
        q.input_quantizer.mode = "off"
        torch.testing.assert_close(q(x), x @ q.dequantized_weight().T + lin.bias, rtol=1e-4, atol=1e-4)


def test_rotation_spreads_outliers():
    lin, x = _linear(), _inputs()
    w_spec, a_spec = QuantSpec("int8", "channel"), QuantSpec("int4", "token", dynamic=True)
    plain = QuantLinear.from_linear(lin, w_spec, a_spec)
    rotated = QuantLinear.from_linear(copy.deepcopy(lin), w_spec, a_spec)
    rotated.set_rotation(rotation_matrix(64))
    assert _rel(rotated(x), lin(x)) < _rel(plain(x), lin(x))


def test_smooth_and_rotation_together_exact_when_off():
    lin, x = _linear(), _inputs()
    q = QuantLinear.from_linear(lin, *_specs(8, 8))
    q.set_smooth(torch.rand(64) + 0.5)
    q.set_rotation(hadamard(64))
    with quant_disabled(q):
        torch.testing.assert_close(q(x), lin(x), rtol=1e-5, atol=1e-5)


def test_rotation_helpers_are_orthogonal():
    for r in (hadamard(16), rotation_matrix(32), random_orthogonal(12), rotation_matrix(20)):
        torch.testing.assert_close(r @ r.T, torch.eye(r.shape[0]), atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="powers of two"):
        hadamard(12)
    q = QuantLinear.from_linear(_linear(i=8, o=4))
    with pytest.raises(ValueError, match="orthogonal"):
        q.set_rotation(torch.ones(8, 8))
    with pytest.raises(ValueError, match="shape"):
        q.set_smooth(torch.ones(3))


def test_weight_cache_reused_and_invalidated():
    lin, x = _linear(), _inputs()
    q = QuantLinear.from_linear(lin, *_specs(4, 8))
    with torch.no_grad():
        w1 = q.quantized_weight()
        assert q.quantized_weight() is w1  # cached
        lin.weight.mul_(2.0)  # in-place change bumps the version
        q.recalibrate_weight()
        w2 = q.quantized_weight()
        assert w2 is not w1
        torch.testing.assert_close(w2, 2 * w1, rtol=1e-5, atol=1e-6)
        q.weight_quantizer.mode = "off"
        assert q.quantized_weight() is q.weight
    # with gradients wanted, no cache: the weight gets a gradient
    q.weight_quantizer.mode = "quantize"
    q(x).sum().backward()
    assert lin.weight.grad is not None


def test_ste_gradients_through_quant_linear():
    lin, x = _linear(), _inputs()
    x.requires_grad_(True)
    w_spec = QuantSpec("int4", "channel", learnable_scale=True)
    q = QuantLinear.from_linear(lin, w_spec, QuantSpec("int8", "token", dynamic=True))
    q(x).pow(2).mean().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert q.weight_quantizer.scale.grad is not None and q.weight_quantizer.scale.grad.abs().sum() > 0
    assert lin.weight.grad is not None


def test_extras_add_output_corrections():
    lin, x = _linear(), _inputs()
    q = QuantLinear.from_linear(lin, *_specs(8, 8))
    base = q(x)

    class LoRA(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(64, 4, bias=False), nn.Linear(4, 48, bias=False)

        def forward(self, x, y_q):
            return self.b(self.a(x))

    q.extras["lora"] = LoRA()
    q.extras["shift"] = type("Shift", (nn.Module,), {"forward": lambda self, x, y: torch.ones_like(y)})()
    out = q(x)
    torch.testing.assert_close(out, base + q.extras["lora"](x, base) + 1)


def test_to_linear_dequantized():
    lin, x = _linear(), _inputs()
    q = QuantLinear.from_linear(lin, QuantSpec("int4", "channel"), None)
    deq = q.to_linear(dequantized=True)
    torch.testing.assert_close(deq(x), q(x), rtol=1e-5, atol=1e-5)
    assert deq.weight is not lin.weight
