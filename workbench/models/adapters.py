"""Architecture adapters for the supported diffusers video transformers.

An :class:`ArchAdapter` tells the quantization code, for one diffusers transformer class,
where its transformer blocks live, what every ``nn.Linear`` is for (its *role*) and which
attention modules exist.  Everything is expressed as fnmatch-style patterns over the
dotted names of ``model.named_modules()`` (``*`` also matches dots), matched
case-sensitively against the *whole* name; the first matching pattern wins.

The module names were read from the diffusers 0.42.1 sources
(``diffusers/models/transformers/{transformer_wan,cogvideox_transformer_3d,
latte_transformer_3d,transformer_hunyuan_video,transformer_ltx,transformer_mochi}.py``).
Names that only exist after ``fuse_qkv_projections()`` (``to_qkv``, ``to_kv``,
``to_added_qkv``, ``to_added_kv``) are covered too.

Roles (``ROLES``); the part before the first dot is the role *group* (:func:`role_group`):

* ``attn.q`` / ``attn.k`` / ``attn.v`` / ``attn.out``: self or joint attention on the video
  tokens (``attn.qkv`` once fused).
* ``attn.add_q`` / ``attn.add_k`` / ``attn.add_v`` / ``attn.add_out``: text-stream projections
  of a joint (MM-DiT style) attention (``attn.add_qkv`` once fused).
* ``cross.q`` / ``cross.k`` / ``cross.v`` / ``cross.out``: cross-attention, video queries to text
  keys/values (``cross.kv`` or, for LTX, ``cross.qkv`` once fused); ``cross.add_k`` /
  ``cross.add_v``: extra image-conditioning K/V (Wan I2V; ``cross.add_kv`` once fused).
* ``ff.up`` / ``ff.down``: video-stream feed-forward (``up`` may be a gated GEGLU/SwiGLU
  projection of twice the inner width); ``ff_context.up`` / ``ff_context.down``: text-stream
  feed-forward of dual-stream blocks.
* ``attn_ff.out``: output projection of a parallel attention+MLP block; its input is
  ``concat(attention output, MLP activation)`` (Hunyuan single-stream blocks).
* ``refiner.q/k/v/out/qkv`` and ``refiner.ff_up`` / ``refiner.ff_down``: attention and MLP of
  the Hunyuan text token refiner (text tokens only, inside ``context_embedder``).
* ``mod``: adaLN modulation linears producing shift/scale/gate vectors (per block, global,
  and the final ``norm_out``).
* ``embed.time`` (timestep / CogVideoX ``ofs`` MLPs), ``embed.text`` (caption projections,
  Mochi's caption attention pool), ``embed.image`` (Wan I2V), ``embed.guidance`` (Hunyuan).
* ``proj_in``: linear patch / latent input projection; ``proj_out``: final projection.

A linear matching no pattern gets the role ``"other"`` (``OTHER_ROLE``).

Attention kinds (``ATTENTION_KINDS``): ``self`` (video tokens), ``temporal`` (self-attention
along time, Latte), ``cross`` (video queries, text keys/values), ``joint`` (video and text
tokens attend together, MM-DiT style), ``refiner`` (self-attention on text tokens).

Functions: :func:`adapter_for`, :func:`adapter_for_class_name`, :func:`transformer_blocks`
(:func:`named_transformer_blocks`), :func:`linear_layers` (:func:`linear_roles`,
:func:`linears_by_role`, :func:`layer_role`), :func:`attention_modules`
(:func:`attention_kind`).  :data:`TINY_CONFIGS`, :func:`tiny_model` and :func:`tiny_inputs`
build tiny random instances with matching forward inputs for tests and smoke runs.
"""

from __future__ import annotations

import fnmatch
import operator
from collections.abc import Iterable
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Mapping

from torch import nn

from workbench.quant.attention import attention_types, is_attention_module

__all__ = [
    "ADAPTERS",
    "ATTENTION_KINDS",
    "ArchAdapter",
    "OTHER_ROLE",
    "ROLES",
    "ROLE_GROUPS",
    "SUPPORTED_CLASSES",
    "TINY_CONFIGS",
    "UnsupportedModelError",
    "adapter_for",
    "adapter_for_class_name",
    "attention_kind",
    "attention_modules",
    "is_attention_module",
    "token_grid",
    "video_token_slice",
    "layer_role",
    "linear_layers",
    "linear_roles",
    "linears_by_role",
    "named_transformer_blocks",
    "role_group",
    "tiny_inputs",
    "tiny_model",
    "transformer_blocks",
]

