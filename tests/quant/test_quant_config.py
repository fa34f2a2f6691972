"""QuantConfig: strict validation, resolution of rules and round trips."""

import pytest
import yaml

from workbench.quant import AttentionSpec, QuantConfig, QuantSpec, Rule


def _full_dict():
    return {
        "weight": {"format": "int4", "granularity": "group", "group_size": 32, "observer": "mse"},
        "act": {"bits": 6},
        "rules": [
            {"pattern": "*.ff.*", "weight": {"bits": 8}},
            {"pattern": "*.attn1.to_out.0", "weight_only": True},
            {"pattern": "proj_out", "skip": True},
        ],
        "attention": {"q": {"bits": 6}, "p": None},
        "keep_fp": ["patch_embed*", "time_embed*"],
        "timestep_arg": "t",
        "max_timestep": 1.0,
    }


def test_from_dict_resolves_shorthands():
    cfg = QuantConfig.from_dict(_full_dict())
    assert str(cfg.weight.format) == "int4" and cfg.weight.group_size == 32 and cfg.weight.observer == "mse"
    assert str(cfg.act.format) == "int6" and cfg.act.dynamic and cfg.act.granularity == "token"
    assert str(cfg.rules[0].weight.format) == "int8" and cfg.rules[0].weight.granularity == "group"
    assert str(cfg.attention.q.format) == "int6" and cfg.attention.p is None
    assert cfg.attention.k == AttentionSpec().k


def test_round_trip_through_yaml():
    cfg = QuantConfig.from_dict(_full_dict())
    text = yaml.safe_dump(cfg.to_dict())
    assert QuantConfig.from_dict(yaml.safe_load(text)) == cfg
    for c in (QuantConfig(), QuantConfig.wxay(4, 8, attention_bits=8), QuantConfig(weight=None, act=None)):
        assert QuantConfig.from_dict(c.to_dict()) == c


def test_resolution_order():
    cfg = QuantConfig.from_dict(_full_dict())
    w, a = cfg.specs_for("blocks.0.ff.net.2")
    assert w.bits == 8 and a.bits == 6
    w, a = cfg.specs_for("blocks.0.attn1.to_out.0")
    assert w.bits == 4 and a is None
    assert cfg.specs_for("proj_out") is None
    assert cfg.specs_for("patch_embed.proj") is None
    assert cfg.attention_for("time_embedding") is None  # keep_fp
    assert cfg.attention_for("blocks.0.attn1") is cfg.attention


def test_wxay_shorthand():
    cfg = QuantConfig.wxay(w_bits=4, a_bits=8, keep_fp=["proj_out"])
    assert cfg.weight == QuantSpec("int4", "channel")
    assert cfg.act == QuantSpec("int8", "token", dynamic=True)
    assert cfg.attention is None and cfg.keep_fp == ["proj_out"]
    assert QuantConfig.wxay(8, None).act is None
    assert QuantConfig.wxay(4, 6, attention_bits=6).attention.v.bits == 6


@pytest.mark.parametrize(
    "patch, match",
    [
        ({"wieght": {}}, r"unknown field 'wieght' in quant config; allowed fields: \['weight', 'act'"),
        ({"weight": {"bitz": 4}}, r"unknown field 'bitz' in weight; allowed fields: \['format', 'granularity'"),
        ({"rules": [{"pattern": "x", "wieght": {}}]}, r"unknown field 'wieght' in rules\[0\]"),
        ({"rules": [{"weight": {}}]}, "needs a 'pattern'"),
        ({"attention": {"qq": {}}}, r"unknown field 'qq' in attention; allowed fields: \['q', 'k', 'v', 'p', 'kernel', 'kernel_min_tokens'\]"),
        ({"weight": {"bits": 9}}, r"weight: bits must be in 2\.\.8"),
        ({"weight": {"format": "int1"}}, r"2\.\.8"),
        ({"act": {"bits": 16}}, r"act: bits must be in 2\.\.8"),
        ({"weight": {"granularity": "row"}}, r"choose one of \['tensor', 'channel', 'token', 'group'\]"),
        ({"weight": {"observer": "kl"}}, r"choose one of \['minmax', 'percentile', 'mse'\]"),
        ({"act": {"granularity": "token", "dynamic": False}}, "need dynamic=True"),
        ({"act": {"granularity": "channel"}}, "'channel' granularity is for weights"),
        ({"keep_fp": "proj_out"}, "list of fnmatch patterns"),
        ({"weight": {"format": "fp8_e4m3", "bits": 4}}, "8-bit symmetric"),
    ],
)
def test_validation_errors(patch, match):
    with pytest.raises(ValueError, match=match):
        QuantConfig.from_dict(patch)


def test_rule_dataclass_direct():
    cfg = QuantConfig(rules=[Rule("a*", weight=QuantSpec("int3", "channel")), Rule("ab", skip=True)])
    assert cfg.specs_for("ax")[0].bits == 3
    assert cfg.specs_for("ab") is None
    assert cfg.specs_for("b")[0].bits == 8
