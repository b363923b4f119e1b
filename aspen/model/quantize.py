"""Quantize a loaded model's projections with bitsandbytes by swapping modules after construction.

Modes: ``int8`` (LLM.int8, ``Linear8bitLt`` with outlier threshold 6.0), ``nf4`` and ``fp4`` (``Linear4bit``,
block size 64, no double quantization: the defaults of transformers' ``BitsAndBytesConfig``). The four projection
groups of every layer are quantized; embeddings, norms and the LM head stay in the model's dtype, as
transformers does. Quantized weights are frozen. On CPU bitsandbytes dequantises on every call: quantization saves
memory there, not time.
"""
from __future__ import annotations

import torch
from torch import nn

from aspen.model.decoder import DecoderModel

QUANT_MODES = ("none", "int8", "nf4", "fp4")
_GROUPS = (("self_attn", "qkv_proj"), ("self_attn", "o_proj"), ("mlp", "gate_up_proj"), ("mlp", "down_proj"))


def check_mode(quantize: str | None) -> str:
    mode = quantize or "none"
    if mode not in QUANT_MODES:
        raise ValueError(f"quantize must be one of {QUANT_MODES}, got {quantize!r}")
    return mode


def _quantized_linear(linear: nn.Linear, mode: str, compute_dtype: torch.dtype,
                      device: torch.device) -> nn.Module:
    import bitsandbytes as bnb  # imported lazily: only quantized runs need it

    has_bias = linear.bias is not None
    if mode == "int8":
        q = bnb.nn.Linear8bitLt(linear.in_features, linear.out_features, bias=has_bias,
                                has_fp16_weights=False, threshold=6.0, device="meta")
        q.weight = bnb.nn.Int8Params(linear.weight.data.to("cpu"), requires_grad=False, has_fp16_weights=False)
    else:
        q = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=has_bias,
                              compute_dtype=compute_dtype, compress_statistics=False, quant_type=mode,
                              device="meta")
        q.weight = bnb.nn.Params4bit(linear.weight.data.to("cpu"), requires_grad=False, quant_type=mode,
                                     compress_statistics=False, module=q)
    if has_bias:
        q.bias = nn.Parameter(linear.bias.data.to("cpu", compute_dtype), requires_grad=False)
    return q.to(device).eval()  # bitsandbytes quantizes on this move


def quantize_model(model: DecoderModel, quantize: str | None) -> DecoderModel:
    """Swap every projection of every layer for its bitsandbytes counterpart (in place)."""
    mode = check_mode(quantize)
    if mode == "none":
        return model
    device = model.lm_head.weight.device
    dtype = model.lm_head.weight.dtype
    for layer in model.model.layers:
        for block_name, proj in _GROUPS:
            block = getattr(layer, block_name)
            setattr(block, proj, _quantized_linear(getattr(block, proj), mode, dtype, device))
    model.requires_grad_(False)
    return model


def weight_bytes(model: nn.Module) -> int:
    """Bytes held by the model's parameters and buffers (quantized storage counted as stored, and the weights of
    layers packed for the CPU GEMM, ``aspen.model.packed_linear``, as the bytes their packed copy holds)."""
    seen: set[int] = set()
    total = 0
    for t in list(model.parameters()) + list(model.buffers()):
        if id(t) in seen:
            continue
        seen.add(id(t))
        total += t.numel() * t.element_size()
    for m in model.modules():
        total += getattr(m, "weight_nbytes", 0)  # PackedLinear: its weight lives in the packed copy
        state = getattr(getattr(m, "weight", None), "quant_state", None)
        if state is not None and getattr(state, "absmax", None) is not None:
            total += state.absmax.numel() * state.absmax.element_size()
        scb = getattr(getattr(m, "weight", None), "SCB", None)
        if scb is not None:
            total += scb.numel() * scb.element_size()
    return total