OTHER_ROLE = "other"

ROLES: tuple[str, ...] = (
    "attn.q", "attn.k", "attn.v", "attn.out", "attn.qkv",
    "attn.add_q", "attn.add_k", "attn.add_v", "attn.add_out", "attn.add_qkv",
    "cross.q", "cross.k", "cross.v", "cross.out", "cross.kv", "cross.qkv",
    "cross.add_k", "cross.add_v", "cross.add_kv",
    "ff.up", "ff.down",
    "ff_context.up", "ff_context.down",
    "attn_ff.out",
    "refiner.q", "refiner.k", "refiner.v", "refiner.out", "refiner.qkv",
    "refiner.ff_up", "refiner.ff_down",
    "mod",
    "embed.time", "embed.text", "embed.image", "embed.guidance",
    "proj_in",
    "proj_out",
)  # fmt: skip

ROLE_GROUPS: tuple[str, ...] = tuple(dict.fromkeys(r.split(".", 1)[0] for r in ROLES))

ATTENTION_KINDS: tuple[str, ...] = ("self", "temporal", "cross", "joint", "refiner")


class UnsupportedModelError(TypeError):
    """The model is not one of the supported diffusers video transformer classes."""


@dataclass(frozen=True)
class ArchAdapter:
    """Where things live in one diffusers video transformer class.

    Attributes:
        name: short architecture name ("wan", "cogvideox", ...).
        class_name: the diffusers class name, e.g. ``"WanTransformer3DModel"``.
        blocks_attr: attribute of the model holding the main ``nn.ModuleList`` of blocks.
        extra_blocks_attrs: further block lists (Latte's temporal blocks, Hunyuan's
            single-stream blocks), in the order the model runs them.
        interleave_blocks: True when the model alternates between the block lists
            (Latte: spatial 0, temporal 0, spatial 1, ...); False when it runs them one
            list after the other (Hunyuan: all dual-stream, then all single-stream).
        linear_patterns: ``((role, (pattern, ...)), ...)``; first match wins.
        attention_patterns: ``((kind, (pattern, ...)), ...)`` naming the attention modules.
        joint_text_first: in joint attention (one sequence of text and video tokens), whether the text
            tokens come first (CogVideoX) or after the video tokens (HunyuanVideo, Mochi).
        notes: free-form remarks about the architecture.
    """

    name: str
    class_name: str
    blocks_attr: str
    linear_patterns: tuple[tuple[str, tuple[str, ...]], ...]
    attention_patterns: tuple[tuple[str, tuple[str, ...]], ...]
    extra_blocks_attrs: tuple[str, ...] = ()
    interleave_blocks: bool = False
    joint_text_first: bool = False
    notes: str = ""

    def __post_init__(self) -> None:
        for role, pats in self.linear_patterns:
            if role not in ROLES:
                raise ValueError(f"{self.class_name}: unknown linear role {role!r}")
            if isinstance(pats, str):
                raise TypeError(f"{self.class_name}: patterns of {role!r} must be a tuple, not a str")
        for kind, pats in self.attention_patterns:
            if kind not in ATTENTION_KINDS:
                raise ValueError(f"{self.class_name}: unknown attention kind {kind!r}")
            if isinstance(pats, str):
                raise TypeError(f"{self.class_name}: patterns of {kind!r} must be a tuple, not a str")

    @property
    def block_attrs(self) -> tuple[str, ...]:
        """All block-list attributes, main one first."""
        return (self.blocks_attr, *self.extra_blocks_attrs)

    @property
    def roles(self) -> tuple[str, ...]:
        """Roles this adapter can assign, in pattern order."""
        return tuple(dict.fromkeys(role for role, _ in self.linear_patterns))

    def patterns(self, role: str) -> tuple[str, ...]:
        """All linear-name patterns of one role (or of a role group such as ``"attn"``)."""
        return tuple(
            p for r, pats in self.linear_patterns if r == role or role_group(r) == role for p in pats
        )

    @property
    def role_map(self) -> Mapping[str, tuple[str, ...]]:
        """``{role: patterns}`` (read-only)."""
        out: dict[str, tuple[str, ...]] = {}
        for role, pats in self.linear_patterns:
            out[role] = out.get(role, ()) + tuple(pats)
        return MappingProxyType(out)

    @property
    def attention_map(self) -> Mapping[str, tuple[str, ...]]:
        """``{attention kind: patterns}`` (read-only)."""
        out: dict[str, tuple[str, ...]] = {}
        for kind, pats in self.attention_patterns:
            out[kind] = out.get(kind, ()) + tuple(pats)
        return MappingProxyType(out)


