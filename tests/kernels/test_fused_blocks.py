"""Fused Wan / CogVideoX block forwards (kernels/fused_blocks.py) on tiny diffusers models, CPU reference path."""
from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

from workbench.bench import e2e
from workbench.kernels import Backend, dispatch, fused_blocks, ops
from workbench.kernels.reference import rel_error

CPU = torch.device("cpu")


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


@pytest.fixture(scope="module")
def tiny():
    """{"CogVideoX": (model, inputs), "Wan": ...}: the bench's dry-run cases in bf16 with seeded weights."""
    out = {}
    for case in e2e.cases(dry=True):
        out[case.cls.replace("Transformer3DModel", "")] = (e2e.build(case, CPU, torch.bfloat16),
                                                          e2e.inputs(case, CPU, torch.bfloat16), case)
    return out


def _quantized(model: nn.Module, kind: str) -> nn.Module:
    q = copy.deepcopy(model)
    e2e.swap_ours(q, kind)  # swaps the linears and fuses the blocks
    return q


def _run(model: nn.Module, inputs: dict) -> tuple[torch.Tensor, int]:
    start = ops.CALLS["residual_norm_quant"]
    with torch.no_grad():
        out = model(**inputs)[0].float()
    return out, ops.CALLS["residual_norm_quant"] - start


@pytest.mark.parametrize("kind", ["fp8", "w8a8", "w4a8"])
def test_wan_fused_blocks_equal_diffusers_forward(tiny, kind):
    """Wan's block does its norms in fp32 and rounds to bf16 before the linear, as the fused kernel does: the
    fused forward is bit-identical to diffusers' forward with the same quantized linears; three calls a block."""
    model, inputs, case = tiny["Wan"]
    q = _quantized(model, kind)
    layers = case.config["num_layers"]
    assert sum(hasattr(m, fused_blocks.FUSED_ATTR) for m in q.modules()) == layers
    fused, calls = _run(q, inputs)
    assert calls == 3 * layers
    assert fused_blocks.unfuse_block_norms(q) == layers
    plain, calls = _run(q, inputs)
    assert calls == 0
    assert torch.equal(fused, plain)


@pytest.mark.parametrize("kind", ["fp8", "w8a8"])
def test_cogvideox_fused_blocks_match_diffusers_forward(tiny, kind):
    """CogVideoX's eager block rounds the LayerNorm output and each modulation op to bf16; the fused kernel rounds
    once at the end, as a compiled block does: the two agree to the quantization's own noise, and both are as far
    from the bf16 model."""
    model, inputs, case = tiny["CogVideoX"]
    with torch.no_grad():
        ref = model(**inputs)[0].float()
    q = _quantized(model, kind)
    fused, calls = _run(q, inputs)
    assert calls == 2 * case.config["num_layers"]
    fused_blocks.unfuse_block_norms(q)
    plain, _ = _run(q, inputs)
    assert rel_error(fused, plain) < 0.01
    assert rel_error(fused, ref) < 1.5 * rel_error(plain, ref) + 1e-3


@pytest.mark.parametrize("name", ["CogVideoX", "Wan"])
def test_fused_blocks_compile_without_graph_breaks(tiny, name):
    """fullgraph=True: the fused forward, the custom ops and the pre-quantized linears trace as one graph."""
    model, inputs, _ = tiny[name]
    q = _quantized(model, "fp8")
    eager, _ = _run(q, inputs)
    blocks = getattr(q, "transformer_blocks", None) or q.blocks
    for b in blocks:
        b.compile(backend="aot_eager", fullgraph=True)
    compiled, calls = _run(q, inputs)
    assert calls > 0 and torch.equal(compiled, eager)


