"""Forwards of diffusers' Wan and CogVideoX transformer blocks that feed their quantized linears from one kernel.

In diffusers every block computes "residual + gate * branch", a LayerNorm, the AdaLN modulation and (ours) the
per-token quantization of the next linear's input as separate torch ops. Compiled, Inductor fuses them into a
looped reduction that reads each 1,536- / 1,920-wide row three times (its persistent-reduction limit is 1,024
elements). `fuse_block_norms` swaps in forwards with the same math that call `workbench::residual_norm_quant`
instead (one read of the residual and the branch output, one write of the new residual and the codes) and hand
the codes to the kernel linears as a `QuantizedActivation`. The attention output projections read their input
with the one-pass row kernel. A block whose linears are not all kernel linears of one activation format, or whose
attention processor is not diffusers' own, keeps its forward; Wan's fused forward calls its attention modules, so
diffusers' processor wrapped by a `QuantAttnProcessor` (quantized attention) qualifies there too.
"""
from __future__ import annotations

import types
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn

from .dispatch import FP8Linear, QuantizedActivation, W4A8Linear, W8A8Linear

FUSED_ATTR = "_fused_codes_fp8"  # set on a block whose forward was swapped: True for e4m3 codes, False for int8


def code_format(linears: list[nn.Module]) -> Optional[bool]:
    """True (e4m3) / False (int8) when every module is a kernel linear taking symmetric codes of that one format,
    else None."""
    kinds = set()
    for lin in linears:
        if isinstance(lin, FP8Linear):
            kinds.add(True)
        elif isinstance(lin, W4A8Linear) or (isinstance(lin, W8A8Linear) and not lin.asym_act):
            kinds.add(False)
        else:
            return None
    return kinds.pop() if len(kinds) == 1 else None


def _ff_input_linear(ff: nn.Module) -> Optional[nn.Module]:
    """The linear a diffusers FeedForward applies first (`net[0].proj`: GELU or our fused GEMM + GELU)."""
    net = getattr(ff, "net", None)
    return getattr(net[0], "proj", None) if net is not None and len(net) else None


def _qkv_linears(attn: nn.Module, self_attention: bool) -> list[Any]:
    if getattr(attn, "fused_projections", False):
        return [attn.to_qkv] if self_attention else [attn.to_q]
    return [attn.to_q, attn.to_k, attn.to_v] if self_attention else [attn.to_q]


def _has(module: nn.Module, *paths: str) -> bool:
    """True when every dotted attribute path exists: the fused forwards use these, and another diffusers version's
    block may lack one (the block then keeps its own forward)."""
    for path in paths:
        obj: Any = module
        for name in path.split("."):
            if not hasattr(obj, name):
                return False
            obj = getattr(obj, name)
    return True


def _codes(out: list[torch.Tensor], lead: tuple[int, ...]) -> QuantizedActivation:
    q, s = out[0], out[1]
    return QuantizedActivation(q.reshape(-1, q.shape[-1]), s.reshape(-1), lead)


def _backend(attn: nn.Module) -> str:
    """The backend of the block's kernel linears (read at call time, so `set_backend` applies): the fused producer
    runs where they run, e.g. the reference math for a model loaded with backend="reference" on a GPU."""
    return _qkv_linears(attn, True)[0].backend.value


def _norm_args(norm: nn.Module) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor], float, bool]:
    """(weight, bias, eps, normalize) of a LayerNorm, or of an Identity (no normalization)."""
    if isinstance(norm, nn.Identity):
        return None, None, 0.0, False
    return norm.weight, norm.bias, float(norm.eps), True


# ------------------------------------------------------------------------------------------------------ Wan