# ---------------------------------------------------------------------------
# Pattern helpers
# ---------------------------------------------------------------------------


def _attn(prefix: str, role_prefix: str = "attn") -> list[tuple[str, tuple[str, ...]]]:
    """q/k/v/out (+ fused qkv) of a diffusers attention module at ``prefix``."""
    out = [
        (f"{role_prefix}.q", (f"{prefix}.to_q",)),
        (f"{role_prefix}.k", (f"{prefix}.to_k",)),
        (f"{role_prefix}.v", (f"{prefix}.to_v",)),
        (f"{role_prefix}.out", (f"{prefix}.to_out.0",)),
    ]
    if role_prefix == "cross":
        out.append(("cross.kv", (f"{prefix}.to_kv",)))
    # LTXAttention fuses even its cross-attention into to_qkv
    out.append((f"{role_prefix}.qkv", (f"{prefix}.to_qkv",)))
    return out


def _joint_added(prefix: str) -> list[tuple[str, tuple[str, ...]]]:
    """Text-stream projections of a joint attention at ``prefix``."""
    return [
        ("attn.add_q", (f"{prefix}.add_q_proj",)),
        ("attn.add_k", (f"{prefix}.add_k_proj",)),
        ("attn.add_v", (f"{prefix}.add_v_proj",)),
        ("attn.add_out", (f"{prefix}.to_add_out",)),
        ("attn.add_qkv", (f"{prefix}.to_added_qkv",)),
    ]


def _ff(prefix: str, role_prefix: str = "ff") -> list[tuple[str, tuple[str, ...]]]:
    """diffusers ``FeedForward``: ``net.0.proj`` (up, maybe gated) and ``net.2`` (down)."""
    if role_prefix == "refiner":
        return [("refiner.ff_up", (f"{prefix}.net.0.proj",)), ("refiner.ff_down", (f"{prefix}.net.2",))]
    return [(f"{role_prefix}.up", (f"{prefix}.net.0.proj",)), (f"{role_prefix}.down", (f"{prefix}.net.2",))]


def _timestep_embedding(prefix: str, role: str = "embed.time") -> tuple[str, tuple[str, ...]]:
    """diffusers ``TimestepEmbedding`` (``linear_1``, ``linear_2``, optional ``cond_proj``)."""
    return (role, (f"{prefix}.linear_1", f"{prefix}.linear_2", f"{prefix}.cond_proj"))


def _text_projection(prefix: str) -> tuple[str, tuple[str, ...]]:
    """diffusers ``PixArtAlphaTextProjection`` (``linear_1``, ``linear_2``)."""
    return ("embed.text", (f"{prefix}.linear_1", f"{prefix}.linear_2"))


# ---------------------------------------------------------------------------
# Adapters
# ---------------------------------------------------------------------------

WAN = ArchAdapter(
    name="wan",
    class_name="WanTransformer3DModel",
    blocks_attr="blocks",
    linear_patterns=(
        *_attn("blocks.*.attn1"),
        *_attn("blocks.*.attn2", "cross"),
        ("cross.add_k", ("blocks.*.attn2.add_k_proj",)),
        ("cross.add_v", ("blocks.*.attn2.add_v_proj",)),
        ("cross.add_kv", ("blocks.*.attn2.to_added_kv",)),
        *_ff("blocks.*.ffn"),
        # SiLU -> Linear(dim, 6*dim): the shared modulation vector of all blocks.
        ("mod", ("condition_embedder.time_proj",)),
        _timestep_embedding("condition_embedder.time_embedder"),
        _text_projection("condition_embedder.text_embedder"),
        ("embed.image", (
            "condition_embedder.image_embedder.ff.net.0.proj",
            "condition_embedder.image_embedder.ff.net.2",
        )),
        ("proj_out", ("proj_out",)),
    ),
    attention_patterns=(("self", ("blocks.*.attn1",)), ("cross", ("blocks.*.attn2",))),
    notes=(
        "Patch embedding is a Conv3d (patch_embedding). Block modulation comes from "
        "condition_embedder.time_proj plus per-block scale_shift_table parameters (no per-block "
        "linear). attn2 is cross-attention to text; for I2V it also has add_k_proj/add_v_proj on "
        "image tokens. Attention modules are WanAttention (AttentionModuleMixin)."
    ),
)  # fmt: skip

