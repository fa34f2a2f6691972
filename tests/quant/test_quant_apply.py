"""quantize_model / calibrate_model / dequantize_model on plain modules and the six diffusers classes."""

import copy

import pytest
import torch
from torch import nn

import quant_tiny_models as tiny
from workbench.quant import (
    AttentionSpec,
    QuantAttention,
    QuantAttnProcessor,
    QuantConfig,
    QuantLinear,
    QuantSpec,
    Rule,
    calibrate_model,
    capturing_attention,
    current_timestep,
    dequantize_model,
    quant_disabled,
    quant_modules,
    quantize_model,
    quantizers,
)

MODELS = list(tiny.BUILDERS)
pytestmark = pytest.mark.filterwarnings("ignore:In CPU autocast")  # diffusers' Mochi rope, not ours


def _rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def _set_explicit(model, value):
    for m in model.modules():
        if isinstance(m, QuantAttention):
            m.explicit = value


@pytest.fixture(scope="module", params=MODELS)
def case(request):
    model, kwargs = tiny.build(request.param)
    return request.param, model, kwargs, tiny.output(model, kwargs)


def test_off_equals_original_and_w8a8_close(case):
    name, model, kwargs, ref = case
    qm = copy.deepcopy(model)
    swapped = quantize_model(qm, QuantConfig.wxay(8, 8, attention_bits=8))
    assert swapped and all(isinstance(m, QuantLinear) for m in swapped.values())
    assert not any(isinstance(m, nn.Linear) for m in qm.modules())
    wrapped = [m for m in qm.modules() if isinstance(getattr(m, "processor", None), QuantAttnProcessor)]
    assert wrapped, f"{name}: no attention module wrapped"
    with quant_disabled(qm):
        torch.testing.assert_close(tiny.output(qm, kwargs), ref, atol=1e-5, rtol=0)
        _set_explicit(qm, True)  # our attention math, every quantizer off
        torch.testing.assert_close(tiny.output(qm, kwargs), ref, atol=1e-5, rtol=0)
        _set_explicit(qm, False)
    assert _rel(tiny.output(qm, kwargs), ref) < 0.05  # W8A8 + 8-bit attention


def test_w8a8_linears_only_and_low_bits(case):
    name, model, kwargs, ref = case
    qm = copy.deepcopy(model)
    quantize_model(qm, QuantConfig.wxay(8, 8))
    assert not any(isinstance(m, QuantAttention) for m in qm.modules())
    err8 = _rel(tiny.output(qm, kwargs), ref)
    assert err8 < 0.05
    quantize_model(qm, QuantConfig.wxay(3, 4))  # re-specs the existing QuantLinears
    assert _rel(tiny.output(qm, kwargs), ref) > err8


def test_attention_capture(case):
    name, model, kwargs, _ = case
    qm = copy.deepcopy(model)
    quantize_model(qm, QuantConfig(weight=None, act=None, attention=AttentionSpec.capture_only()))
    assert not any(isinstance(m, QuantLinear) for m in qm.modules())
    with capturing_attention(qm) as captured:
        tiny.output(qm, kwargs)
    assert captured and all(captured.values())
    for per_call in captured.values():
        for col_mean in per_call:
            assert col_mean.dim() == 3  # (B, H, Sk)
            torch.testing.assert_close(col_mean.sum(-1), torch.ones(col_mean.shape[:2]), atol=1e-4, rtol=0)


def test_calibrate_static_timestep_wise_and_dequantize(case):
    name, model, kwargs, ref = case
    qm = copy.deepcopy(model)
    act = QuantSpec("int8", "tensor", timestep_wise=True, timestep_buckets=4)
    quantize_model(qm, QuantConfig(act=act))

    def run():  # static ranges only cover what calibration saw: include the evaluated timestep (500)
        for t in (100, 500, 900):
            tiny.output(qm, {**kwargs, "timestep": torch.tensor([t, t])})

    names = calibrate_model(qm, run)
    assert names and all(quantizers(qm)[n].calibrated for n in names)
    some = quantizers(qm)[names[0]]
    assert some.bucket_scale.shape[0] == 4
    assert _rel(tiny.output(qm, kwargs), ref) < 0.1
    dequantize_model(qm)
    assert not quant_modules(qm)
    assert not any(isinstance(getattr(m, "processor", None), QuantAttnProcessor) for m in qm.modules())
    torch.testing.assert_close(tiny.output(qm, kwargs), ref, atol=0, rtol=0)


