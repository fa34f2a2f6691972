"""Property tests beyond min-max: clipping observers, timestep-wise buckets, QuantLinear transforms.

Complements test_quant_formats / test_quant_quantizer (grid, bounds, idempotence, half-step error for
min-max ranges): a clipped range must keep values on the grid and inside its bounds, values inside it
within half a step, values outside it on the nearest bound, and never use a coarser step than min-max.
"""

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from workbench.quant import (
    QuantLinear,
    QuantSpec,
    Quantizer,
    at_timestep,
    rotation_matrix,
    smooth_scales,
    timestep_bucket,
)
from workbench.quant.formats import qrange

INT_FORMATS = ["int2", "int3", "int4", "uint4", "int6", "uint6", "int8", "uint8"]
GRANULARITIES = ["tensor", "channel", "token", "group"]
FAST = settings(max_examples=40, deadline=None, database=None)


@st.composite
def tensors(draw, rows=(1, 6)):
    """(rows, cols) values of random magnitude, with outliers and one-sided shifts now and then."""
    n = draw(st.integers(*rows))
    cols = draw(st.sampled_from([8, 16, 32]))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    magnitude = draw(st.sampled_from([1e-3, 1.0, 50.0]))
    x = torch.randn(n, cols, generator=g) * magnitude
    if draw(st.booleans()):
        x[0, 0] = 30 * magnitude
    if draw(st.booleans()):
        x = x + magnitude
    return x


