"""Modules a quantized model carries besides its QuantLinears, which a saved model needs at load time.

`Compensation`: trainable output corrections `extra(x, y_q) -> delta` living in `QuantLinear.extras`
(Q-VDiT's token-aware estimator, MPQ-DMv2's binary residual and LoRA branches). Each quantizes its input
exactly as its layer does (its own copy of the layer's input transform and activation quantizer), so it
computes on the same low-bit activations and exports as a self-contained module (`export_init`).
`WeightDelta`: trainable weight parametrizations folded into the weight after training.

Loading never imports a class named in a file: a saved or packed model names its extras by the stable
names of `COMPENSATIONS` (an allow-list of the workbench's own classes), and `compensation_class`
refuses any other name.
"""

from __future__ import annotations

import math
from typing import Any, Callable, TypeVar

import torch
import torch.nn.functional as F
from torch import nn

from workbench.quant.linear import QuantLinear
from workbench.quant.quantizer import Quantizer

TOKEN_MODES = ("frame", "token", "none")

# stable name -> class: the only classes a manifest can name (filled by @register_compensation)
COMPENSATIONS: dict[str, type["Compensation"]] = {}
# import paths that manifests of workbench 0.1 wrote for these classes (read, never imported)
LEGACY_PATHS = {
    "workbench.stages.qvdit:TokenAwareEstimator": "tqe",
    "workbench.stages.mpq:BinaryResidual": "binary_residual",
    "workbench.stages.mpq:LoRABranch": "lora",
}

C = TypeVar("C", bound=type)


def register_compensation(name: str) -> Callable[[C], C]:
    """Class decorator: allow `name` in manifests for this Compensation class."""

    def deco(cls: C) -> C:
        if name in COMPENSATIONS and COMPENSATIONS[name] is not cls:
            raise ValueError(f"compensation name {name!r} is taken by {COMPENSATIONS[name].__name__}")
        COMPENSATIONS[name] = cls
        cls.stable_name = name
        return cls

    return deco


class UnknownClassError(ValueError):
    """A file names a class outside the allow-list."""


def compensation_class(name: str) -> type["Compensation"]:
    """The class a manifest names by stable name (or by a workbench 0.1 import path); anything else is refused."""
    key = LEGACY_PATHS.get(name, name)
    if not isinstance(key, str) or key not in COMPENSATIONS:
        shown = name if isinstance(name, str) and len(name) <= 80 else f"{str(name)[:77]}..."
        raise UnknownClassError(
            f"the manifest names the class {shown!r}, which is not one of the workbench's own output corrections "
            f"({', '.join(sorted(COMPENSATIONS))}); a file can only name those. The file was not written by this "
            "workbench or was modified: re-create it with `workbench quantize` / `workbench export`")
    return COMPENSATIONS[key]


def compensation_entry(layer: str, key: str, extra: nn.Module) -> dict[str, Any]:
    """{"class": stable name, "init": constructor kwargs} of one extra (what manifests store)."""
    name = getattr(type(extra), "stable_name", None)
    if not isinstance(extra, Compensation) or COMPENSATIONS.get(name) is not type(extra):
        raise ValueError(
            f"layer {layer}: extra {key!r} ({type(extra).__name__}) cannot be saved: it is not a registered "
            "Compensation; subclass workbench.quant.compensation.Compensation and decorate it with "
            "@register_compensation('<name>')")
    from workbench.io.plain import plain

    return {"class": name, "init": plain(extra.export_init())}


def build_compensation(layer: str, key: str, spec: Any) -> "Compensation":
    """The extra a manifest entry describes (class from the allow-list, kwargs checked by its constructor)."""
    if not isinstance(spec, dict) or not isinstance(spec.get("init", {}), (dict, type(None))):
        raise UnknownClassError(f"layer {layer}: extra {key!r} is not a {{class, init}} mapping in the manifest")
    cls = compensation_class(spec.get("class"))
    try:
        return cls(**(spec.get("init") or {}))
    except (TypeError, ValueError) as e:
        raise UnknownClassError(f"layer {layer}: extra {key!r} ({spec.get('class')}) has invalid arguments: {e}") from None


