"""The peers: SageAttention2 gets the same long self-attention calls our quantized attention gets (checked with a
stand-in `sageattention` module, eager and compiled), a forced SDPA backend is really forced, and a missing
package is a skip row that says how to get it."""
from __future__ import annotations

import importlib.machinery
import sys
import types
import warnings

import pytest
import torch

from workbench.bench import e2e as bench_e2e
from workbench.bench import peers


@pytest.fixture
def fake_sageattention(monkeypatch):
    """A `sageattention` module whose sageattn is exact attention and records how it was called."""
    calls = []

    def sageattn(q, k, v, tensor_layout="HND", is_causal=False, sm_scale=None, **kw):
        calls.append(dict(layout=tensor_layout, causal=is_causal, scale=sm_scale, shape=tuple(q.shape)))
        return torch.softmax(q @ k.transpose(-1, -2) * sm_scale, dim=-1) @ v

    module = types.ModuleType("sageattention")
    module.__spec__ = importlib.machinery.ModuleSpec("sageattention", None)  # diffusers looks it up with find_spec
    module.sageattn = sageattn
    monkeypatch.setitem(sys.modules, "sageattention", module)
    return calls


@pytest.mark.parametrize("name", ["bf16 + SageAttention2, compiled", "torchao fp8 + SageAttention2, compiled"])
def test_sage_variants_route_self_attention_only(name):
    v = bench_e2e.BY_NAME[name]
    assert v.sage and v.compiled and not v.ours and not bench_e2e.is_ours(name)


def test_sageattention_gets_the_long_self_attention_calls(fake_sageattention):
    case = bench_e2e.cases(dry=True)[1]  # tiny Wan: 32 video tokens (self-attention), 8 text tokens (cross)
    cpu, sdpa = torch.device("cpu"), torch.nn.functional.scaled_dot_product_attention
    ref_row, ref = bench_e2e.measure(case, bench_e2e.BY_NAME["bf16 eager"], cpu, torch.float32, warmup=0,
                                     log=lambda m: None, timed=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        row, out = bench_e2e.measure(case, bench_e2e.Variant("bf16 + sage, compiled", sage=True, compiled=True), cpu,
                                     torch.float32, warmup=1, min_attn_tokens=16, compile_backend="aot_eager",
                                     log=lambda m: None)
    assert row.error is None and row.ms > 0
    assert row.qattn_calls == case.config["num_layers"]  # one self-attention per block; cross-attention stayed on SDPA
    d = case.config["attention_head_dim"]
    assert {(c["layout"], c["causal"], c["scale"]) for c in fake_sageattention} == {("HND", False, d ** -0.5)}
    assert fake_sageattention[0]["shape"] == (1, case.config["num_attention_heads"], case.tokens, d)
    assert (out - ref).norm() / ref.norm() < 1e-4  # exact attention in the stand-in: the same output as SDPA
    assert torch.nn.functional.scaled_dot_product_attention is sdpa  # restored


def test_forced_sdpa_backend_is_the_only_one_enabled():
    from torch.backends import cuda

    with peers.sdpa_backend("cudnn", torch.device("cuda")):
        assert (cuda.cudnn_sdp_enabled(), cuda.flash_sdp_enabled(), cuda.math_sdp_enabled()) == (True, False, False)
    with peers.sdpa_backend("flash", torch.device("cuda")):
        assert (cuda.cudnn_sdp_enabled(), cuda.flash_sdp_enabled(), cuda.math_sdp_enabled()) == (False, True, False)
    with peers.sdpa_backend("cudnn", torch.device("cpu")):  # the dry run: MATH too, the CPU has no cuDNN attention
        assert cuda.cudnn_sdp_enabled() and cuda.math_sdp_enabled() and not cuda.flash_sdp_enabled()
    with pytest.raises(ValueError, match="unknown SDPA backend 'xformers'"):
        peers.sdpa_backend("xformers", torch.device("cuda"))


def test_missing_packages_are_skip_rows_that_say_how_to_get_them(monkeypatch):
    monkeypatch.setattr(peers, "importable", lambda package: False)
    started = []
    monkeypatch.setattr(bench_e2e.isolate, "run_worker", lambda *a, **k: started.append(a))
    names = ["torchao fp8 row-wise, compiled", "torchao int8 dynamic, compiled", "bf16 + SageAttention2, compiled",
             "torchao fp8 + SageAttention2, compiled"]
    rows = bench_e2e.run_case(bench_e2e.cases(dry=True)[1], [bench_e2e.BY_NAME[n] for n in names],
                              torch.device("cuda"), torch.bfloat16, log=lambda m: None)
    err = {r.variant: r.error for r in rows}
    assert err["torchao fp8 row-wise, compiled"] == "skipped: torchao not importable: pip install torchao"
    assert err["torchao int8 dynamic, compiled"] == err["torchao fp8 row-wise, compiled"]
    assert err["bf16 + SageAttention2, compiled"].startswith("skipped: sageattention not importable: build")
    assert "git clone https://github.com/thu-ml/SageAttention" in err["bf16 + SageAttention2, compiled"]
    assert "pip install --no-build-isolation ." in err["bf16 + SageAttention2, compiled"]
    assert err["torchao fp8 + SageAttention2, compiled"] == err["torchao fp8 row-wise, compiled"]
    assert not started  # no worker (and no bf16 reference) for rows that cannot run
    monkeypatch.setattr(peers, "importable", lambda package: True)
    assert bench_e2e.skip_reason(bench_e2e.BY_NAME[names[0]], torch.device("cpu")).endswith("need a CUDA GPU (dry run)")
    assert bench_e2e.skip_reason(bench_e2e.BY_NAME[names[2]], torch.device("cuda")) is None
