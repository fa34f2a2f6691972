"""Number formats: parsing, validation, grid invariants and gradients of fake_quant."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from workbench.quant.formats import (
    QuantFormat,
    dequantize,
    fake_quant,
    fp8_error_bound,
    qrange,
    quantize,
    scale_zero_from_range,
)

INT_FORMATS = [QuantFormat("int", b, s) for b in range(2, 9) for s in (True, False)]
FP8_FORMATS = [QuantFormat("fp8_e4m3"), QuantFormat("fp8_e5m2")]
FORMATS = INT_FORMATS + FP8_FORMATS

values = st.lists(
    st.floats(-1e4, 1e4, allow_nan=False, allow_infinity=False, width=32), min_size=1, max_size=64
)


@pytest.mark.parametrize(
    "text, expected",
    [
        ("int8", QuantFormat("int", 8, True)),
        ("int4", QuantFormat("int", 4, True)),
        ("int4_sym", QuantFormat("int", 4, True)),
        ("uint4", QuantFormat("int", 4, False)),
        ("int4_asym", QuantFormat("int", 4, False)),
        ("UINT8", QuantFormat("int", 8, False)),
        ("fp8", QuantFormat("fp8_e4m3")),
        ("fp8_e4m3", QuantFormat("fp8_e4m3")),
        ("fp8_e5m2", QuantFormat("fp8_e5m2")),
    ],
)
def test_parse(text, expected):
    assert QuantFormat.parse(text) == expected
    assert QuantFormat.parse(str(expected)) == expected


@pytest.mark.parametrize("text", ["int9", "int1", "uint16", "int0"])
def test_parse_rejects_bits_with_range(text):
    with pytest.raises(ValueError, match=r"2\.\.8"):
        QuantFormat.parse(text)


@pytest.mark.parametrize("text", ["float8", "int", "fp16", "uint4_sym"])
def test_parse_rejects_garbage(text):
    with pytest.raises(ValueError):
        QuantFormat.parse(text)


def test_validation():
    with pytest.raises(ValueError, match=r"2\.\.8"):
        QuantFormat("int", 1)
    with pytest.raises(ValueError, match="choose one of"):
        QuantFormat("int4")
    with pytest.raises(ValueError, match="8-bit symmetric"):
        QuantFormat("fp8_e4m3", 8, symmetric=False)


def test_qrange():
    assert qrange(QuantFormat("int", 8, True)) == (-128, 127)
    assert qrange(QuantFormat("int", 4, False)) == (0, 15)
    assert qrange(QuantFormat("int", 2, True)) == (-2, 1)
    assert qrange(QuantFormat("fp8_e4m3")) == (-448, 448)
    assert qrange(QuantFormat("fp8_e5m2")) == (-57344, 57344)


def test_scale_clamped_and_zero_integer():
    scale, zero = scale_zero_from_range(torch.tensor(0.0), torch.tensor(0.0), QuantFormat("int", 8, False))
    assert scale.item() > 0.99e-8 and zero.item() == 0
    scale, zero = scale_zero_from_range(torch.tensor(-1.0), torch.tensor(3.0), QuantFormat("int", 4, False))
    assert zero.item() == round(zero.item()) and 0 <= zero.item() <= 15


def test_codes_and_values_written_out_per_channel():
    """Per-channel scales (one per row) by hand, symmetric and with an asymmetric zero point:
    codes = clamp(round(x / s) + z), ties to even (3 / 2 = 1.5 -> 2); values = (codes - z) * s."""
    x = torch.tensor([[0.25, -0.75, 1.0, 0.5], [6.0, -2.0, 3.0, -8.0]])
    s = torch.tensor([[0.25], [2.0]])
    sym, asym = QuantFormat("int", 4, True), QuantFormat("int", 4, False)   # [-8, 7] and [0, 15]
    zero = torch.zeros_like(s)
    codes = quantize(x, s, zero, sym)
    assert codes.dtype == torch.int8 and codes.tolist() == [[1, -3, 4, 2], [3, -1, 2, -4]]
    assert dequantize(codes, s, zero, sym).tolist() == [[0.25, -0.75, 1.0, 0.5], [6.0, -2.0, 4.0, -8.0]]
    z = torch.tensor([[8.0], [3.0]])
    ucodes = quantize(x, s, z, asym)
    assert ucodes.dtype == torch.uint8 and ucodes.tolist() == [[9, 5, 12, 10], [6, 2, 5, 0]]  # -4 + 3 clamps to 0
    assert dequantize(ucodes, s, z, asym).tolist() == [[0.25, -0.75, 1.0, 0.5], [6.0, -2.0, 4.0, -6.0]]
    assert torch.equal(fake_quant(x, s, z, asym), dequantize(ucodes, s, z, asym))


@settings(max_examples=40, deadline=None, database=None)
@given(xs=values, fmt=st.sampled_from(FORMATS))
def test_grid_bounds_idempotence_error(xs, fmt):
    x = torch.tensor(xs)
    scale, zero = scale_zero_from_range(x.min(), x.max(), fmt)
    codes = quantize(x, scale, zero, fmt)
    y = fake_quant(x, scale, zero, fmt)
    # dequantize(quantize(x)) is the fake quant value
    torch.testing.assert_close(dequantize(codes, scale, zero, fmt), y, rtol=1e-6, atol=1e-6 * scale.item())
    qmin, qmax = qrange(fmt)
    c = codes.float()
    assert c.min() >= qmin and c.max() <= qmax
    if not fmt.is_fp8:
        assert codes.dtype in (torch.int8, torch.uint8)
        grid = y / scale + zero
        torch.testing.assert_close(grid, grid.round(), rtol=0, atol=1e-3)
        assert (y - x).abs().max() <= scale / 2 * (1 + 1e-5) + 1e-5 * x.abs().max()
    else:
        bound = fp8_error_bound(x, scale, fmt)
        assert torch.all((y - x).abs() <= bound * (1 + 1e-5) + 1e-6 * x.abs())
    assert torch.equal(fake_quant(y, scale, zero, fmt), y)


def test_fp8_matches_mantissa_rounding():
    x = torch.linspace(-3, 3, 101)
    one = torch.tensor(1.0)
    y = fake_quant(x, one, torch.tensor(0.0), QuantFormat("fp8_e4m3"))
    # e4m3 has 3 mantissa bits: numbers in [2, 4) sit on a grid of 0.25
    big = x.abs() >= 2
    torch.testing.assert_close(y[big], (x[big] * 4).round() / 4)
    assert fake_quant(torch.tensor([1000.0]), one, one * 0, QuantFormat("fp8_e4m3")).item() == 448.0


def test_ste_gradients_to_input():
    fmt = QuantFormat("int", 4, True)
    scale, zero = torch.tensor(0.1), torch.tensor(0.0)
    x = torch.tensor([0.03, 0.26, -0.5, 5.0, -5.0], requires_grad=True)
    fake_quant(x, scale, zero, fmt).sum().backward()
    # inside the clamp range the gradient passes straight through, outside it is zero
    assert x.grad.tolist() == [1.0, 1.0, 1.0, 0.0, 0.0]


@pytest.mark.parametrize("fmt", [QuantFormat("int", 4, True), QuantFormat("int", 4, False), FP8_FORMATS[0]])
def test_lsq_gradient_to_scale(fmt):
    x = torch.tensor([0.03, 0.26, -0.37, 80.0])
    zero = torch.tensor(3.0 if not fmt.symmetric else 0.0)
    scale = torch.tensor(0.1, requires_grad=True)
    fake_quant(x, scale, zero, fmt).sum().backward()
    v = x / 0.1
    qmin, qmax = qrange(fmt)
    if fmt.is_fp8:
        rounded = v.to(torch.float8_e4m3fn).float()
        expected = torch.where(v.abs() <= qmax, rounded - v, torch.sign(v) * qmax)
    else:
        inside = (v.round() + zero >= qmin) & (v.round() + zero <= qmax)
        expected = torch.where(inside, v.round() - v, torch.clamp(v.round() + zero, qmin, qmax) - zero)
    torch.testing.assert_close(scale.grad, expected.sum(), rtol=1e-4, atol=1e-4)


def test_fake_quant_keeps_dtype():
    x = torch.randn(16, dtype=torch.bfloat16)
    scale, zero = scale_zero_from_range(x.float().min(), x.float().max(), QuantFormat("int", 8, True))
    assert fake_quant(x, scale, zero, QuantFormat("int", 8, True)).dtype == torch.bfloat16
