"""`QuantConfig`: which layers get which weight / activation / attention quantization.

Plain data with strict validation, so a recipe YAML with a typo fails loudly and names the field.
Resolution for a linear layer called `name`: `keep_fp` patterns win (full precision), then the
defaults, then every matching rule in order (later rules override earlier ones).
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field, fields
from typing import Any

from .attention import ATTENTION_PARTS, AttentionSpec
from .formats import QuantFormat
from .quantizer import QuantSpec


def _check_keys(d: Any, cls: type, where: str) -> dict:
    if not isinstance(d, dict):
        raise ValueError(f"{where} must be a mapping, got {type(d).__name__}")
    allowed = [f.name for f in fields(cls)]
    if cls is QuantSpec:
        allowed += ["bits", "symmetric"]
    unknown = [k for k in d if k not in allowed]
    if unknown:
        raise ValueError(f"unknown field {unknown[0]!r} in {where}; allowed fields: {allowed}")
    return d


def spec_from_dict(d: dict[str, Any] | str, base: QuantSpec | None = None, where: str = "spec") -> QuantSpec:
    """A QuantSpec from a mapping (or a format string such as "int4"); unset fields come from `base`.

    Besides the dataclass fields, `bits` / `symmetric` adjust the base format (e.g. {"bits": 4}).
    """
    if isinstance(d, str):
        d = {"format": d}
    d = dict(_check_keys(d, QuantSpec, where))
    base = base or QuantSpec()
    try:
        fmt = QuantFormat.parse(d.pop("format", base.format))
        if "bits" in d or "symmetric" in d:
            fmt = QuantFormat(fmt.kind, d.pop("bits", fmt.bits), d.pop("symmetric", fmt.symmetric))
        if d.get("fixed_range") is not None:
            d["fixed_range"] = tuple(d["fixed_range"])
        return base.with_(format=fmt, **d)
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from None


def attention_from_dict(d: dict[str, Any], where: str = "attention") -> AttentionSpec:
    """An AttentionSpec from {q, k, v, p: spec mapping or None}; missing parts keep the defaults. With
    `kernel: fp8 | fp16` (and optionally `kernel_min_tokens`) the parts default to None: the kernel quantizes."""
    _check_keys(d, AttentionSpec, where)
    kernel = d.get("kernel")
    default = AttentionSpec() if kernel is None else AttentionSpec.kernel_only(str(kernel))
    parts: dict[str, Any] = {}
    for name, value in d.items():
        if name in ATTENTION_PARTS:
            base = getattr(AttentionSpec(), name) or QuantSpec()
            parts[name] = None if value is None else spec_from_dict(value, base, f"{where}.{name}")
        elif name == "kernel_min_tokens":
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"{where}.kernel_min_tokens must be an integer, got {value!r}")
            parts[name] = value
        else:
            parts[name] = value
    try:
        return AttentionSpec(**{f.name: parts.get(f.name, getattr(default, f.name)) for f in fields(AttentionSpec)})
    except ValueError as exc:
        raise ValueError(f"{where}: {exc}") from None


@dataclass(frozen=True)
class Rule:
    """Overrides for linear layers whose name matches `pattern` (fnmatch): new weight / act specs,
    `weight_only` (no activation quantization) or `skip` (left in full precision)."""

    pattern: str
    weight: QuantSpec | None = None
    act: QuantSpec | None = None
    weight_only: bool = False
    skip: bool = False

    def matches(self, name: str) -> bool:
        return fnmatch.fnmatchcase(name, self.pattern)

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"pattern": self.pattern}
        if self.weight is not None:
            d["weight"] = self.weight.to_dict()
        if self.act is not None:
            d["act"] = self.act.to_dict()
        if self.weight_only:
            d["weight_only"] = True
        if self.skip:
            d["skip"] = True
        return d


DEFAULT_WEIGHT = QuantSpec("int8", "channel")
DEFAULT_ACT = QuantSpec("int8", "token", dynamic=True)


@dataclass
class QuantConfig:
    """Default weight / activation specs (None = that side stays full precision), per-layer rules,
    attention quantization (None = full-precision attention) with per-module overrides (`attention_layers`:
    fnmatch pattern -> spec, the first match wins; e.g. fp16 P.V for the layers the error analysis flags),
    full-precision layer patterns (linears and attention modules), and where the model's forward receives
    its timestep (for timestep-wise ranges)."""

    weight: QuantSpec | None = DEFAULT_WEIGHT
    act: QuantSpec | None = DEFAULT_ACT
    rules: list[Rule] = field(default_factory=list)
    attention: AttentionSpec | None = None
    attention_layers: dict[str, AttentionSpec] = field(default_factory=dict)
    keep_fp: list[str] = field(default_factory=list)
    timestep_arg: str = "timestep"
    max_timestep: float = 1000.0

    def __post_init__(self) -> None:
        for where, spec in self._act_specs():
            _check_act_spec(spec, where)

    def _act_specs(self) -> list[tuple[str, QuantSpec]]:
        out = [("act", self.act)] + [(f"rules[{r.pattern!r}].act", r.act) for r in self.rules]
        for where, att in [("attention", self.attention)] + [(f"attention_layers[{p!r}]", a)
                                                              for p, a in self.attention_layers.items()]:
            if att is not None:
                out += [(f"{where}.{n}", getattr(att, n)) for n in ATTENTION_PARTS]
        return [(w, s) for w, s in out if s is not None]

    # ---- resolution ----------------------------------------------------------------------------------

    def is_fp(self, name: str) -> bool:
        """Whether `name` matches a keep_fp pattern."""
        return any(fnmatch.fnmatchcase(name, p) for p in self.keep_fp)

    def layers_of(self, model: "nn.Module") -> list[str]:
        """Names of the linear layers of `model` this config quantizes, in module order."""
        from torch import nn

        from workbench.quant.linear import QuantLinear

        return [n for n, m in model.named_modules()
                if isinstance(m, (nn.Linear, QuantLinear)) and n and self.specs_for(n) is not None]

    def specs_for(self, name: str) -> tuple[QuantSpec | None, QuantSpec | None] | None:
        """(weight spec, act spec) for the linear layer `name`, or None when it stays full precision."""
        if self.is_fp(name):
            return None
        weight, act = self.weight, self.act
        for rule in self.rules:
            if not rule.matches(name):
                continue
            if rule.skip:
                return None
            weight = rule.weight or weight
            act = None if rule.weight_only else (rule.act or act)
        if weight is None and act is None:
            return None
        return weight, act

    def attention_for(self, name: str) -> AttentionSpec | None:
        """Attention spec for the attention module `name` (None: not wrapped)."""
        if self.is_fp(name):
            return None
        return next((a for p, a in self.attention_layers.items() if fnmatch.fnmatchcase(name, p)), self.attention)

    # ---- construction --------------------------------------------------------------------------------

    @classmethod
    def wxay(
        cls,
        w_bits: int | None = 8,
        a_bits: int | None = 8,
        *,
        w_granularity: str = "channel",
        a_granularity: str = "token",
        a_dynamic: bool = True,
        w_observer: str = "minmax",
        attention_bits: int | None = None,
        keep_fp: list[str] | tuple[str, ...] = (),
        **kwargs: Any,
    ) -> QuantConfig:
        """W{w_bits}A{a_bits} shorthand: symmetric int weights per output channel, per-token dynamic int
        activations (ViDiT-Q's layout); None bits leave that side in full precision; `attention_bits`
        also quantizes attention (Q, K, V, P)."""
        weight = None if w_bits is None else QuantSpec(f"int{w_bits}", w_granularity, observer=w_observer)
        act = None if a_bits is None else QuantSpec(f"int{a_bits}", a_granularity, dynamic=a_dynamic)
        attention = None if attention_bits is None else AttentionSpec.uniform(attention_bits)
        return cls(weight=weight, act=act, attention=attention, keep_fp=list(keep_fp), **kwargs)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> QuantConfig:
        """Strictly validated construction from plain data (YAML); inverse of `to_dict`."""
        _check_keys(d, cls, "quant config")
        kwargs: dict[str, Any] = {}
        for key in ("weight", "act"):
            if key in d:
                base = DEFAULT_WEIGHT if key == "weight" else DEFAULT_ACT
                kwargs[key] = None if d[key] is None else spec_from_dict(d[key], base, key)
        weight, act = kwargs.get("weight", DEFAULT_WEIGHT), kwargs.get("act", DEFAULT_ACT)
        rules = []
        for i, r in enumerate(d.get("rules") or []):
            where = f"rules[{i}]"
            _check_keys(r, Rule, where)
            if "pattern" not in r:
                raise ValueError(f"{where} needs a 'pattern'")
            rules.append(
                Rule(
                    pattern=str(r["pattern"]),
                    weight=None if r.get("weight") is None else spec_from_dict(r["weight"], weight or DEFAULT_WEIGHT, f"{where}.weight"),
                    act=None if r.get("act") is None else spec_from_dict(r["act"], act or DEFAULT_ACT, f"{where}.act"),
                    weight_only=bool(r.get("weight_only", False)),
                    skip=bool(r.get("skip", False)),
                )
            )
        kwargs["rules"] = rules
        if d.get("attention") is not None:
            kwargs["attention"] = attention_from_dict(d["attention"])
        layers = d.get("attention_layers") or {}
        if not isinstance(layers, dict) or not all(isinstance(p, str) and isinstance(a, dict)
                                                   for p, a in layers.items()):
            raise ValueError("attention_layers must map fnmatch patterns of attention modules to attention specs, "
                             "e.g. {'*blocks.0.attn1': {kernel: fp16}}")
        kwargs["attention_layers"] = {p: attention_from_dict(a, f"attention_layers[{p!r}]") for p, a in layers.items()}
        if "keep_fp" in d:
            keep = d["keep_fp"]
            if isinstance(keep, str) or not all(isinstance(p, str) for p in keep):
                raise ValueError("keep_fp must be a list of fnmatch patterns")
            kwargs["keep_fp"] = list(keep)
        for key in ("timestep_arg", "max_timestep"):
            if key in d:
                kwargs[key] = d[key]
        return cls(**kwargs)

    def to_dict(self) -> dict[str, Any]:
        return {
            "weight": None if self.weight is None else self.weight.to_dict(),
            "act": None if self.act is None else self.act.to_dict(),
            "rules": [r.to_dict() for r in self.rules],
            "attention": None if self.attention is None else self.attention.to_dict(),
            "attention_layers": {p: a.to_dict() for p, a in self.attention_layers.items()},
            "keep_fp": list(self.keep_fp),
            "timestep_arg": self.timestep_arg,
            "max_timestep": self.max_timestep,
        }


def _check_act_spec(spec: QuantSpec, where: str) -> None:
    """Activation ranges must not depend on the number of tokens unless computed per call."""
    if spec.granularity == "channel":
        raise ValueError(f"{where}: 'channel' granularity is for weights; use 'tensor', 'token' or 'group'")
    if spec.granularity in ("token", "group") and not spec.dynamic:
        raise ValueError(f"{where}: {spec.granularity!r} activation ranges need dynamic=True")

