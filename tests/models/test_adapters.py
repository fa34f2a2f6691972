"""Tests for workbench.models.adapters on tiny random instances of every supported class."""

from __future__ import annotations

import dataclasses
import warnings
from collections import Counter

import pytest
import torch
from torch import nn

import diffusers
from workbench.models.adapters import (
    ADAPTERS,
    ATTENTION_KINDS,
    OTHER_ROLE,
    ROLE_GROUPS,
    ROLES,
    SUPPORTED_CLASSES,
    TINY_CONFIGS,
    ArchAdapter,
    UnsupportedModelError,
    adapter_for,
    adapter_for_class_name,
    attention_kind,
    attention_modules,
    is_attention_module,
    layer_role,
    linear_layers,
    linear_roles,
    linears_by_role,
    named_transformer_blocks,
    role_group,
    tiny_inputs,
    tiny_model,
    transformer_blocks,
)

EXPECTED_CLASSES = (
    "WanTransformer3DModel",
    "CogVideoXTransformer3DModel",
    "LatteTransformer3DModel",
    "HunyuanVideoTransformer3DModel",
    "LTXVideoTransformer3DModel",
    "MochiTransformer3DModel",
)

# Role counts of the TINY_CONFIGS models, worked out by hand from the diffusers 0.42.1 sources.
EXPECTED_ROLE_COUNTS: dict[str, dict[str, int]] = {
    "WanTransformer3DModel": {  # 2 blocks
        "attn.q": 2, "attn.k": 2, "attn.v": 2, "attn.out": 2,
        "cross.q": 2, "cross.k": 2, "cross.v": 2, "cross.out": 2,
        "ff.up": 2, "ff.down": 2,
        "mod": 1, "embed.time": 2, "embed.text": 2, "proj_out": 1,
    },
    "CogVideoXTransformer3DModel": {  # 2 blocks, norm1/norm2 linears each + norm_out
        "attn.q": 2, "attn.k": 2, "attn.v": 2, "attn.out": 2, "ff.up": 2, "ff.down": 2,
        "mod": 5, "embed.time": 2, "embed.text": 1, "proj_out": 1,
    },
    "LatteTransformer3DModel": {  # 2 spatial + 2 temporal blocks
        "attn.q": 4, "attn.k": 4, "attn.v": 4, "attn.out": 4,
        "cross.q": 2, "cross.k": 2, "cross.v": 2, "cross.out": 2,
        "ff.up": 4, "ff.down": 4,
        "mod": 1, "embed.time": 2, "embed.text": 2, "proj_out": 1,
    },
    "HunyuanVideoTransformer3DModel": {  # 1 dual + 1 single block + 1 refiner block
        "attn.q": 2, "attn.k": 2, "attn.v": 2, "attn.out": 1,
        "attn.add_q": 1, "attn.add_k": 1, "attn.add_v": 1, "attn.add_out": 1,
        "ff.up": 2, "ff.down": 1, "ff_context.up": 1, "ff_context.down": 1, "attn_ff.out": 1,
        "refiner.q": 1, "refiner.k": 1, "refiner.v": 1, "refiner.out": 1,
        "refiner.ff_up": 1, "refiner.ff_down": 1,
        "mod": 5, "embed.time": 4, "embed.text": 5, "embed.guidance": 2, "proj_out": 1,
    },
    "LTXVideoTransformer3DModel": {  # 2 blocks
        "attn.q": 2, "attn.k": 2, "attn.v": 2, "attn.out": 2,
        "cross.q": 2, "cross.k": 2, "cross.v": 2, "cross.out": 2,
        "ff.up": 2, "ff.down": 2,
        "mod": 1, "embed.time": 2, "embed.text": 2, "proj_in": 1, "proj_out": 1,
    },
    "MochiTransformer3DModel": {  # 2 blocks, the last one context_pre_only
        "attn.q": 2, "attn.k": 2, "attn.v": 2, "attn.out": 2,
        "attn.add_q": 2, "attn.add_k": 2, "attn.add_v": 2, "attn.add_out": 1,
        "ff.up": 2, "ff.down": 2, "ff_context.up": 1, "ff_context.down": 1,
        "mod": 5, "embed.time": 2, "embed.text": 4, "proj_out": 1,
    },
}  # fmt: skip