# ---- plain modules ----------------------------------------------------------------------------------


class ToyDiT(nn.Module):
    """Two blocks of linears; records the timestep its linears see."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(8, 32)
        self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 32)) for _ in range(2))
        self.proj_out = nn.Linear(32, 8)
        self.seen: list = []
        self.embed.register_forward_hook(lambda *a: self.seen.append(current_timestep()))

    def forward(self, x, timestep):
        h = self.embed(x)
        for block in self.blocks:
            h = h + block(h)
        return self.proj_out(h)


def test_rules_keep_fp_and_names():
    torch.manual_seed(0)
    model = ToyDiT()
    cfg = QuantConfig(
        keep_fp=["embed", "proj_out"],
        rules=[Rule("blocks.1.*", weight=QuantSpec("int4", "channel")), Rule("blocks.0.2", skip=True)],
    )
    swapped = quantize_model(model, cfg)
    assert sorted(swapped) == ["blocks.0.0", "blocks.1.0", "blocks.1.2"]
    assert isinstance(model.embed, nn.Linear) and isinstance(model.blocks[0][2], nn.Linear)
    assert model.blocks[1][0].weight_quantizer.spec.bits == 4
    assert model.blocks[0][0].weight_quantizer.spec.bits == 8
    # restricting to names only touches those layers
    quantize_model(model, QuantConfig.wxay(3, 8), names=["blocks.0.0"])
    assert model.blocks[0][0].weight_quantizer.spec.bits == 3
    assert model.blocks[1][0].weight_quantizer.spec.bits == 4


def test_timestep_hook_reads_positional_and_keyword():
    torch.manual_seed(0)
    model = ToyDiT()
    quantize_model(model, QuantConfig.wxay(8, 8))
    x = torch.randn(2, 5, 8)
    model(x, torch.tensor([700, 700]))
    model(x, timestep=250)
    assert model.seen == [700.0, 250.0]  # (the hook on `embed` survived its swap for a QuantLinear)
    assert current_timestep() is None


def test_hooks_survive_the_swap_and_their_handles_still_work():
    model = ToyDiT()
    calls = []
    handle = model.blocks[0][0].register_forward_hook(lambda m, i, o: calls.append(type(m).__name__))
    quantize_model(model, QuantConfig.wxay(8, 8))
    model(torch.randn(1, 2, 8), 0)
    dequantize_model(model)
    model(torch.randn(1, 2, 8), 0)
    handle.remove()
    model(torch.randn(1, 2, 8), 0)
    assert calls == ["QuantLinear", "Linear"]


def test_state_dict_round_trip_of_calibrated_model():
    torch.manual_seed(0)
    model = ToyDiT()
    cfg = QuantConfig(
        weight=QuantSpec("int4", "channel", observer="mse"),
        act=QuantSpec("int8", "tensor", timestep_wise=True, timestep_buckets=2),
    )
    quantize_model(model, cfg)
    x = torch.randn(2, 5, 8)
    calibrate_model(model, lambda: (model(x, 100), model(x * 3, 900)))
    out = model(x, 900)
    torch.manual_seed(1)
    fresh = ToyDiT()
    quantize_model(fresh, cfg)
    fresh.load_state_dict(model.state_dict())
    torch.testing.assert_close(fresh(x, 900), out)
    with quant_disabled(fresh):
        assert not torch.allclose(fresh(x, 900), out)


def test_dequantize_restores_original_parameters():
    torch.manual_seed(0)
    model = ToyDiT()
    params = {n: p for n, p in model.named_parameters()}
    x = torch.randn(2, 5, 8)
    ref = model(x, 10)
    quantize_model(model, QuantConfig.wxay(4, 4))
    assert not torch.allclose(model(x, 10), ref)
    dequantize_model(model)
    assert all(p is params[n] for n, p in model.named_parameters())
    torch.testing.assert_close(model(x, 10), ref, rtol=0, atol=0)