def _bounds(q: Quantizer, zero: torch.Tensor, scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    qmin, qmax = qrange(q.spec.format)
    return (qmin - zero) * scale, (qmax - zero) * scale


@FAST
@given(x=tensors(), fmt=st.sampled_from(INT_FORMATS), gran=st.sampled_from(GRANULARITIES),
       observer=st.sampled_from(["percentile", "mse"]), pct=st.sampled_from([90.0, 99.0, 99.99]))
def test_clipping_observers_keep_grid_bounds_and_half_step(x, fmt, gran, observer, pct):
    q = Quantizer(QuantSpec(fmt, gran, group_size=8, observer=observer, percentile=pct))
    ref = Quantizer(QuantSpec(fmt, gran, group_size=8))
    q.calibrate(x)
    ref.calibrate(x)
    v = q.grouped(x)
    y = q.grouped(q(x))
    scale, zero = q.params_for(v)
    lo, hi = _bounds(q, zero, scale)
    tol = 1e-5 * v.abs().amax() + 1e-12
    # on the grid, inside the representable bounds
    grid = y / scale + zero
    torch.testing.assert_close(grid, grid.round(), rtol=0, atol=2e-3)
    assert torch.all(y >= lo - tol) and torch.all(y <= hi + tol)
    # inside the clipped range: at most half a step off; outside: on the nearest bound
    inside = (v >= lo) & (v <= hi)
    assert torch.all(((y - v).abs() <= scale / 2 * (1 + 1e-4) + tol)[inside])
    clipped = torch.where(v < lo, lo.expand_as(v), hi.expand_as(v))
    assert torch.all(((y - clipped).abs() <= scale * 1e-3 + tol)[~inside])
    # idempotent, and never a coarser step than the min-max range
    assert torch.equal(q(q(x)), q(x))
    assert torch.all(scale <= ref.params_for(v)[0] * (1 + 1e-5))


@FAST
@given(x=tensors(), fmt=st.sampled_from(INT_FORMATS), gran=st.sampled_from(GRANULARITIES))
def test_mse_observer_never_loses_to_minmax_on_its_own_data(x, fmt, gran):
    """The MSE search includes the unclipped range, so per slice its error is at most min-max's."""
    mse = Quantizer(QuantSpec(fmt, gran, group_size=8, observer="mse"))
    mm = Quantizer(QuantSpec(fmt, gran, group_size=8))
    mse.calibrate(x)
    mm.calibrate(x)
    v = mse.grouped(x)
    m_err = (mse.grouped(mse(x)) - v).pow(2)
    r_err = (mm.grouped(mm(x)) - v).pow(2)
    reduce = (lambda e: e.sum()) if gran == "tensor" else (
        (lambda e: e.reshape(e.shape[0], -1).sum(1)) if gran == "channel" else (lambda e: e.sum(-1)))
    assert torch.all(reduce(m_err) <= reduce(r_err) * (1 + 1e-5) + 1e-30)


@FAST
@given(calls=st.integers(2, 5), fmt=st.sampled_from(INT_FORMATS), buckets=st.integers(1, 5), seed=st.integers(0, 1000))
def test_timestep_wise_ranges_hold_per_bucket(calls, fmt, buckets, seed):
    """Every bucket's own range keeps its observed values on its grid, within half a step."""
    g = torch.Generator().manual_seed(seed)
    ts = [float(t) for t in torch.randint(0, 1000, (calls,), generator=g)]
    xs = [torch.randn(3, 16, generator=g) * 10 ** float(torch.empty(1).uniform_(-2, 2, generator=g)) for _ in ts]
    q = Quantizer(QuantSpec(fmt, "tensor", timestep_wise=True, timestep_buckets=buckets))
    q.mode = "observe"
    for t, x in zip(ts, xs):
        with at_timestep(t):
            q(x)
    q.calibrate()
    q.mode = "quantize"
    for t in ts:
        b = timestep_bucket(t, buckets)
        seen = torch.cat([x for t2, x in zip(ts, xs) if timestep_bucket(t2, buckets) == b])
        with at_timestep(t):
            scale, zero = q.params_for(seen)
            y = q(seen)
        grid = y / scale + zero
        torch.testing.assert_close(grid, grid.round(), rtol=0, atol=2e-3)
        assert torch.all((y - seen).abs() <= scale / 2 * (1 + 1e-4) + 1e-5 * seen.abs().amax())
        # the bucket's range is no wider than the overall one
        assert torch.all(scale <= q.scale * (1 + 1e-6))


@FAST
@given(out_f=st.sampled_from([4, 8]), in_f=st.sampled_from([8, 16, 12]), seed=st.integers(0, 1000),
       smooth=st.booleans(), rotate=st.booleans(), w_fmt=st.sampled_from(["int4", "int8", "uint4"]))
def test_quant_linear_transforms_cancel_and_dequantized_weight_matches(out_f, in_f, seed, smooth, rotate, w_fmt):
    g = torch.Generator().manual_seed(seed)
    lin = torch.nn.Linear(in_f, out_f)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(out_f, in_f, generator=g))
        lin.bias.copy_(torch.randn(out_f, generator=g))
    x = torch.randn(2, 5, in_f, generator=g) * (1 + 10 * torch.rand(in_f, generator=g))
    y = lin(x)
    q = QuantLinear.from_linear(lin, QuantSpec(w_fmt, "channel"), QuantSpec("int8", "token", dynamic=True))
    if smooth:
        q.set_smooth(smooth_scales(x.abs().reshape(-1, in_f).amax(0), q.weight, 0.5))
    if rotate:
        q.set_rotation(rotation_matrix(in_f, seed))
    # quantizers off: smoothing and rotation cancel exactly (up to float rounding)
    q.weight_quantizer.mode = q.input_quantizer.mode = "off"
    torch.testing.assert_close(q(x), y, rtol=1e-4, atol=1e-4 * y.abs().max().item())
    # weights quantized, input not: the layer applies exactly its dequantized weight to the original x
    q.weight_quantizer.mode = "quantize"
    expected = torch.nn.functional.linear(x, q.dequantized_weight(), q.bias)
    torch.testing.assert_close(q(x), expected, rtol=1e-4, atol=1e-4 * y.abs().max().item())
    # setting both transforms at once gives the same layer as one after the other
    both = QuantLinear.from_linear(lin, QuantSpec(w_fmt, "channel"), QuantSpec("int8", "token", dynamic=True))
    both.set_balance(q.smooth, q.rotation)
    q.input_quantizer.mode = "quantize"
    assert torch.equal(both.quantized_weight(), q.quantized_weight()) and torch.equal(both(x), q(x))