SPOT_CHECKS: dict[str, dict[str, str]] = {
    "WanTransformer3DModel": {
        "blocks.0.attn1.to_q": "attn.q",
        "blocks.1.attn2.to_k": "cross.k",
        "blocks.0.attn2.to_out.0": "cross.out",
        "blocks.1.ffn.net.0.proj": "ff.up",
        "blocks.1.ffn.net.2": "ff.down",
        "condition_embedder.time_proj": "mod",
        "condition_embedder.time_embedder.linear_1": "embed.time",
        "condition_embedder.text_embedder.linear_2": "embed.text",
        "proj_out": "proj_out",
    },
    "CogVideoXTransformer3DModel": {
        "transformer_blocks.1.attn1.to_v": "attn.v",
        "transformer_blocks.0.norm2.linear": "mod",
        "norm_out.linear": "mod",
        "patch_embed.text_proj": "embed.text",
        "time_embedding.linear_2": "embed.time",
    },
    "LatteTransformer3DModel": {
        "temporal_transformer_blocks.1.attn1.to_q": "attn.q",
        "transformer_blocks.0.attn2.to_v": "cross.v",
        "temporal_transformer_blocks.0.ff.net.2": "ff.down",
        "adaln_single.linear": "mod",
        "adaln_single.emb.timestep_embedder.linear_1": "embed.time",
        "caption_projection.linear_1": "embed.text",
    },
    "HunyuanVideoTransformer3DModel": {
        "transformer_blocks.0.attn.add_q_proj": "attn.add_q",
        "transformer_blocks.0.attn.to_add_out": "attn.add_out",
        "transformer_blocks.0.ff_context.net.0.proj": "ff_context.up",
        "transformer_blocks.0.norm1_context.linear": "mod",
        "single_transformer_blocks.0.attn.to_k": "attn.k",
        "single_transformer_blocks.0.proj_mlp": "ff.up",
        "single_transformer_blocks.0.proj_out": "attn_ff.out",
        "single_transformer_blocks.0.norm.linear": "mod",
        "context_embedder.token_refiner.refiner_blocks.0.attn.to_q": "refiner.q",
        "context_embedder.token_refiner.refiner_blocks.0.ff.net.2": "refiner.ff_down",
        "context_embedder.token_refiner.refiner_blocks.0.norm_out.linear": "mod",
        "context_embedder.proj_in": "embed.text",
        "time_text_embed.guidance_embedder.linear_1": "embed.guidance",
        "proj_out": "proj_out",
    },
    "LTXVideoTransformer3DModel": {
        "proj_in": "proj_in",
        "transformer_blocks.0.attn2.to_q": "cross.q",
        "time_embed.linear": "mod",
        "time_embed.emb.timestep_embedder.linear_2": "embed.time",
        "caption_projection.linear_2": "embed.text",
    },
    "MochiTransformer3DModel": {
        "transformer_blocks.0.attn1.add_k_proj": "attn.add_k",
        "transformer_blocks.0.attn1.to_add_out": "attn.add_out",
        "transformer_blocks.1.norm1_context.linear_1": "mod",
        "transformer_blocks.0.ff_context.net.2": "ff_context.down",
        "time_embed.pooler.to_kv": "embed.text",
        "time_embed.caption_proj": "embed.text",
    },
}

EXPECTED_BLOCKS = {
    "WanTransformer3DModel": ["blocks.0", "blocks.1"],
    "CogVideoXTransformer3DModel": ["transformer_blocks.0", "transformer_blocks.1"],
    "LatteTransformer3DModel": [
        "transformer_blocks.0",
        "temporal_transformer_blocks.0",
        "transformer_blocks.1",
        "temporal_transformer_blocks.1",
    ],
    "HunyuanVideoTransformer3DModel": ["transformer_blocks.0", "single_transformer_blocks.0"],
    "LTXVideoTransformer3DModel": ["transformer_blocks.0", "transformer_blocks.1"],
    "MochiTransformer3DModel": ["transformer_blocks.0", "transformer_blocks.1"],
}