COGVIDEOX = ArchAdapter(
    name="cogvideox",
    class_name="CogVideoXTransformer3DModel",
    joint_text_first=True,
    blocks_attr="transformer_blocks",
    linear_patterns=(
        *_attn("transformer_blocks.*.attn1"),
        *_ff("transformer_blocks.*.ff"),
        ("mod", ("transformer_blocks.*.norm1.linear", "transformer_blocks.*.norm2.linear", "norm_out.linear")),
        _timestep_embedding("time_embedding"),
        _timestep_embedding("ofs_embedding"),
        ("embed.text", ("patch_embed.text_proj",)),
        # Linear patch embedding only for CogVideoX 1.5 (patch_size_t set); else a Conv2d.
        ("proj_in", ("patch_embed.proj",)),
        ("proj_out", ("proj_out",)),
    ),
    attention_patterns=(("joint", ("transformer_blocks.*.attn1",)),),
    notes=(
        "attn1 is a joint attention: the processor concatenates text and video tokens and uses the "
        "same to_q/to_k/to_v/to_out for both. The FF also runs on the concatenated sequence."
    ),
)  # fmt: skip

LATTE = ArchAdapter(
    name="latte",
    class_name="LatteTransformer3DModel",
    blocks_attr="transformer_blocks",
    extra_blocks_attrs=("temporal_transformer_blocks",),
    interleave_blocks=True,
    linear_patterns=(
        *_attn("transformer_blocks.*.attn1"),
        *_attn("temporal_transformer_blocks.*.attn1"),
        *_attn("transformer_blocks.*.attn2", "cross"),
        *_attn("temporal_transformer_blocks.*.attn2", "cross"),
        *_ff("transformer_blocks.*.ff"),
        *_ff("temporal_transformer_blocks.*.ff"),
        # Only for norm_type other than Latte's "ada_norm_single".
        ("mod", ("*transformer_blocks.*.norm?.linear", "adaln_single.linear")),
        _timestep_embedding("*transformer_blocks.*.norm?.emb.timestep_embedder"),
        _timestep_embedding("adaln_single.emb.timestep_embedder"),
        _text_projection("caption_projection"),
        ("proj_out", ("proj_out",)),
    ),
    attention_patterns=(
        ("self", ("transformer_blocks.*.attn1",)),
        ("cross", ("transformer_blocks.*.attn2", "temporal_transformer_blocks.*.attn2")),
        ("temporal", ("temporal_transformer_blocks.*.attn1",)),
    ),
    notes=(
        "Two block lists run interleaved: spatial transformer_blocks[i] (self + cross attention) "
        "then temporal_transformer_blocks[i] (self-attention over frames). With Latte's "
        "norm_type='ada_norm_single' blocks have no modulation linear (scale_shift_table + the "
        "global adaln_single.linear). Patch embedding is a Conv2d (pos_embed.proj)."
    ),
)  # fmt: skip

_HY_REFINER = "context_embedder.token_refiner.refiner_blocks.*"

