"""Quantizer invariants per granularity and format, observers, timestep-wise ranges, learnable scales."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from workbench.quant import QuantSpec, Quantizer, at_timestep, current_bucket, current_timestep
from workbench.quant.formats import QuantFormat, fp8_error_bound, qrange, quantize

FORMATS = ["int2", "int3", "int4", "uint4", "int6", "int8", "uint8", "fp8_e4m3", "fp8_e5m2"]
GRANULARITIES = ["tensor", "channel", "token", "group"]


@st.composite
def tensors(draw):
    """A (rows, cols) tensor with random magnitude and sometimes an outlier."""
    rows = draw(st.integers(1, 6))
    cols = draw(st.sampled_from([4, 8, 16]))
    seed = draw(st.integers(0, 2**16))
    magnitude = draw(st.sampled_from([1e-3, 1.0, 300.0]))
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, cols, generator=g) * magnitude
    if draw(st.booleans()):
        x[0, 0] = 25 * magnitude
    if draw(st.booleans()):
        x = x + magnitude  # one-sided values exercise the asymmetric zero point
    return x


def _spec(fmt, gran, dynamic):
    return QuantSpec(fmt, gran, group_size=4, dynamic=dynamic)


@settings(max_examples=60, deadline=None, database=None)
@given(x=tensors(), fmt=st.sampled_from(FORMATS), gran=st.sampled_from(GRANULARITIES), dynamic=st.booleans())
def test_quantizer_invariants(x, fmt, gran, dynamic):
    q = Quantizer(_spec(fmt, gran, dynamic))
    if not dynamic:
        q.calibrate(x)
    y = q(x)
    v = q.grouped(x)
    scale, zero = q.params_for(v)
    f = q.spec.format
    codes = quantize(v, scale, zero, f).float()
    qmin, qmax = qrange(f)
    # codes are integers (or fp8 values) inside the format's range
    assert codes.min() >= qmin and codes.max() <= qmax
    # dequantized values lie on the grid, inside the representable bounds
    yv = q.grouped(y)
    assert torch.all(yv >= (qmin - zero) * scale * (1 + 1e-6) - 1e-12)
    assert torch.all(yv <= (qmax - zero) * scale * (1 + 1e-6) + 1e-12)
    if not f.is_fp8:
        grid = yv / scale + zero
        torch.testing.assert_close(grid, grid.round(), rtol=0, atol=2e-3)
        # x is inside the calibrated range: the error is at most half a step
        err = (yv - v).abs()
        assert torch.all(err <= scale / 2 * (1 + 1e-4) + 1e-6 * v.abs())
    else:
        assert torch.all((yv - v).abs() <= fp8_error_bound(v, scale, f) * (1 + 1e-4) + 1e-6 * v.abs())
    # idempotence (exact for static ranges; dynamic ones are recomputed from y, equal up to float rounding)
    tol = dict(rtol=1e-6, atol=1e-6 * scale.max().item()) if dynamic else dict(rtol=0, atol=0)
    torch.testing.assert_close(q(y), y, **tol)


@pytest.mark.parametrize("gran, shape", [("tensor", ()), ("channel", (8, 1)), ("token", (8, 1)), ("group", (8, 4, 1))])
def test_range_shapes(gran, shape):
    q = Quantizer(QuantSpec("int8", gran, group_size=4))
    q.calibrate(torch.randn(8, 16))
    assert tuple(q.scale.shape) == shape


def test_static_minmax_covers_all_observed_calls():
    q = Quantizer(QuantSpec("int8", "tensor"))
    q.mode = "observe"
    a, b = torch.randn(4, 8), torch.randn(3, 8) * 5
    assert torch.equal(q(a), a)  # observe mode passes values through
    q(b)
    q.calibrate()
    absmax = torch.cat([a.flatten(), b.flatten()]).abs().max()
    torch.testing.assert_close(q.scale, absmax / 127)
    assert not q.observed


def test_uncalibrated_static_raises():
    q = Quantizer(QuantSpec("int8", "tensor"))
    with pytest.raises(RuntimeError, match="calibrate"):
        q(torch.randn(3))
    with pytest.raises(RuntimeError, match="observed nothing"):
        q.calibrate()


def test_off_mode_is_identity():
    q = Quantizer(QuantSpec("int2", "token", dynamic=True))
    q.mode = "off"
    x = torch.randn(4, 8)
    assert q(x) is x
    with pytest.raises(ValueError, match="choose one of"):
        q.mode = "fast"


def test_percentile_clips_outliers():
    x = torch.randn(10000)
    x[0] = 1000.0
    mm, pc = Quantizer(QuantSpec("int8")), Quantizer(QuantSpec("int8", observer="percentile", percentile=99.9))
    mm.calibrate(x)
    pc.calibrate(x)
    assert pc.scale < mm.scale / 50


def test_mse_observer_lowers_error():
    torch.manual_seed(0)
    x = torch.distributions.Laplace(0.0, 1.0).sample((20000,))
    x[:3] = torch.tensor([40.0, -35.0, 30.0])
    errs = {}
    for obs in ("minmax", "mse"):
        q = Quantizer(QuantSpec("int4", observer=obs, sample_size=4096))
        q.mode = "observe"
        for chunk in x.chunk(4):
            q(chunk)
        q.calibrate()
        q.mode = "quantize"
        errs[obs] = (q(x) - x).pow(2).mean().item()
    assert errs["mse"] < errs["minmax"] / 2


def test_mse_per_channel_weights():
    w = torch.randn(6, 64)
    w[:, 0] *= 20
    mm = Quantizer(QuantSpec("int3", "channel"), is_weight=True)
    ms = Quantizer(QuantSpec("int3", "channel", observer="mse"), is_weight=True)
    mm.calibrate(w)
    ms.calibrate(w)
    assert ms.scale.shape == (6, 1)
    assert (ms(w) - w).pow(2).sum() < (mm(w) - w).pow(2).sum()


def test_reservoir_sample_is_bounded():
    q = Quantizer(QuantSpec("int8", observer="percentile", sample_size=1000))
    q.mode = "observe"
    for _ in range(5):
        q(torch.randn(50, 100))
    assert q._stats.sample.numel() == 1000


def test_static_token_ranges_need_fixed_shapes():
    q = Quantizer(QuantSpec("int8", "token"))
    q.mode = "observe"
    q(torch.randn(2, 5, 8))
    with pytest.raises(ValueError, match="dynamic=True"):
        q(torch.randn(2, 7, 8))


def test_dynamic_token_scales_follow_each_row():
    q = Quantizer(QuantSpec("int8", "token", dynamic=True))
    x = torch.randn(2, 3, 16) * torch.tensor([1.0, 10.0, 100.0])[:, None]
    scale, _ = q.params_for(q.grouped(x))
    torch.testing.assert_close(scale, x.abs().amax(-1, keepdim=True) / 127)


def test_fixed_range_needs_no_calibration():
    q = Quantizer(QuantSpec("uint8", fixed_range=(0.0, 1.0)))
    p = torch.rand(5, 5)
    y = q(p)
    torch.testing.assert_close(q.scale, torch.tensor(1 / 255))
    assert q.zero.item() == 0
    assert (y - p).abs().max() <= 0.5 / 255 + 1e-7


def test_timestep_wise_picks_bucket_scale():
    q = Quantizer(QuantSpec("int8", timestep_wise=True, timestep_buckets=4))
    q.mode = "observe"
    with at_timestep(torch.tensor([100, 100])):
        q(torch.linspace(-1, 1, 11))
    with at_timestep(900):
        q(torch.linspace(-10, 10, 11))
    q.calibrate()
    q.mode = "quantize"
    x = torch.linspace(-1, 1, 11)
    with at_timestep(100):
        assert current_bucket(4) == 0 and current_timestep() == 100
        torch.testing.assert_close(q.params_for(x)[0], torch.tensor(1 / 127))
    with at_timestep(950.0):
        torch.testing.assert_close(q.params_for(x)[0], torch.tensor(10 / 127))
    with at_timestep(500):  # unseen bucket: the overall range
        torch.testing.assert_close(q.params_for(x)[0], torch.tensor(10 / 127))
    assert current_timestep() is None
    torch.testing.assert_close(q.params_for(x)[0], torch.tensor(10 / 127))


def test_state_dict_round_trip_with_lazy_shapes():
    q = Quantizer(QuantSpec("int4", "channel", timestep_wise=True, timestep_buckets=3), is_weight=True)
    q.calibrate(torch.randn(5, 8))
    fresh = Quantizer(q.spec, is_weight=True)
    fresh.load_state_dict(q.state_dict())
    torch.testing.assert_close(fresh.scale, q.scale)
    torch.testing.assert_close(fresh.bucket_scale, q.bucket_scale)
    x = torch.randn(5, 8)
    torch.testing.assert_close(fresh(x), q(x))


def test_learnable_scale_gets_gradients():
    q = Quantizer(QuantSpec("int4", "channel", learnable_scale=True), is_weight=True)
    w = torch.randn(4, 16, requires_grad=True)
    q.calibrate(w)
    assert isinstance(q.scale, torch.nn.Parameter)
    loss = (q(w) - w.detach() * 1.1).pow(2).sum()
    loss.backward()
    assert q.scale.grad is not None and q.scale.grad.shape == (4, 1) and q.scale.grad.abs().sum() > 0
    assert w.grad is not None and torch.isfinite(w.grad).all()
    opt = torch.optim.SGD(q.parameters(), lr=1e-3)
    before = q.scale.detach().clone()
    opt.step()
    assert not torch.equal(before, q.scale.detach())


def test_spec_validation():
    with pytest.raises(ValueError, match="granularity"):
        QuantSpec(granularity="row")
    with pytest.raises(ValueError, match="observer"):
        QuantSpec(observer="kl")
    with pytest.raises(ValueError, match=r"2\.\.8"):
        QuantSpec(format="int12")
    with pytest.raises(ValueError, match="dynamic"):
        QuantSpec(dynamic=True, timestep_wise=True)
    assert QuantSpec("int4").with_(format="uint3").format == QuantFormat("int", 3, False)