EXPECTED_ATTENTION = {
    "WanTransformer3DModel": {
        "blocks.0.attn1": "self", "blocks.0.attn2": "cross", "blocks.1.attn1": "self", "blocks.1.attn2": "cross",
    },
    "CogVideoXTransformer3DModel": {"transformer_blocks.0.attn1": "joint", "transformer_blocks.1.attn1": "joint"},
    "LatteTransformer3DModel": {
        "transformer_blocks.0.attn1": "self", "transformer_blocks.0.attn2": "cross",
        "transformer_blocks.1.attn1": "self", "transformer_blocks.1.attn2": "cross",
        "temporal_transformer_blocks.0.attn1": "temporal", "temporal_transformer_blocks.1.attn1": "temporal",
    },
    "HunyuanVideoTransformer3DModel": {
        "context_embedder.token_refiner.refiner_blocks.0.attn": "refiner",
        "transformer_blocks.0.attn": "joint",
        "single_transformer_blocks.0.attn": "joint",
    },
    "LTXVideoTransformer3DModel": {
        "transformer_blocks.0.attn1": "self", "transformer_blocks.0.attn2": "cross",
        "transformer_blocks.1.attn1": "self", "transformer_blocks.1.attn2": "cross",
    },
    "MochiTransformer3DModel": {"transformer_blocks.0.attn1": "joint", "transformer_blocks.1.attn1": "joint"},
}  # fmt: skip

# Other variants of the same classes, to check the patterns beyond the tiny defaults.
VARIANTS = {
    "wan_i2v": ("WanTransformer3DModel", dict(image_dim=8, added_kv_proj_dim=8)),
    "cogvideox_1.5": (
        "CogVideoXTransformer3DModel",
        dict(patch_size_t=2, ofs_embed_dim=8, use_rotary_positional_embeddings=True),
    ),
    "hunyuan_token_replace": ("HunyuanVideoTransformer3DModel", dict(image_condition_type="token_replace")),
    "latte_ada_norm": ("LatteTransformer3DModel", dict(norm_type="ada_norm")),
}

BLOCK_GROUPS = {"attn", "cross", "ff", "ff_context", "attn_ff", "mod"}
OUTSIDE_GROUPS = {"embed", "mod", "proj_in", "proj_out", "refiner"}


@pytest.fixture(scope="module")
def models() -> dict[str, nn.Module]:
    return {name: tiny_model(name) for name in EXPECTED_CLASSES}


def run(model: nn.Module, class_name: str) -> torch.Tensor:
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Mochi: "In CPU autocast, but the target dtype is not supported"
        return model(**tiny_inputs(class_name), return_dict=False)[0]


def test_supported_classes_exist_in_diffusers():
    assert SUPPORTED_CLASSES == EXPECTED_CLASSES
    for name in SUPPORTED_CLASSES:
        cls = getattr(diffusers, name)
        assert issubclass(cls, nn.Module)
        assert ADAPTERS[name].class_name == name
        assert set(TINY_CONFIGS) == set(SUPPORTED_CLASSES)
    assert len({a.name for a in ADAPTERS.values()}) == len(ADAPTERS)


@pytest.mark.parametrize("class_name", EXPECTED_CLASSES)
def test_adapter_for(models, class_name):
    model = models[class_name]
    adapter = adapter_for(model)
    assert isinstance(adapter, ArchAdapter)
    assert adapter.class_name == class_name == type(model).__name__
    assert adapter is adapter_for_class_name(class_name)
    assert isinstance(getattr(model, adapter.blocks_attr), nn.ModuleList)
    for attr in adapter.extra_blocks_attrs:
        assert isinstance(getattr(model, attr), nn.ModuleList)


