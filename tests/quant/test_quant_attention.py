"""QuantAttention math against SDPA, statistics capture, and the processor wrapper's plumbing."""

import copy
import inspect

import pytest
import torch
import torch.nn.functional as F

from workbench.quant import (
    AttentionSpec,
    QuantAttention,
    QuantAttnProcessor,
    QuantSpec,
    capturing_attention,
    observing,
    patch_attention_function,
    quant_disabled,
    unpatch_attention_functions,
    wrap_attention,
)


def _qkv(b=2, h=3, sq=7, sk=9, d=8, hk=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, h, sq, d, generator=g)
    k = torch.randn(b, hk or h, sk, d, generator=g)
    v = torch.randn(b, hk or h, sk, d, generator=g)
    return q, k, v


def _explicit(spec=None):
    qa = QuantAttention(spec or AttentionSpec.capture_only())
    qa.explicit = True
    return qa


@pytest.mark.parametrize("mask_kind", ["none", "bool", "additive", "causal", "gqa", "scale", "chunked"])
def test_explicit_math_matches_sdpa(mask_kind):
    q, k, v = _qkv(hk=1 if mask_kind == "gqa" else None, sq=9 if mask_kind == "causal" else 7)
    kwargs = {}
    if mask_kind == "bool":
        mask = torch.ones(2, 1, 1, 9, dtype=torch.bool)
        mask[1, ..., 5:] = False
        kwargs["attn_mask"] = mask
    elif mask_kind == "additive":
        kwargs["attn_mask"] = torch.randn(2, 3, 7, 9)
    elif mask_kind == "causal":
        kwargs["is_causal"] = True
    elif mask_kind == "gqa":
        kwargs["enable_gqa"] = True
    elif mask_kind == "scale":
        kwargs["scale"] = 0.3
    qa = _explicit()
    if mask_kind == "chunked":
        qa.chunk_elements = 2 * 3 * 9 * 2  # two query rows per chunk
        kwargs["attn_mask"] = torch.randn(2, 3, 7, 9)
    torch.testing.assert_close(qa(q, k, v, **kwargs), F.scaled_dot_product_attention(q, k, v, **kwargs), atol=1e-5, rtol=1e-5)


def test_quantized_attention_is_close_and_error_shrinks():
    q, k, v = _qkv(sq=32, sk=32, d=16)
    ref = F.scaled_dot_product_attention(q, k, v)
    errs = []
    for bits in (8, 6, 4):
        out = QuantAttention(AttentionSpec.uniform(bits))(q, k, v)
        errs.append(((out - ref).norm() / ref.norm()).item())
    assert errs[0] < 0.03 and errs[0] < errs[1] < errs[2]


def test_p_quantizer_is_unsigned_0_to_1():
    qa = QuantAttention(AttentionSpec())
    assert qa.p_quantizer.spec.format.symmetric is False
    torch.testing.assert_close(qa.p_quantizer.scale, torch.tensor(1 / 255))


def test_static_qkv_observe_then_quantize():
    spec = QuantSpec("int8", "tensor")
    qa = QuantAttention(AttentionSpec(q=spec, k=spec, v=spec))
    q, k, v = _qkv()
    with observing(qa):
        qa(q, k, v)
    for quant in (qa.q_quantizer, qa.k_quantizer, qa.v_quantizer):
        quant.calibrate()
    torch.testing.assert_close(qa.q_quantizer.scale, q.abs().max() / 127)
    out, ref = qa(q, k, v), F.scaled_dot_product_attention(q, k, v)
    assert ((out - ref).norm() / ref.norm()) < 0.02