HUNYUAN_VIDEO = ArchAdapter(
    name="hunyuan_video",
    class_name="HunyuanVideoTransformer3DModel",
    blocks_attr="transformer_blocks",
    extra_blocks_attrs=("single_transformer_blocks",),
    interleave_blocks=False,
    linear_patterns=(
        # dual-stream blocks
        *_attn("transformer_blocks.*.attn"),
        *_joint_added("transformer_blocks.*.attn"),
        *_ff("transformer_blocks.*.ff"),
        *_ff("transformer_blocks.*.ff_context", "ff_context"),
        # single-stream (parallel) blocks: attention has no to_out (pre_only)
        *_attn("single_transformer_blocks.*.attn"),
        ("ff.up", ("single_transformer_blocks.*.proj_mlp",)),
        ("attn_ff.out", ("single_transformer_blocks.*.proj_out",)),
        (
            "mod",
            (
                "transformer_blocks.*.norm1.linear",
                "transformer_blocks.*.norm1_context.linear",
                "single_transformer_blocks.*.norm.linear",
                f"{_HY_REFINER}.norm_out.linear",
                "norm_out.linear",
            ),
        ),
        # text token refiner (inside the text conditioning path)
        *_attn(f"{_HY_REFINER}.attn", "refiner"),
        *_ff(f"{_HY_REFINER}.ff", "refiner"),
        _timestep_embedding("context_embedder.time_text_embed.timestep_embedder"),
        _text_projection("context_embedder.time_text_embed.text_embedder"),
        ("embed.text", ("context_embedder.proj_in",)),
        _timestep_embedding("time_text_embed.timestep_embedder"),
        _text_projection("time_text_embed.text_embedder"),
        _timestep_embedding("time_text_embed.guidance_embedder", "embed.guidance"),
        ("proj_out", ("proj_out",)),
    ),
    attention_patterns=(
        ("joint", ("transformer_blocks.*.attn", "single_transformer_blocks.*.attn")),
        ("refiner", (f"{_HY_REFINER}.attn",)),
    ),
    notes=(
        "transformer_blocks are dual-stream (separate add_*_proj / to_add_out / ff_context for "
        "text); single_transformer_blocks are single-stream parallel blocks whose attention has "
        "only to_q/to_k/to_v and whose proj_out consumes concat(attn, mlp). The text token "
        "refiner (context_embedder.token_refiner.refiner_blocks) has its own attention + MLP and "
        "is not part of transformer_blocks(). Patch embedding is a Conv3d (x_embedder.proj)."
    ),
)  # fmt: skip

LTX_VIDEO = ArchAdapter(
    name="ltx_video",
    class_name="LTXVideoTransformer3DModel",
    blocks_attr="transformer_blocks",
    linear_patterns=(
        *_attn("transformer_blocks.*.attn1"),
        *_attn("transformer_blocks.*.attn2", "cross"),
        *_ff("transformer_blocks.*.ff"),
        ("mod", ("time_embed.linear",)),
        _timestep_embedding("time_embed.emb.timestep_embedder"),
        _text_projection("caption_projection"),
        ("proj_in", ("proj_in",)),
        ("proj_out", ("proj_out",)),
    ),
    attention_patterns=(("self", ("transformer_blocks.*.attn1",)), ("cross", ("transformer_blocks.*.attn2",))),
    notes=(
        "Input is already patchified: (batch, tokens, in_channels) -> proj_in Linear. Blocks use "
        "scale_shift_table + the global time_embed.linear modulation. Attention modules are "
        "LTXAttention (AttentionModuleMixin)."
    ),
)  # fmt: skip

MOCHI = ArchAdapter(
    name="mochi",
    class_name="MochiTransformer3DModel",
    blocks_attr="transformer_blocks",
    linear_patterns=(
        *_attn("transformer_blocks.*.attn1"),
        *_joint_added("transformer_blocks.*.attn1"),
        *_ff("transformer_blocks.*.ff"),
        *_ff("transformer_blocks.*.ff_context", "ff_context"),
        (
            "mod",
            (
                "transformer_blocks.*.norm1.linear",
                "transformer_blocks.*.norm1_context.linear",
                "transformer_blocks.*.norm1_context.linear_1",  # last block (context_pre_only)
                "norm_out.linear",
            ),
        ),
        _timestep_embedding("time_embed.timestep_embedder"),
        ("embed.text", (
            "time_embed.pooler.to_q",
            "time_embed.pooler.to_kv",
            "time_embed.pooler.to_out",
            "time_embed.caption_proj",
        )),
        ("proj_out", ("proj_out",)),
    ),
    attention_patterns=(("joint", ("transformer_blocks.*.attn1",)),),
    notes=(
        "Asymmetric dual-stream joint attention (MochiAttention, not AttentionModuleMixin): text "
        "stream width is pooled_projection_dim. The last block is context_pre_only: no to_add_out, "
        "no ff_context, and norm1_context is a MochiLayerNormContinuous (linear_1). "
        "time_embed.pooler is an attention pool over text (MochiAttentionPool) whose linears are "
        "labelled embed.text; it is not listed as an attention module. Patch embedding is a Conv2d."
    ),
)  # fmt: skip

ADAPTERS: Mapping[str, ArchAdapter] = MappingProxyType(
    {a.class_name: a for a in (WAN, COGVIDEOX, LATTE, HUNYUAN_VIDEO, LTX_VIDEO, MOCHI)}
)

SUPPORTED_CLASSES: tuple[str, ...] = tuple(ADAPTERS)


# ---------------------------------------------------------------------------
# Lookup
# ---------------------------------------------------------------------------