class Compensation(nn.Module):
    """Base of trainable output corrections `extra(x, y_q) -> delta` living in `QuantLinear.extras`.

    It owns a copy of its layer's input transform (smoothing / rotation) and activation quantizer, so
    `quant_input(x)` is the very x' the layer multiplies its weight with. Subclasses implement
    `delta(xq, x, y_q)`; `export_init()` returns the constructor arguments (plain data).
    """

    stable_name: str = ""

    def __init__(self, in_features: int, out_features: int, act_spec: dict | None = None,
                 smooth: bool = False, rotation: bool = False) -> None:
        super().__init__()
        self.in_features, self.out_features = int(in_features), int(out_features)
        self.act_spec = None if act_spec is None else dict(act_spec)
        self.register_buffer("smooth", torch.ones(self.in_features) if smooth else None)
        self.register_buffer("rotation", torch.eye(self.in_features) if rotation else None)
        if act_spec is not None:
            from workbench.quant.config import spec_from_dict

            self.input_quantizer: Quantizer | None = Quantizer(spec_from_dict(act_spec, where="compensation act"))
        else:
            self.input_quantizer = None

    def _init_kwargs(self) -> dict[str, Any]:
        return {"in_features": self.in_features, "out_features": self.out_features, "act_spec": self.act_spec,
                "smooth": self.smooth is not None, "rotation": self.rotation is not None}

    def export_init(self) -> dict[str, Any]:
        return self._init_kwargs()

    def adopt_input_side(self, layer: QuantLinear) -> Compensation:
        """Copy the layer's input transform and activation quantizer state (static ranges included)."""
        with torch.no_grad():
            if self.smooth is not None and layer.smooth is not None:
                self.smooth = layer.smooth.detach().clone()
            if self.rotation is not None and layer.rotation is not None:
                self.rotation = layer.rotation.detach().clone()
            iq = layer.input_quantizer
            if self.input_quantizer is not None and iq is not None and not iq.spec.dynamic and iq.calibrated:
                self.input_quantizer._set(iq.scale.detach(), iq.zero.detach())
                if iq.bucket_scale.numel():
                    self.input_quantizer.bucket_scale.data = iq.bucket_scale.detach().clone()
                    self.input_quantizer.bucket_zero.data = iq.bucket_zero.detach().clone()
        return self

    @staticmethod
    def layer_kwargs(layer: QuantLinear) -> dict[str, Any]:
        """Constructor arguments describing `layer`'s input side."""
        iq = layer.input_quantizer
        return {"in_features": layer.in_features, "out_features": layer.out_features,
                "act_spec": None if iq is None else iq.spec.to_dict(),
                "smooth": layer.smooth is not None, "rotation": layer.rotation is not None}

    def quant_input(self, x: torch.Tensor) -> torch.Tensor:
        """x' = fq((x / s) R), as the layer computes it."""
        xt = x
        if self.smooth is not None:
            xt = xt / self.smooth.to(xt.dtype)
        if self.rotation is not None:
            xt = xt @ self.rotation.to(xt.dtype)
        iq = self.input_quantizer
        if iq is not None and iq.mode == "quantize":
            xt = iq(xt)
        return xt

    def delta(self, xq: torch.Tensor, x: torch.Tensor, y_q: torch.Tensor) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError

    def weight_delta(self) -> torch.Tensor | None:
        """The (out, in) matrix this branch adds to the effective weight, when it is a linear map."""
        return None

    def forward(self, x: torch.Tensor, y_q: torch.Tensor) -> torch.Tensor:
        return self.delta(self.quant_input(x), x, y_q)


class WeightDelta(nn.Module):
    """Base of trainable weight parametrizations (torch.nn.utils.parametrize): forward(W) -> W + delta.
    Training them and then `bake_weight_deltas` changes the weight the quantizer sees (no extra branch)."""

    def delta(self) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return w + self.delta().to(w.dtype)


class LowRankWeightDelta(WeightDelta):
    """W + B A (B: out x rank, zero at start; A: rank x in, Kaiming-uniform from `generator`)."""

    def __init__(self, out_features: int, in_features: int, rank: int, generator: torch.Generator | None = None) -> None:
        super().__init__()
        a = torch.empty(rank, in_features)
        bound = 1.0 / math.sqrt(in_features)
        a.uniform_(-bound, bound, generator=generator)
        self.A = nn.Parameter(a)
        self.B = nn.Parameter(torch.zeros(out_features, rank))

    def delta(self) -> torch.Tensor:
        return self.B @ self.A


def add_weight_delta(layer: QuantLinear, delta: WeightDelta) -> None:
    """Parametrize `layer.weight` as delta(W) (the layer stops caching its quantized weight meanwhile)."""
    from torch.nn.utils import parametrize

    parametrize.register_parametrization(layer, "weight", delta)
    layer.cache_weight = False
    layer._weight_cache = None


@torch.no_grad()
def bake_weight_deltas(model: nn.Module) -> list[str]:
    """Fold every WeightDelta parametrization of `model`'s QuantLinears into the weight; returns the layers."""
    from torch.nn.utils import parametrize

    done = []
    for name, m in list(model.named_modules()):
        if isinstance(m, QuantLinear) and parametrize.is_parametrized(m, "weight"):
            parametrize.remove_parametrizations(m, "weight", leave_parametrized=True)
            m.weight.requires_grad_(False)
            m.cache_weight = True
            m._weight_cache = None
            done.append(name)
    return done