def test_capture_column_means():
    qa = QuantAttention(AttentionSpec.capture_only())
    qa.capture = True
    q, k, v = _qkv()
    qa.chunk_elements = 2 * 3 * 9 * 3
    qa(q, k, v)
    (cap,) = qa.captured
    p = (q @ k.transpose(-2, -1) / 8**0.5).softmax(-1)
    torch.testing.assert_close(cap, p.mean(-2), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(cap.sum(-1), torch.ones(2, 3))


def _tiny_attention():
    from diffusers.models.attention_processor import Attention

    torch.manual_seed(0)
    return Attention(query_dim=16, heads=2, dim_head=8).eval()


def test_processor_wrapper_plumbing():
    attn = _tiny_attention()
    x = torch.randn(2, 5, 16)
    ref = attn(x)
    inner = attn.processor
    qa = wrap_attention(attn, AttentionSpec.uniform(8))
    proc = attn.processor
    assert isinstance(proc, QuantAttnProcessor) and proc.inner is inner and attn.quant_attention is qa
    # diffusers filters kwargs by the processor's signature: the wrapper shows the inner one
    assert inspect.signature(proc.__call__) == inspect.signature(inner.__call__)
    # attributes diffusers sets on processors land on the inner processor
    proc._attention_backend = "native"
    assert inner._attention_backend == "native" and proc._attention_backend == "native"
    with quant_disabled(attn):
        torch.testing.assert_close(attn(x), ref, rtol=0, atol=0)
    out = attn(x)
    assert 0 < ((out - ref).norm() / ref.norm()) < 0.05
    # a deep copy gets its own QuantAttention, still wired to its processor
    twin = copy.deepcopy(attn)
    assert twin.processor.quant is twin.quant_attention and twin.quant_attention is not qa
    torch.testing.assert_close(twin(x), out)
    with capturing_attention(twin) as cap:
        twin(x)
    assert list(cap) == [""] and cap[""][0].shape == (2, 2, 5)


def test_pickle_round_trip_repatches():
    import io

    attn = _tiny_attention()
    wrap_attention(attn, AttentionSpec.uniform(4))
    x = torch.randn(1, 3, 16)
    out = attn(x)
    buffer = io.BytesIO()
    torch.save(attn, buffer)
    unpatch_attention_functions()  # as in a fresh process
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    torch.testing.assert_close(loaded(x), out)
    with quant_disabled(loaded):
        assert not torch.equal(loaded(x), out)


def test_unpatch_restores_original_functions():
    import diffusers.models.attention_processor as ap

    attn = _tiny_attention()
    wrap_attention(attn, AttentionSpec.uniform(4))
    assert getattr(ap.F, "_quant_proxy", False)
    unpatch_attention_functions()
    try:
        assert ap.F is torch.nn.functional
        x = torch.randn(1, 3, 16)
        with quant_disabled(attn):
            ref = attn(x)
        torch.testing.assert_close(attn(x), ref)  # nothing routes to the quantized math any more
    finally:
        patch_attention_function(attn.processor.inner)
    assert getattr(ap.F, "_quant_proxy", False)
    x = torch.randn(1, 3, 16)
    with quant_disabled(attn):
        ref = attn(x)
    assert not torch.equal(attn(x), ref)  # routed through the 4-bit math again


def test_unsupported_processor_is_refused():
    class Odd:
        def __call__(self, attn, hidden_states):
            return hidden_states

    with pytest.raises(ValueError, match="cannot be quantized"):
        QuantAttnProcessor(Odd(), QuantAttention(AttentionSpec()))


def test_chunk_budget_scales_with_free_gpu_memory(monkeypatch):
    from workbench.quant.attention import chunk_budget
    assert chunk_budget(None, torch.device("cpu")) == 2**26
    assert chunk_budget(123, torch.device("cuda")) == 123  # an explicit setting wins, no CUDA call
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (100 * 2**30, 140 * 2**30))
    assert chunk_budget(None, torch.device("cuda")) == 2**28  # 100 GiB free: capped (4 GiB of temporaries)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (4 * 2**30, 140 * 2**30))
    assert chunk_budget(None, torch.device("cuda")) == 2**27  # 4 GiB / 32
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (2**20, 140 * 2**30))
    assert chunk_budget(None, torch.device("cuda")) == 2**26  # nearly full: never below the CPU's chunk


def test_kernel_mode_runs_the_quantized_attention_kernel_where_it_applies():
    """AttentionSpec.kernel: calls go through workbench.kernels' quantized attention (its CPU reference here);
    masked / causal / short calls and the "off" / "observe" modes stay full precision."""
    from workbench.kernels import ops
    from workbench.kernels import reference as R
    from workbench.quant import observing

    q, k, v = _qkv(sq=40, sk=40, d=16)
    qa = QuantAttention(AttentionSpec.kernel_only("fp8", min_tokens=32))
    assert qa.active and not qa.quantizers()
    calls = ops.CALLS["quant_attention"]
    out = qa(q, k, v)
    assert ops.CALLS["quant_attention"] == calls + 1
    torch.testing.assert_close(out, R.quant_attention_ref(q, k, v, block_m=64, block_n=128), rtol=0, atol=0)
    assert 0 < R.rel_error(out, F.scaled_dot_product_attention(q, k, v)) < 0.05
    fp16 = QuantAttention(AttentionSpec.kernel_only("fp16", min_tokens=0))(q, k, v)
    torch.testing.assert_close(fp16, R.quant_attention_ref(q, k, v, block_m=64, block_n=128, pv_dtype="fp16"))
    sdpa = F.scaled_dot_product_attention
    for kwargs in ({"is_causal": True}, {"attn_mask": torch.ones(40, 40, dtype=torch.bool)}):
        torch.testing.assert_close(qa(q, k, v, **kwargs), sdpa(q, k, v, **kwargs), rtol=0, atol=0)
    short = QuantAttention(AttentionSpec.kernel_only("fp8", min_tokens=41))
    torch.testing.assert_close(short(q, k, v), sdpa(q, k, v), rtol=0, atol=0)
    with quant_disabled(qa):
        assert qa.mode == "off" and not qa.active
    with observing(qa):
        assert not qa.active
    assert qa.mode == "quantize" and qa.active