def _supported_list() -> str:
    return ", ".join(SUPPORTED_CLASSES)


def adapter_for_class_name(class_name: str) -> ArchAdapter:
    """Adapter for a diffusers class name such as ``"WanTransformer3DModel"``."""
    try:
        return ADAPTERS[class_name]
    except KeyError:
        raise UnsupportedModelError(
            f"Unsupported transformer class {class_name!r}. Supported classes: {_supported_list()}."
        ) from None


def adapter_for(model: nn.Module) -> ArchAdapter:
    """The adapter of ``model`` (a supported diffusers transformer or a subclass of one)."""
    if isinstance(model, type):
        raise UnsupportedModelError(f"adapter_for() expects a model instance, got the class {model.__name__}")
    for klass in type(model).__mro__:
        if klass.__name__ in ADAPTERS and klass.__module__.startswith("diffusers"):
            return ADAPTERS[klass.__name__]
    # also accept a same-named class from elsewhere (e.g. a vendored copy)
    if type(model).__name__ in ADAPTERS:
        return ADAPTERS[type(model).__name__]
    hint = ""
    if isinstance(getattr(model, "transformer", None), nn.Module):
        hint = " It has a .transformer attribute: pass that instead."
    raise UnsupportedModelError(
        f"No architecture adapter for {type(model).__module__}.{type(model).__name__}. "
        f"Supported classes: {_supported_list()}.{hint}"
    )


def _resolve(adapter: ArchAdapter | None, model: nn.Module) -> ArchAdapter:
    return adapter if adapter is not None else adapter_for(model)