def weight_deltas(model: nn.Module) -> dict[str, WeightDelta]:
    """Every WeightDelta parametrization in `model` by the name of its QuantLinear."""
    out = {}
    for name, m in model.named_modules():
        par = getattr(m, "parametrizations", None)
        if isinstance(m, QuantLinear) and par is not None and "weight" in par:
            for d in par["weight"]:
                if isinstance(d, WeightDelta):
                    out[name] = d
    return out


def compensations(model: nn.Module) -> dict[str, Compensation]:
    """Every Compensation module in `model` by name."""
    return {n: m for n, m in model.named_modules() if isinstance(m, Compensation)}


@register_compensation("tqe")
class TokenAwareEstimator(Compensation):
    """m_token * (Q(x) A^T B^T): low-rank error estimate with a learnable scale per frame / token."""

    def __init__(self, in_features: int, out_features: int, rank: int = 4, tokens: int = 0, frames: int = 0,
                 token_mode: str = "frame", act_spec: dict | None = None, smooth: bool = False,
                 rotation: bool = False) -> None:
        super().__init__(in_features, out_features, act_spec, smooth, rotation)
        if token_mode not in TOKEN_MODES:
            raise ValueError(f"unknown token_mode {token_mode!r}; choose one of {list(TOKEN_MODES)}")
        self.rank, self.tokens, self.frames, self.token_mode = int(rank), int(tokens), int(frames), token_mode
        self.A = nn.Parameter(torch.zeros(self.rank, in_features))
        self.B = nn.Parameter(torch.zeros(out_features, self.rank))
        size = {"frame": self.frames, "token": self.tokens, "none": 0}[token_mode] if self.tokens else 0
        self.token_scale = nn.Parameter(torch.ones(size)) if size else None

    def export_init(self) -> dict[str, Any]:
        return {**self._init_kwargs(), "rank": self.rank, "tokens": self.tokens, "frames": self.frames,
                "token_mode": self.token_mode}

    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        bound = 1.0 / math.sqrt(self.in_features)
        self.A.uniform_(-bound, bound, generator=generator)
        self.B.zero_()
        if self.token_scale is not None:
            self.token_scale.fill_(1.0)

    def weight_delta(self) -> torch.Tensor:
        return self.B @ self.A

    def delta(self, xq: torch.Tensor, x: torch.Tensor, y_q: torch.Tensor) -> torch.Tensor:
        d = F.linear(xq, (self.B @ self.A).to(xq.dtype))
        m = self.token_scale
        if m is None or d.dim() < 3 or d.shape[-2] != self.tokens:
            return d
        if self.token_mode == "frame":
            return (d.unflatten(-2, (self.frames, -1)) * m.to(d.dtype)[:, None, None]).flatten(-3, -2)
        return d * m.to(d.dtype)[:, None]


@register_compensation("binary_residual")
class BinaryResidual(Compensation):
    """alpha (.) sign(R) (.) M applied to the quantized input: the binary residual branch."""

    def __init__(self, in_features: int, out_features: int, act_spec: dict | None = None, smooth: bool = False,
                 rotation: bool = False) -> None:
        super().__init__(in_features, out_features, act_spec, smooth, rotation)
        self.register_buffer("signs", torch.zeros(out_features, in_features, dtype=torch.int8))
        self.alpha = nn.Parameter(torch.zeros(out_features))

    def weight_delta(self) -> torch.Tensor:
        return self.alpha[:, None] * self.signs.to(self.alpha.dtype)

    def delta(self, xq: torch.Tensor, x: torch.Tensor, y_q: torch.Tensor) -> torch.Tensor:
        return F.linear(xq, self.weight_delta().to(xq.dtype))

    @property
    def salient_entries(self) -> int:
        return int((self.signs != 0).sum())


@register_compensation("lora")
class LoRABranch(Compensation):
    """B A applied to the quantized input (rank `rank`)."""

    def __init__(self, in_features: int, out_features: int, rank: int = 8, act_spec: dict | None = None,
                 smooth: bool = False, rotation: bool = False) -> None:
        super().__init__(in_features, out_features, act_spec, smooth, rotation)
        self.rank = int(rank)
        self.A = nn.Parameter(torch.zeros(self.rank, in_features))
        self.B = nn.Parameter(torch.zeros(out_features, self.rank))

    def export_init(self) -> dict[str, Any]:
        return {**self._init_kwargs(), "rank": self.rank}

    def weight_delta(self) -> torch.Tensor:
        return self.B @ self.A

    def delta(self, xq: torch.Tensor, x: torch.Tensor, y_q: torch.Tensor) -> torch.Tensor:
        return F.linear(xq, self.weight_delta().to(xq.dtype))


__all__ = [
    "COMPENSATIONS", "BinaryResidual", "Compensation", "LoRABranch", "LowRankWeightDelta", "TokenAwareEstimator",
    "UnknownClassError", "WeightDelta", "add_weight_delta", "bake_weight_deltas", "build_compensation",
    "compensation_class", "compensation_entry", "compensations", "register_compensation", "weight_deltas",
]