def _wan_forward(self: nn.Module, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor,
                 temb: torch.Tensor, rotary_emb: Any) -> torch.Tensor:
    """`WanTransformerBlock.forward` (diffusers 0.3x-0.4x) with the norms + quantization in `residual_norm_quant`."""
    if temb.ndim == 4:  # per-token modulation (Wan 2.2 TI2V): [B, N, 6, D]
        mods = [t.squeeze(2) for t in (self.scale_shift_table.unsqueeze(0) + temb.float()).chunk(6, dim=2)]
    else:
        mods = list((self.scale_shift_table + temb.float()).chunk(6, dim=1))
    shift_msa, scale_msa, gate_msa, c_shift_msa, c_scale_msa, c_gate_msa = mods
    op, fp8, backend = torch.ops.workbench.residual_norm_quant, getattr(self, FUSED_ATTR), _backend(self.attn1)
    lead = tuple(hidden_states.shape[:-1])

    w, b, eps, norm = _norm_args(self.norm1)
    out = op([hidden_states], None, [], w, b, eps, [scale_msa], [shift_msa], norm, fp8, backend)
    attn_output = self.attn1(_codes(out, lead), None, None, rotary_emb)

    w, b, eps, norm = _norm_args(self.norm2)
    out = op([hidden_states], attn_output, [gate_msa], w, b, eps, [], [], norm, fp8, backend)
    hidden_states = out[2]
    attn_output = self.attn2(_codes(out, lead), encoder_hidden_states, None, None)

    w, b, eps, norm = _norm_args(self.norm3)
    out = op([hidden_states], attn_output, [], w, b, eps, [c_scale_msa], [c_shift_msa], norm, fp8, backend)
    hidden_states = out[2]
    ff_output = self.ffn(_codes(out, lead))
    return (hidden_states.float() + ff_output.float() * c_gate_msa).type_as(hidden_states)


def _through_quant_wrapper(processor: Any) -> Any:
    """The processor a `QuantAttnProcessor` wraps (it calls it unchanged, with its attention call routed through
    the quantized attention), else `processor`: a fused forward that calls the attention module keeps that routing."""
    from workbench.quant.attention import QuantAttnProcessor

    return processor.inner if isinstance(processor, QuantAttnProcessor) else processor


def _wan_format(block: nn.Module) -> Optional[bool]:
    from diffusers.models.transformers.transformer_wan import WanAttnProcessor

    if not _has(block, "scale_shift_table", "norm1", "norm2", "norm3", "attn1.processor", "attn2.processor", "ffn.net",
                "attn1.to_out", "attn2.to_out"):
        return None
    for attn in (block.attn1, block.attn2):  # the fused forward calls attn1 / attn2, so their processors still run
        if type(_through_quant_wrapper(attn.processor)) is not WanAttnProcessor:
            return None
    return code_format(_qkv_linears(block.attn1, True) + _qkv_linears(block.attn2, False) +
                       [_ff_input_linear(block.ffn)])


# ------------------------------------------------------------------------------------------------ CogVideoX

def _cog_attention(attn: nn.Module, x: QuantizedActivation, text_len: int, rotary: Any) -> torch.Tensor:
    """`CogVideoXAttnProcessor2_0` on already concatenated [text; video] codes; returns the output projection of
    the whole sequence (the caller splits it inside the residual kernel)."""
    from diffusers.models.embeddings import apply_rotary_emb

    batch = x.lead_shape[0]
    query, key, value = attn.to_q(x), attn.to_k(x), attn.to_v(x)
    head_dim = key.shape[-1] // attn.heads
    query, key, value = (t.view(batch, -1, attn.heads, head_dim).transpose(1, 2) for t in (query, key, value))
    if attn.norm_q is not None:
        query = attn.norm_q(query)
    if attn.norm_k is not None:
        key = attn.norm_k(key)
    if rotary is not None:
        query[:, :, text_len:] = apply_rotary_emb(query[:, :, text_len:], rotary)
        if not attn.is_cross_attention:
            key[:, :, text_len:] = apply_rotary_emb(key[:, :, text_len:], rotary)
    hidden = F.scaled_dot_product_attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False)
    hidden = hidden.transpose(1, 2).reshape(batch, -1, attn.heads * head_dim)
    return attn.to_out[1](attn.to_out[0](hidden))