@pytest.mark.parametrize("class_name", EXPECTED_CLASSES)
def test_every_linear_has_the_expected_role(models, class_name):
    model = models[class_name]
    roles = linear_roles(model)
    assert roles, "no linears found"
    assert [n for n, r in roles.items() if r == OTHER_ROLE] == []
    assert set(roles.values()) <= set(ROLES)
    assert dict(Counter(roles.values())) == EXPECTED_ROLE_COUNTS[class_name]
    for name, role in SPOT_CHECKS[class_name].items():
        assert roles[name] == role, name
    # all linears in the model are returned, and only linears
    all_linears = {n for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    assert set(linear_layers(model)) == all_linears
    assert all(isinstance(m, nn.Linear) for m in linear_layers(model).values())


@pytest.mark.parametrize("class_name", EXPECTED_CLASSES)
def test_linears_inside_and_outside_blocks(models, class_name):
    """Block linears are attention/FF/modulation; outside them only embeddings/projections."""
    model = models[class_name]
    block_names = [n for n, _ in named_transformer_blocks(model)]
    for name, role in linear_roles(model).items():
        inside = any(name.startswith(b + ".") for b in block_names)
        allowed = BLOCK_GROUPS if inside else OUTSIDE_GROUPS
        assert role_group(role) in allowed, (name, role)


@pytest.mark.parametrize("class_name", EXPECTED_CLASSES)
def test_blocks_in_execution_order(models, class_name):
    model = models[class_name]
    named = named_transformer_blocks(model)
    assert [n for n, _ in named] == EXPECTED_BLOCKS[class_name]
    modules = dict(model.named_modules())
    assert all(modules[n] is b for n, b in named)
    assert transformer_blocks(model) == [b for _, b in named]

    called: list[str] = []
    handles = [b.register_forward_pre_hook(lambda m, a, n=n: called.append(n)) for n, b in named]
    try:
        run(model, class_name)
    finally:
        for h in handles:
            h.remove()
    assert called == EXPECTED_BLOCKS[class_name]


@pytest.mark.parametrize("class_name", EXPECTED_CLASSES)
def test_attention_modules_and_kinds(models, class_name):
    model = models[class_name]
    adapter = adapter_for(model)
    found = attention_modules(model)
    assert {n: attention_kind(n, adapter) for n in found} == EXPECTED_ATTENTION[class_name]
    # every diffusers attention module of the model is listed
    assert {n for n, m in model.named_modules() if is_attention_module(m)} == set(found)
    assert set(attention_kind(n, adapter) for n in found) <= set(ATTENTION_KINDS)
    for kind in set(EXPECTED_ATTENTION[class_name].values()):
        sub = attention_modules(model, kinds=kind)
        assert set(sub) == {n for n, k in EXPECTED_ATTENTION[class_name].items() if k == kind}

    # the linear roles agree with the attention kinds
    roles = linear_roles(model)
    prefix = {"self": "attn", "temporal": "attn", "joint": "attn", "cross": "cross", "refiner": "refiner"}
    for name, module in found.items():
        p = prefix[attention_kind(name, adapter)]
        assert roles[f"{name}.to_q"] == f"{p}.q"
        assert roles[f"{name}.to_k"] == f"{p}.k"
        assert roles[f"{name}.to_v"] == f"{p}.v"
        if isinstance(getattr(module, "to_out", None), nn.ModuleList):
            assert roles[f"{name}.to_out.0"] == f"{p}.out"
        for attr, role in (("add_q_proj", "attn.add_q"), ("add_k_proj", "attn.add_k"), ("add_v_proj", "attn.add_v")):
            if isinstance(getattr(module, attr, None), nn.Linear):
                assert roles[f"{name}.{attr}"] == role


@pytest.mark.parametrize("class_name", EXPECTED_CLASSES)
def test_attention_kinds_match_runtime_behaviour(models, class_name):
    """self/temporal/refiner get no encoder states; cross gets them and returns one tensor;
    joint gets them and returns (video, text) or runs on the concatenation."""
    model = models[class_name]
    adapter = adapter_for(model)
    seen: dict[str, tuple[bool, bool]] = {}

    def hook(name):
        def fn(module, args, kwargs, output):
            ehs = kwargs.get("encoder_hidden_states", args[1] if len(args) > 1 else None)
            seen[name] = (ehs is not None, isinstance(output, tuple))

        return fn

    handles = [
        m.register_forward_hook(hook(n), with_kwargs=True) for n, m in attention_modules(model).items()
    ]
    try:
        run(model, class_name)
    finally:
        for h in handles:
            h.remove()
    assert set(seen) == set(EXPECTED_ATTENTION[class_name]), "some attention module never ran"
    for name, (has_ehs, returns_tuple) in seen.items():
        kind = attention_kind(name, adapter)
        if kind in ("self", "temporal", "refiner"):
            assert not has_ehs, name
        elif kind == "cross":
            assert has_ehs and not returns_tuple, name
        else:  # joint: CogVideoX/Hunyuan/Mochi processors return (video, text)
            assert has_ehs and returns_tuple, name


@pytest.mark.parametrize("class_name", EXPECTED_CLASSES)
def test_every_linear_runs_in_forward(models, class_name):
    """Sanity: the tiny inputs exercise every linear (so forward-equality tests cover them)."""
    model = models[class_name]
    called: set[str] = set()
    handles = [
        m.register_forward_hook(lambda mod, a, o, n=n: called.add(n)) for n, m in linear_layers(model).items()
    ]
    try:
        out = run(model, class_name)
    finally:
        for h in handles:
            h.remove()
    assert torch.isfinite(out).all()
    assert set(linear_layers(model)) - called == set()


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_variants_are_fully_labelled(variant):
    class_name, overrides = VARIANTS[variant]
    model = tiny_model(class_name, **overrides)
    roles = linear_roles(model)
    assert [n for n, r in roles.items() if r == OTHER_ROLE] == []
    if variant == "wan_i2v":
        assert roles["blocks.0.attn2.add_k_proj"] == "cross.add_k"
        assert roles["blocks.1.attn2.add_v_proj"] == "cross.add_v"
        assert roles["condition_embedder.image_embedder.ff.net.0.proj"] == "embed.image"
    if variant == "cogvideox_1.5":
        assert roles["patch_embed.proj"] == "proj_in"
        assert roles["ofs_embedding.linear_1"] == "embed.time"
    if variant == "hunyuan_token_replace":
        assert roles["transformer_blocks.0.norm1.linear"] == "mod"
    if variant == "latte_ada_norm":
        assert roles["transformer_blocks.0.norm1.linear"] == "mod"
        assert roles["transformer_blocks.1.norm2.linear"] == "mod"  # temporal blocks have no norm2
        assert roles["temporal_transformer_blocks.1.norm1.linear"] == "mod"


@pytest.mark.parametrize(
    "class_name", ["WanTransformer3DModel", "CogVideoXTransformer3DModel", "LTXVideoTransformer3DModel"]
)
def test_fused_projections_are_labelled(class_name):
    model = tiny_model(class_name)
    model.fuse_qkv_projections()
    roles = linear_roles(model)
    assert [n for n, r in roles.items() if r == OTHER_ROLE] == []
    fused = {n: r for n, r in roles.items() if n.endswith(("to_qkv", "to_kv"))}
    assert fused, "fuse_qkv_projections created no fused linear"
    assert set(fused.values()) <= {"attn.qkv", "cross.kv", "cross.qkv"}


def test_linear_layers_role_filters(models):
    model = models["HunyuanVideoTransformer3DModel"]
    roles = linear_roles(model)
    q = linear_layers(model, roles="attn.q")
    assert set(q) == {n for n, r in roles.items() if r == "attn.q"} and len(q) == 2
    attn = linear_layers(model, roles="attn")  # a role group
    assert set(attn) == {n for n, r in roles.items() if role_group(r) == "attn"}
    mixed = linear_layers(model, roles=["ff.up", "embed"])
    assert set(mixed) == {n for n, r in roles.items() if r == "ff.up" or role_group(r) == "embed"}
    assert linear_layers(model, roles=[]) == {}
    # ordered like named_modules
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    assert list(linear_layers(model)) == names


def test_linears_by_role_groups_everything(models):
    model = models["MochiTransformer3DModel"]
    grouped = linears_by_role(model)
    order = [r for r in ROLES if r in grouped]
    assert list(grouped) == order
    flat = {n: m for group in grouped.values() for n, m in group.items()}
    assert flat.keys() == linear_layers(model).keys()
    assert {r: len(d) for r, d in grouped.items()} == EXPECTED_ROLE_COUNTS["MochiTransformer3DModel"]


def test_layer_role_and_patterns():
    wan = adapter_for_class_name("WanTransformer3DModel")
    assert layer_role("blocks.17.attn1.to_q", wan) == "attn.q"
    assert layer_role("blocks.17.attn2.to_q", wan) == "cross.q"
    assert layer_role("something.else", wan) == OTHER_ROLE
    assert layer_role("Blocks.0.attn1.to_q", wan) == OTHER_ROLE  # case-sensitive
    assert "blocks.*.attn1.to_q" in wan.patterns("attn.q")
    assert set(wan.patterns("cross")) >= {"blocks.*.attn2.to_q", "blocks.*.attn2.to_k"}
    assert wan.role_map["proj_out"] == ("proj_out",)
    assert wan.attention_map["cross"] == ("blocks.*.attn2",)
    assert set(wan.roles) <= set(ROLES)
    hy = adapter_for_class_name("HunyuanVideoTransformer3DModel")
    # single-stream proj_out must not be taken for the final projection (and vice versa)
    assert layer_role("single_transformer_blocks.3.proj_out", hy) == "attn_ff.out"
    assert layer_role("proj_out", hy) == "proj_out"
    assert layer_role("single_transformer_blocks.3.attn.to_q", hy) == "attn.q"
    assert hy.block_attrs == ("transformer_blocks", "single_transformer_blocks")
    assert role_group("attn.q") == "attn" and role_group("proj_out") == "proj_out"
    assert set(ROLE_GROUPS) == {role_group(r) for r in ROLES}


def test_adapter_is_frozen_and_validated():
    wan = adapter_for_class_name("WanTransformer3DModel")
    with pytest.raises(dataclasses.FrozenInstanceError):
        wan.blocks_attr = "x"  # type: ignore[misc]
    hash(wan)
    with pytest.raises(ValueError, match="unknown linear role"):
        ArchAdapter("x", "X", "blocks", linear_patterns=(("attn.query", ("a",)),), attention_patterns=())
    with pytest.raises(ValueError, match="unknown attention kind"):
        ArchAdapter("x", "X", "blocks", linear_patterns=(), attention_patterns=(("global", ("a",)),))
    with pytest.raises(TypeError):
        bad = (("attn.q", "a.to_q"),)  # a str where a tuple of patterns is expected
        ArchAdapter("x", "X", "blocks", linear_patterns=bad, attention_patterns=())  # type: ignore[arg-type]


def test_adapter_for_errors():
    with pytest.raises(UnsupportedModelError) as info:
        adapter_for(nn.Linear(2, 2))
    message = str(info.value)
    assert "torch.nn.modules.linear.Linear" in message
    for name in EXPECTED_CLASSES:
        assert name in message

    class Holder(nn.Module):
        def __init__(self):
            super().__init__()
            self.transformer = nn.Linear(2, 2)

    with pytest.raises(UnsupportedModelError, match="pass that instead"):
        adapter_for(Holder())
    with pytest.raises(UnsupportedModelError, match="instance"):
        adapter_for(diffusers.WanTransformer3DModel)  # the class, not an instance
    with pytest.raises(UnsupportedModelError, match="UNet2DConditionModel.*Supported classes"):
        adapter_for_class_name("UNet2DConditionModel")
    assert issubclass(UnsupportedModelError, TypeError)


def test_adapter_for_subclass():
    class MyWan(diffusers.WanTransformer3DModel):
        pass

    model = MyWan(**TINY_CONFIGS["WanTransformer3DModel"])
    assert adapter_for(model).class_name == "WanTransformer3DModel"
    assert len(transformer_blocks(model)) == 2


def test_tiny_model_is_deterministic_and_has_no_zero_params():
    a = tiny_model("MochiTransformer3DModel", seed=3)
    b = tiny_model("MochiTransformer3DModel", seed=3)
    for (na, pa), (nb, pb) in zip(a.named_parameters(), b.named_parameters()):
        assert na == nb and torch.equal(pa, pb)
    assert a.pos_frequencies.abs().sum() > 0  # zero-initialised by diffusers
    with pytest.raises(UnsupportedModelError):
        tiny_inputs("UNet2DConditionModel")