def test_kernel_spec_is_checked_and_round_trips():
    from workbench.quant.config import QuantConfig, attention_from_dict

    spec = attention_from_dict({"kernel": "fp16", "kernel_min_tokens": 0})
    assert spec == AttentionSpec.kernel_only("fp16", 0) and attention_from_dict(spec.to_dict()) == spec
    for bad, msg in (({"kernel": "int4"}, "P.V format"), ({"kernel": "fp8", "q": {"format": "int8"}}, "set q, k, v"),
                     ({"kernel": "fp8", "kernel_min_tokens": "many"}, "integer")):
        with pytest.raises(ValueError, match=msg):
            attention_from_dict(bad)
    cfg = QuantConfig.from_dict({"attention": {"kernel": "fp8"}, "keep_fp": ["blocks.2.*"],
                                 "attention_layers": {"blocks.0.*": {"kernel": "fp16"}}})
    assert cfg.attention_for("blocks.0.attn1").kernel == "fp16" and cfg.attention_for("blocks.1.attn1").kernel == "fp8"
    assert cfg.attention_for("blocks.2.attn1") is None
    assert QuantConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="attention_layers must map"):
        QuantConfig.from_dict({"attention_layers": ["blocks.0.*"]})


def _saved_bytes(fn):
    """Bytes of the distinct storages autograd saves for the backward pass while fn runs."""
    storages = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, sum(storages.values())


@pytest.mark.parametrize("p_spec", [None, QuantSpec("int8", "tensor", dynamic=True)], ids=["no_p", "p_int8"])
def test_chunks_are_recomputed_in_backward_not_kept(p_spec):
    """With gradients, each query chunk's scores and P are recomputed in backward (one chunk alive at a time)
    instead of saved: what is saved stays O(S D) while the S x S matrix is not; the gradients are unchanged."""
    spec = AttentionSpec(q=QuantSpec("int8", "token", dynamic=True), k=QuantSpec("int8", "token", dynamic=True),
                         v=QuantSpec("int8", "token", dynamic=True), p=p_spec)
    q, k, v = (t.requires_grad_() for t in _qkv(b=1, h=2, sq=64, sk=64, d=8, seed=3))
    qa = QuantAttention(spec)
    qa.chunk_elements = 2 * 64 * 8  # 8 query rows per chunk, 8 chunks
    out, saved = _saved_bytes(lambda: qa(q, k, v))
    scores_bytes = 2 * 64 * 64 * 4
    assert saved < scores_bytes, f"{saved} bytes saved for backward: the {scores_bytes}-byte score matrix is kept"
    grads = torch.autograd.grad(out.square().sum(), (q, k, v))
    ref_qa = QuantAttention(spec)
    q2, k2, v2 = (t.detach().clone().requires_grad_() for t in (q, k, v))
    # reference: the same chunks without recomputation (grad through a plain loop over _chunk)
    outs = [ref_qa._chunk(ref_qa.q_quantizer(q2)[..., i:i + 8, :], ref_qa.k_quantizer(k2), ref_qa.v_quantizer(v2),
                          None, 8 ** -0.5, 0.0)[0] for i in range(0, 64, 8)]
    ref_out = torch.cat(outs, -2)
    torch.testing.assert_close(out, ref_out)
    for g, r in zip(grads, torch.autograd.grad(ref_out.square().sum(), (q2, k2, v2))):
        torch.testing.assert_close(g, r)
    _, saved_no_grad = _saved_bytes(lambda: qa(q.detach(), k.detach(), v.detach()))
    assert saved_no_grad == 0


def test_patched_attention_functions_compile_without_a_break_while_no_wrapper_runs():
    """The patch stays installed for the process; a model compiled while no wrapped processor is running (e.g. a
    kernel-quantized model beside a fake-quant one) must trace straight through it (fullgraph: a break raises),
    and a wrapped call still routes to the quantized math afterwards."""
    attn = _tiny_attention()
    wrap_attention(attn, AttentionSpec.uniform(4))  # patches diffusers' module globals
    plain = _tiny_attention()
    x = torch.randn(1, 3, 16)
    compiled = torch.compile(plain, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(x), plain(x))
    with quant_disabled(attn):
        ref = attn(x)
    assert not torch.equal(attn(x), ref)