def _cog_forward(self: nn.Module, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor,
                 temb: torch.Tensor, image_rotary_emb: Any = None,
                 attention_kwargs: Optional[dict] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """`CogVideoXBlock.forward` with both LayerNormZero + concat + quantization steps in `residual_norm_quant`."""
    if attention_kwargs:  # extra processor arguments: diffusers' own path
        return type(self).forward(self, hidden_states, encoder_hidden_states, temb, image_rotary_emb,
                                  attention_kwargs)
    op, fp8, backend = torch.ops.workbench.residual_norm_quant, getattr(self, FUSED_ATTR), _backend(self.attn1)
    text_len = encoder_hidden_states.size(1)
    lead = (hidden_states.shape[0], text_len + hidden_states.shape[1])

    n1 = self.norm1
    shift, scale, gate, enc_shift, enc_scale, enc_gate = n1.linear(n1.silu(temb))[:, None].chunk(6, dim=2)
    w, b, eps, norm = _norm_args(n1.norm)
    out = op([encoder_hidden_states, hidden_states], None, [], w, b, eps, [enc_scale, scale], [enc_shift, shift],
             norm, fp8, backend)
    attn_output = _cog_attention(self.attn1, _codes(out, lead), text_len, image_rotary_emb)

    n2 = self.norm2
    shift, scale, gate_ff, enc_shift, enc_scale, enc_gate_ff = n2.linear(n2.silu(temb))[:, None].chunk(6, dim=2)
    w, b, eps, norm = _norm_args(n2.norm)
    out = op([encoder_hidden_states, hidden_states], attn_output, [enc_gate, gate], w, b, eps, [enc_scale, scale],
             [enc_shift, shift], norm, fp8, backend)
    encoder_hidden_states, hidden_states = out[2], out[3]
    ff_output = self.ff(_codes(out, lead))
    hidden_states = hidden_states + gate_ff * ff_output[:, text_len:]
    encoder_hidden_states = encoder_hidden_states + enc_gate_ff * ff_output[:, :text_len]
    return hidden_states, encoder_hidden_states


def _cog_format(block: nn.Module) -> Optional[bool]:
    from diffusers.models.attention_processor import CogVideoXAttnProcessor2_0
    from diffusers.models.normalization import CogVideoXLayerNormZero

    if not _has(block, "norm1.linear", "norm1.silu", "norm1.norm", "norm2.linear", "norm2.silu", "norm2.norm",
                "attn1.processor", "attn1.heads", "attn1.norm_q", "attn1.norm_k", "attn1.to_out", "ff.net"):
        return None
    if type(block.attn1.processor) is not CogVideoXAttnProcessor2_0:  # the fused forward inlines this processor's
        return None                                                   # attention: a wrapped one keeps its own
    if not (isinstance(block.norm1, CogVideoXLayerNormZero) and isinstance(block.norm2, CogVideoXLayerNormZero)):
        return None
    return code_format(_qkv_linears(block.attn1, True) + [_ff_input_linear(block.ff)])


# -------------------------------------------------------------------------------------------------- install

def _block_kinds() -> list[tuple[type, Any, Any, list[str]]]:
    """(block class, format check, fused forward, its attention modules) for the diffusers classes installed."""
    kinds = []
    try:
        from diffusers.models.transformers.transformer_wan import WanTransformerBlock
        kinds.append((WanTransformerBlock, _wan_format, _wan_forward, ["attn1", "attn2"]))
    except ImportError:  # pragma: no cover - depends on the diffusers version
        pass
    try:
        from diffusers.models.transformers.cogvideox_transformer_3d import CogVideoXBlock
        kinds.append((CogVideoXBlock, _cog_format, _cog_forward, ["attn1"]))
    except ImportError:  # pragma: no cover
        pass
    return kinds


def fuse_block_norms(model: nn.Module) -> int:
    """Swap the forward of every Wan / CogVideoX block of `model` whose quantized linears allow it for the fused one
    (same math, see the module docstring); returns how many blocks were swapped. Call after the linears are kernel
    linears and before torch.compile (`load_packed` calls it on the model it rebuilds). `unfuse_block_norms` restores
    diffusers' forwards."""
    n = 0
    kinds = _block_kinds()
    for module in model.modules():
        for cls, check, forward, attns in kinds:
            if not isinstance(module, cls):
                continue
            fp8 = check(module)
            if fp8 is None:
                continue
            setattr(module, FUSED_ATTR, fp8)
            module.forward = types.MethodType(forward, module)
            for name in attns:
                out_proj = getattr(module, name).to_out[0]
                if code_format([out_proj]) is not None:  # its input is an attention kernel's output
                    out_proj.input_from_kernel = True
            n += 1
    return n


def unfuse_block_norms(model: nn.Module) -> int:
    """Give every block `fuse_block_norms` swapped its class's forward (and its output projections their
    input quantization) back; returns how many."""
    n = 0
    attns = {cls: names for cls, _, _, names in _block_kinds()}
    for module in model.modules():
        if not hasattr(module, FUSED_ATTR):
            continue
        del module.forward
        delattr(module, FUSED_ATTR)
        for name in next((v for cls, v in attns.items() if isinstance(module, cls)), []):
            getattr(module, name).to_out[0].input_from_kernel = False
        n += 1
    return n