def test_blocks_keep_their_forward_unless_every_consumer_takes_the_codes(tiny):
    """A bf16 linear among the consumers, a custom attention processor or mixed code formats: not fused."""
    model, _, case = tiny["Wan"]
    q = copy.deepcopy(model)
    dispatch.swap_linears(q, dispatch.FP8Linear.from_linear, e2e.block_linear)
    blocks = list(q.blocks)
    blocks[0].attn1.to_k = nn.Linear(blocks[0].attn1.to_k.in_features, blocks[0].attn1.to_k.out_features)
    blocks[1].attn2.to_q = dispatch.W8A8Linear.from_linear(nn.Linear(128, 128))  # int8 next to e4m3
    assert fused_blocks.fuse_block_norms(q) == 0
    cog, _, _ = tiny["CogVideoX"]
    c = copy.deepcopy(cog)
    dispatch.swap_linears(c, dispatch.FP8Linear.from_linear, e2e.block_linear)
    c.transformer_blocks[0].attn1.set_processor(_OtherProcessor())
    assert fused_blocks.fuse_block_norms(c) == case.config["num_layers"] - 1
    asym = copy.deepcopy(model)
    dispatch.swap_linears(asym, lambda lin: dispatch.W8A8Linear(lin.in_features, lin.out_features, asym_act=True),
                          e2e.block_linear)
    assert fused_blocks.fuse_block_norms(asym) == 0  # asymmetric codes: the linear quantizes its own input


class _OtherProcessor:
    def __call__(self, attn, hidden_states, encoder_hidden_states, **kw):  # noqa: ANN001, ANN204
        raise AssertionError("not called")


def test_fused_block_marks_the_attention_output_projections(tiny):
    """The output projections read an attention kernel's output: quantized by the one-pass row kernel; unfusing
    gives them back the traced quantization."""
    model, _, case = tiny["Wan"]
    q = _quantized(model, "fp8")
    flagged = sorted(n.split(".", 2)[2] for n, m in q.named_modules() if getattr(m, "input_from_kernel", False))
    layers = case.config["num_layers"]
    assert flagged == sorted(["attn1.to_out.0", "attn2.to_out.0", "ffn.net.2"] * layers)
    fused_blocks.unfuse_block_norms(q)
    flagged = [n for n, m in q.named_modules() if getattr(m, "input_from_kernel", False)]
    assert all(n.endswith("ffn.net.2") for n in flagged) and len(flagged) == layers


def test_prequantized_input_of_the_wrong_format_is_refused():
    lin = dispatch.FP8Linear.from_linear(nn.Linear(128, 64))
    codes = dispatch.QuantizedActivation(torch.zeros(3, 128, dtype=torch.int8), torch.ones(3), (3,))
    with pytest.raises(ValueError, match="float8_e4m3fn activation codes, got torch.int8"):
        lin(codes)
    w8 = dispatch.W8A8Linear.from_linear(nn.Linear(256, 64))
    with pytest.raises(ValueError, match="has 128 features, the layer takes 256"):
        w8(codes)


def test_a_block_missing_an_attribute_the_fused_forward_uses_keeps_its_own(tiny):
    """Another diffusers version may lay a block out differently: no fusion rather than an AttributeError later."""
    model, _, case = tiny["Wan"]
    q = copy.deepcopy(model)
    dispatch.swap_linears(q, dispatch.FP8Linear.from_linear, e2e.block_linear)
    del q.blocks[0].scale_shift_table
    assert fused_blocks.fuse_block_norms(q) == case.config["num_layers"] - 1
    assert not hasattr(q.blocks[0], fused_blocks.FUSED_ATTR)


@pytest.mark.parametrize("name", ["CogVideoX", "Wan"])
def test_fused_producer_runs_on_the_linears_backend(tiny, name, monkeypatch):
    """The fused producer follows its block's kernel linears (read at call time): the reference math for a model
    loaded with backend="reference" on a GPU, and `set_backend` moves it along with them."""
    model, inputs, _ = tiny[name]
    q = _quantized(model, "w8a8")
    seen = []
    real = ops.use_triton

    def spy(op, kind, device, backend="auto"):  # noqa: ANN001, ANN202
        seen.append((op, Backend.parse(backend).value))
        return real(op, kind, device, backend)

    monkeypatch.setattr(ops, "use_triton", spy)
    for backend in ("reference", "auto"):
        seen.clear()
        dispatch.set_backend(q, backend)
        _, calls = _run(q, inputs)
        assert calls > 0 and {b for op, b in seen if op == "ops.residual_norm_quant"} == {backend}
