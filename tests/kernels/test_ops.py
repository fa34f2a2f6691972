"""Custom ops: reference semantics, fake (meta) kernels, and graph-break-free torch.compile of quantized modules."""

import warnings

import pytest
import torch
import torch.nn as nn

from workbench.kernels import dispatch as D
from workbench.kernels import ops
from workbench.kernels import reference as R


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # the CPU reference fallback warns once
        yield


def _gemm_args(fp8: bool, bias: bool = True):
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(37, 256, generator=g), torch.randn(64, 256, generator=g)
    xq, xs = (R.quantize_per_token_fp8 if fp8 else R.quantize_per_token_int8)(x)
    wq, ws = (R.quantize_per_channel_fp8 if fp8 else R.quantize_per_channel_int8)(w)
    return xq, xs, wq, ws, torch.randn(64, generator=g) if bias else None


@pytest.mark.parametrize("fp8", [False, True])
@pytest.mark.parametrize("activation", [None, "gelu_tanh"])
def test_scaled_mm_op_is_the_reference(fp8, activation):
    xq, xs, wq, ws, b = _gemm_args(fp8)
    out = torch.ops.workbench.scaled_mm(xq, xs, wq, ws, b, activation, torch.bfloat16)
    ref = (R.fp8_scaled_mm_ref if fp8 else R.int8_scaled_mm_ref)(xq, xs, wq, ws, b, activation, torch.bfloat16)
    assert out.dtype == torch.bfloat16 and torch.equal(out, ref)
    # test_schema compares inputs with ops that CPU torch lacks for float8; the fake kernel is checked for both
    utils = ("test_faketensor", "test_aot_dispatch_dynamic") if fp8 else \
        ("test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")
    torch.library.opcheck(torch.ops.workbench.scaled_mm.default, (xq, xs, wq, ws, b, activation, torch.bfloat16),
                          test_utils=utils)


def test_scaled_mm_op_asymmetric_activations():
    """uint8 per-token activations (codes - 128, zero - 128) with the weight's row sums: the reference, and
    schema / fake / AOT checks with the two optional tensors given (what torch.compile traces)."""
    g = torch.Generator().manual_seed(2)
    x, w = torch.randn(37, 128, generator=g) + 0.7, torch.randn(64, 128, generator=g)
    xq, xs, xz = R.quantize_per_token_uint8(x)
    wq, ws = R.quantize_per_channel_int8(w)
    wsum = R.weight_row_sums(wq)
    args = (xq, xs, wq, ws, None, None, torch.float32, "auto", xz, wsum)
    out = torch.ops.workbench.scaled_mm(*args)
    assert torch.equal(out, R.int8_scaled_mm_ref(xq, xs, wq, ws, None, None, torch.float32, xz, wsum))
    y = x @ w.t()
    assert float((out - y).norm() / y.norm()) < 0.02  # 8-bit error; without the zero correction it is ~1
    torch.library.opcheck(torch.ops.workbench.scaled_mm.default, args,
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor",
                                      "test_aot_dispatch_dynamic"))


@pytest.mark.parametrize("fp8", [False, True], ids=["int8", "fp8"])
def test_quantize_rows_op_is_the_reference(fp8):
    x = torch.randn(9, 200, generator=torch.Generator().manual_seed(2)) * 3
    q, s = torch.ops.workbench.quantize_rows(x, fp8)
    rq, rs = (R.quantize_per_token_fp8 if fp8 else R.quantize_per_token_int8)(x)
    assert q.dtype == rq.dtype and torch.equal(q.float(), rq.float()) and torch.equal(s, rs)
    torch.library.opcheck(torch.ops.workbench.quantize_rows.default, (x, fp8))


def test_w4a8_op_is_the_reference_and_checks_k():
    g = torch.Generator().manual_seed(1)
    x, w = torch.randn(9, 256, generator=g), torch.randn(32, 256, generator=g)
    xq, xs = R.quantize_per_token_int8(x)
    wp, wsg = R.quantize_weight_int4_grouped(w, 128)
    out = torch.ops.workbench.w4a8_scaled_mm(xq, xs, wp, wsg, None, None, torch.float32)
    assert torch.equal(out, R.w4a8_scaled_mm_ref(xq, xs, wp, wsg, None, None, torch.float32))
    torch.library.opcheck(torch.ops.workbench.w4a8_scaled_mm.default, (xq, xs, wp, wsg, None, None, torch.float32))
    with pytest.raises(Exception, match="K mismatch"):
        with torch.device("meta"):
            torch.ops.workbench.w4a8_scaled_mm(torch.empty(9, 128, dtype=torch.int8), torch.empty(9),
                                               torch.empty(32, 128, dtype=torch.uint8), torch.empty(32, 2), None,
                                               None, torch.float32)


def test_quant_attention_op_counts_and_matches_dispatch():
    g = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(1, 2, 40, 64, generator=g) for _ in range(3))
    before = ops.CALLS["quant_attention"]
    out = torch.ops.workbench.quant_attention(q, k, v, None, "fp8")
    assert ops.CALLS["quant_attention"] == before + 1
    assert torch.equal(out, D.quant_attention(q, k, v))
    torch.library.opcheck(torch.ops.workbench.quant_attention.default, (q, k, v, 0.125, "fp16"))


class _Block(nn.Module):
    """LayerNorm -> linear (+tanh GELU) -> linear: the producer/consumer pattern of a DiT FFN."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.norm, self.fc1, self.fc2 = nn.LayerNorm(128), nn.Linear(128, 256), nn.Linear(256, 128)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.nn.functional.gelu(self.fc1(self.norm(x)), approximate="tanh"))


@pytest.mark.parametrize("make", [D.W8A8Linear.from_linear, D.FP8Linear.from_linear, D.W4A8Linear.from_linear])
def test_quantized_modules_compile_without_graph_breaks_and_match_eager(make):
    model = _Block()
    assert D.swap_linears(model, make) == 2
    x = torch.randn(2, 33, 128)
    with torch.no_grad():
        eager = model(x)
        torch._dynamo.reset()
        before = sum(ops.CALLS.values())
        compiled = torch.compile(model, backend="aot_eager", fullgraph=True)(x)  # fullgraph: a break is an error
    assert sum(ops.CALLS.values()) - before == 2  # both GEMMs ran as custom ops inside the graph
    assert torch.equal(compiled, eager)  # same math: plain-torch quantization + the op = the eager reference path