def _match(name: str, patterns: Iterable[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


# ---------------------------------------------------------------------------
# Blocks
# ---------------------------------------------------------------------------


def named_transformer_blocks(model: nn.Module, adapter: ArchAdapter | None = None) -> list[tuple[str, nn.Module]]:
    """``[(qualified name, block), ...]`` in the order the model's forward runs them."""
    adapter = _resolve(adapter, model)
    lists: list[list[tuple[str, nn.Module]]] = []
    for attr in adapter.block_attrs:
        blocks = operator.attrgetter(attr)(model)
        if blocks is None:
            continue
        lists.append([(f"{attr}.{i}", b) for i, b in enumerate(blocks)])
    if adapter.interleave_blocks:
        out: list[tuple[str, nn.Module]] = []
        longest = max((len(x) for x in lists), default=0)
        for i in range(longest):
            out.extend(x[i] for x in lists if i < len(x))
        return out
    return [item for x in lists for item in x]


def transformer_blocks(model: nn.Module, adapter: ArchAdapter | None = None) -> list[nn.Module]:
    """All transformer blocks of ``model`` in execution order (see ``named_transformer_blocks``)."""
    return [b for _, b in named_transformer_blocks(model, adapter)]


# ---------------------------------------------------------------------------
# Linears
# ---------------------------------------------------------------------------


def role_group(role: str) -> str:
    """``"attn.q"`` -> ``"attn"``; ``"proj_out"`` -> ``"proj_out"``."""
    return role.split(".", 1)[0]


def layer_role(name: str, adapter: ArchAdapter) -> str:
    """Role of the linear called ``name`` (a ``named_modules`` name), or ``"other"``."""
    for role, pats in adapter.linear_patterns:
        if _match(name, pats):
            return role
    return OTHER_ROLE


def _role_selected(role: str, wanted: frozenset[str] | None) -> bool:
    return wanted is None or role in wanted or role_group(role) in wanted


def linear_layers(
    model: nn.Module,
    roles: str | Iterable[str] | None = None,
    adapter: ArchAdapter | None = None,
) -> dict[str, nn.Linear]:
    """``{name: nn.Linear}`` for every linear of ``model``, in module order.

    ``roles`` optionally keeps only some roles; each entry is a role (``"attn.q"``), a role
    group (``"attn"``, ``"ff"``, ``"embed"``) or ``"other"``.
    """
    adapter = _resolve(adapter, model)
    wanted = None if roles is None else frozenset([roles] if isinstance(roles, str) else roles)
    out: dict[str, nn.Linear] = {}
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and _role_selected(layer_role(name, adapter), wanted):
            out[name] = module
    return out


def linear_roles(model: nn.Module, adapter: ArchAdapter | None = None) -> dict[str, str]:
    """``{linear name: role}`` for every linear of ``model``."""
    adapter = _resolve(adapter, model)
    return {n: layer_role(n, adapter) for n, m in model.named_modules() if isinstance(m, nn.Linear)}


def linears_by_role(model: nn.Module, adapter: ArchAdapter | None = None) -> dict[str, dict[str, nn.Linear]]:
    """``{role: {name: nn.Linear}}``; roles in ``ROLES`` order, ``"other"`` last if present."""
    adapter = _resolve(adapter, model)
    grouped: dict[str, dict[str, nn.Linear]] = {}
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            grouped.setdefault(layer_role(name, adapter), {})[name] = module
    order = {r: i for i, r in enumerate((*ROLES, OTHER_ROLE))}
    return dict(sorted(grouped.items(), key=lambda kv: order[kv[0]]))


# ---------------------------------------------------------------------------
# Attention modules
# ---------------------------------------------------------------------------


def attention_kind(name: str, adapter: ArchAdapter) -> str | None:
    """Kind (``self``/``temporal``/``cross``/``joint``/``refiner``) of the attention module
    called ``name``, or None when no attention pattern matches."""
    for kind, pats in adapter.attention_patterns:
        if _match(name, pats):
            return kind
    return None


def attention_modules(
    model: nn.Module,
    kinds: str | Iterable[str] | None = None,
    adapter: ArchAdapter | None = None,
) -> dict[str, nn.Module]:
    """``{name: attention module}`` for the attention modules the adapter lists, in module order.

    ``kinds`` optionally keeps only some attention kinds (see ``ATTENTION_KINDS``).
    """
    adapter = _resolve(adapter, model)
    wanted = None if kinds is None else frozenset([kinds] if isinstance(kinds, str) else kinds)
    types = attention_types()
    out: dict[str, nn.Module] = {}
    for name, module in model.named_modules():
        if not isinstance(module, types):
            continue
        kind = attention_kind(name, adapter)
        if kind is not None and (wanted is None or kind in wanted):
            out[name] = module
    return out


# ---------------------------------------------------------------------------
# Tiny random instances (tests, smoke runs of quantization code)
# ---------------------------------------------------------------------------

# Smallest configs that satisfy each class's constraints (checked against diffusers 0.42.1):
# * Wan: rope splits attention_head_dim into t/h/w parts (h = w = 2 * (head_dim // 6)), all even.
# * CogVideoX: the text length must equal max_text_seq_length (added positional table); the
#   sample_* sizes match the tiny input so the stored positional table is used as is.
# * Latte: caption_projection maps to inner_dim, so cross_attention_dim == inner_dim; the input
#   frame count must equal video_length (temporal positional table).
# * Hunyuan: sum(rope_axes_dim) == attention_head_dim.
# * LTX: cross_attention_dim == inner_dim (caption_projection maps to inner_dim).
# * Mochi: text_embed_dim divisible by 8 (the caption attention pool has 8 heads).
TINY_CONFIGS: Mapping[str, Mapping[str, Any]] = MappingProxyType(
    {
        "WanTransformer3DModel": dict(
            patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=4, out_channels=4,
            text_dim=16, freq_dim=16, ffn_dim=32, num_layers=2, cross_attn_norm=True, rope_max_seq_len=32,
        ),
        "CogVideoXTransformer3DModel": dict(
            num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4, time_embed_dim=8,
            text_embed_dim=16, num_layers=2, sample_width=4, sample_height=4, sample_frames=5, patch_size=2,
            temporal_compression_ratio=4, max_text_seq_length=4,
        ),
        "LatteTransformer3DModel": dict(
            num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4, num_layers=2,
            cross_attention_dim=16, sample_size=4, patch_size=2, norm_type="ada_norm_single",
            num_embeds_ada_norm=1000, caption_channels=16, video_length=2,
        ),
        "HunyuanVideoTransformer3DModel": dict(
            in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8, num_layers=1,
            num_single_layers=1, num_refiner_layers=1, mlp_ratio=2.0, patch_size=1, patch_size_t=1,
            guidance_embeds=True, text_embed_dim=16, pooled_projection_dim=8, rope_axes_dim=(2, 2, 4),
        ),
        "LTXVideoTransformer3DModel": dict(
            in_channels=4, out_channels=4, patch_size=1, patch_size_t=1, num_attention_heads=2,
            attention_head_dim=8, cross_attention_dim=16, num_layers=2, caption_channels=16,
        ),
        "MochiTransformer3DModel": dict(
            patch_size=2, num_attention_heads=2, attention_head_dim=8, num_layers=2, pooled_projection_dim=16,
            in_channels=4, text_embed_dim=16, time_embed_dim=4, max_sequence_length=8,
        ),
    }
)  # fmt: skip


def tiny_model(class_name: str, seed: int = 0, **overrides: Any) -> nn.Module:
    """A tiny randomly initialised instance of a supported class (eval mode).

    All parameters get a seeded random perturbation, so none is left at an all-zero /
    all-one initial value (e.g. Mochi's ``pos_frequencies``). ``overrides`` update the config.
    """
    import diffusers
    import torch

    adapter_for_class_name(class_name)
    config = {**TINY_CONFIGS[class_name], **overrides}
    torch.manual_seed(seed)
    model = getattr(diffusers, class_name)(**config)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen, dtype=torch.float32).to(p.dtype))
    return model.eval()


