"""The verbs: `quantize_model` swaps layers in place, `calibrate_model` fixes static ranges,
`dequantize_model` undoes it all. The module tree survives, so diffusers' forward runs unchanged."""

from __future__ import annotations

from typing import Any, Callable, Iterable

from torch import nn

from .attention import QuantAttention, QuantAttnProcessor, is_attention_module, unwrap_attention, wrap_attention
from .config import QuantConfig
from .context import install_timestep_hook, observing, remove_timestep_hook
from .linear import QuantLinear
from .quantizer import Quantizer


def quantize_model(
    model: nn.Module, config: QuantConfig, names: Iterable[str] | None = None
) -> dict[str, QuantLinear]:
    """Quantize `model` in place per `config`; returns the QuantLinear modules by name.

    Every nn.Linear the config does not keep in full precision becomes a QuantLinear sharing its
    parameters; an existing QuantLinear is re-specced (its smoothing, rotation and extras kept), so
    mixed-precision stages can call this again with `names` restricting it to some layers. Attention
    modules are wrapped per `config.attention_for` (fake-quant specs or the quantized attention kernel). The
    timestep hook is installed on `model`.
    """
    wanted = None if names is None else set(names)
    done: dict[str, QuantLinear] = {}
    for name, module in list(model.named_modules()):
        if wanted is not None and name not in wanted:
            continue
        if _inside_quant_module(model, name):
            continue  # e.g. a LoRA branch living in a QuantLinear's extras
        if isinstance(module, (nn.Linear, QuantLinear)):
            specs = config.specs_for(name)
            if specs is None:
                continue
            if isinstance(module, QuantLinear):
                module.set_specs(*specs)
                done[name] = module
            elif not name:
                raise ValueError("a bare nn.Linear cannot be swapped in place; use QuantLinear.from_linear")
            else:
                done[name] = QuantLinear.from_linear(module, *specs)
                model.set_submodule(name, done[name])
        elif is_attention_module(module):
            spec = config.attention_for(name)
            if spec is not None:
                wrap_attention(module, spec)
    install_timestep_hook(model, config.timestep_arg, config.max_timestep)
    return done


def _inside_quant_module(model: nn.Module, name: str) -> bool:
    parts = name.split(".")
    for i in range(1, len(parts)):
        parent = model.get_submodule(".".join(parts[:i]))
        if isinstance(parent, (QuantLinear, QuantAttention)):
            return True
    return False


def dequantize_model(model: nn.Module) -> None:
    """Undo `quantize_model`: original nn.Linear modules (same parameters) and attention processors back."""
    for name, module in list(model.named_modules()):
        if isinstance(module, QuantLinear):
            model.set_submodule(name, module.to_linear())
        elif is_attention_module(module) and isinstance(module.processor, QuantAttnProcessor):
            unwrap_attention(module)
    remove_timestep_hook(model)


def quant_modules(model: nn.Module) -> dict[str, QuantLinear | QuantAttention]:
    """Every QuantLinear and QuantAttention in `model`, by module name."""
    return {n: m for n, m in model.named_modules() if isinstance(m, (QuantLinear, QuantAttention))}


def quantized_linears(model: nn.Module, within: Iterable[str] | None = None, weight_quantized: bool = False,
                      act_quantized: bool = False) -> dict[str, QuantLinear]:
    """The QuantLinears of the model proper (none inside another quantized module, e.g. a branch in a layer's
    extras), by name in module order; optionally only inside the modules named in `within` and only those
    with a weight / an activation quantizer."""
    prefixes = None if within is None else tuple(f"{w}." for w in within)
    out: dict[str, QuantLinear] = {}
    nested: list[str] = []
    for name, m in model.named_modules():
        if nested and name.startswith(tuple(nested)):
            continue
        if isinstance(m, (QuantLinear, QuantAttention)):
            nested.append(f"{name}.")
        if not isinstance(m, QuantLinear) or (prefixes is not None and not name.startswith(prefixes)):
            continue
        if (weight_quantized and m.weight_quantizer is None) or (act_quantized and m.input_quantizer is None):
            continue
        out[name] = m
    return out


def quantizers(model: nn.Module) -> dict[str, Quantizer]:
    """Every Quantizer in `model`, by module name (e.g. "blocks.0.attn1.to_q.input_quantizer")."""
    return {n: m for n, m in model.named_modules() if isinstance(m, Quantizer)}


def calibrate_model(model: nn.Module, run_fn: Callable[[], Any], weights: bool = False) -> list[str]:
    """Observe activations while `run_fn()` runs (e.g. a few sampling loops), then fix every static
    range from what was seen; returns the names of the calibrated quantizers.

    Static activation quantizers that saw nothing (layers the run never reached) stay uncalibrated.
    weights=True also re-derives weight ranges from the current weights.
    """
    with observing(model):
        run_fn()
    done = []
    for name, q in quantizers(model).items():
        if q.is_weight or q.spec.dynamic or q.spec.fixed_range is not None or not q.observed:
            continue
        q.calibrate()
        done.append(name)
    if weights:
        for name, m in model.named_modules():
            if isinstance(m, QuantLinear) and m.weight_quantizer is not None:
                m.recalibrate_weight()
                done.append(f"{name}.weight_quantizer")
    return done