def tiny_inputs(class_name: str, seed: int = 0, batch_size: int = 1) -> dict[str, Any]:
    """Forward kwargs (without ``return_dict``) matching ``TINY_CONFIGS[class_name]``:
    2 latent frames of 4x4 (LTX: 8 already-patchified tokens) and 3 text tokens
    (CogVideoX: 4, its ``max_text_seq_length``)."""
    import torch

    adapter_for_class_name(class_name)
    gen = torch.Generator().manual_seed(seed)
    b = batch_size

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen)

    t = torch.full((b,), 500, dtype=torch.long)
    if class_name == "WanTransformer3DModel":
        return dict(hidden_states=rand(b, 4, 2, 4, 4), timestep=t, encoder_hidden_states=rand(b, 3, 16))
    if class_name == "CogVideoXTransformer3DModel":  # (batch, frames, channels, height, width)
        return dict(hidden_states=rand(b, 2, 4, 4, 4), encoder_hidden_states=rand(b, 4, 16), timestep=t)
    if class_name == "LatteTransformer3DModel":
        return dict(hidden_states=rand(b, 4, 2, 4, 4), timestep=t, encoder_hidden_states=rand(b, 3, 16))
    if class_name == "HunyuanVideoTransformer3DModel":
        return dict(
            hidden_states=rand(b, 4, 2, 4, 4), timestep=t, encoder_hidden_states=rand(b, 3, 16),
            encoder_attention_mask=torch.ones(b, 3), pooled_projections=rand(b, 8),
            guidance=torch.full((b,), 3500.0),
        )  # fmt: skip
    if class_name == "LTXVideoTransformer3DModel":  # (batch, frames*height*width, channels)
        return dict(
            hidden_states=rand(b, 2 * 2 * 2, 4), encoder_hidden_states=rand(b, 3, 16), timestep=t,
            encoder_attention_mask=torch.ones(b, 3), num_frames=2, height=2, width=2,
        )  # fmt: skip
    if class_name == "MochiTransformer3DModel":
        return dict(
            hidden_states=rand(b, 4, 2, 4, 4), encoder_hidden_states=rand(b, 3, 16), timestep=t,
            encoder_attention_mask=torch.ones(b, 3, dtype=torch.bool),
        )  # fmt: skip
    raise AssertionError(class_name)  # unreachable: adapter_for_class_name checked it


def token_grid(transformer: nn.Module, latent_shape: tuple[int, ...]) -> tuple[int, int, int] | None:
    """(frames, height, width) of the transformer's token grid for a latent (B, C, F, H, W), or None."""
    cfg = getattr(transformer, "config", None)
    p = getattr(cfg, "patch_size", None) if cfg is not None else None
    if isinstance(p, (tuple, list)) and len(p) == 3 and len(latent_shape) == 5:
        f, h, w = latent_shape[2:]
        if f % p[0] == 0 and h % p[1] == 0 and w % p[2] == 0:
            return f // p[0], h // p[1], w // p[2]
    return None


def video_token_slice(adapter: ArchAdapter, attended: int, video: int) -> slice:
    """Where the `video` tokens sit among the `attended` tokens of a self / joint attention: all of them
    when the lengths match, else the end or the start of the joint sequence (`joint_text_first`)."""
    if attended == video:
        return slice(0, video)
    if attended < video:
        raise ValueError(f"an attention over {attended} tokens cannot cover {video} video tokens")
    return slice(attended - video, attended) if adapter.joint_text_first else slice(0, video)
