"""Our decoder for the Llama family (Llama, Mistral, Qwen2, Qwen3) over a flat batch and a paged KV cache.

The differences between families are flags of :class:`~aspen.model.config.ModelConfig` (q/k/v bias, q/k RMSNorm,
sliding window, tied embeddings); there is one code path. Projections that read the same input are packed —
``qkv_proj`` holds q, k and v, ``gate_up_proj`` holds gate and up — and :data:`PACKED_MODULES` declares how the
checkpoint's (and a PEFT adapter's) per-projection names map onto them.

The model knows nothing of quantization (applied afterwards by swapping modules, see ``aspen.model.quantize``) or of
LoRA: each projection group's output passes through an optional ``lora`` hook with
``apply(layer, group, x, y) -> y'`` (see ``aspen.lora``), so inference and training share one op.
"""
from __future__ import annotations

from typing import Protocol

import torch
from torch import nn

from aspen.kernels.fused_ops import swiglu
from aspen.model.attention import paged_attention
from aspen.model.batch import FlatBatch
from aspen.model.config import ModelConfig
from aspen.model.kv_cache import KVCache
from aspen.model.layers import RMSNorm, Rotary, apply_rotary

# checkpoint projection name -> (packed module, part index)
PACKED_MODULES = {
    "q_proj": ("qkv_proj", 0), "k_proj": ("qkv_proj", 1), "v_proj": ("qkv_proj", 2),
    "gate_proj": ("gate_up_proj", 0), "up_proj": ("gate_up_proj", 1),
}
# projection groups in the order a layer runs them, with the checkpoint names each group packs
GROUPS = {
    "qkv_proj": ("q_proj", "k_proj", "v_proj"),
    "o_proj": ("o_proj",),
    "gate_up_proj": ("gate_proj", "up_proj"),
    "down_proj": ("down_proj",),
}


class LoraHook(Protocol):
    def apply(self, layer: int, group: str, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Return ``y`` plus each token's own adapter delta for projection group ``group`` of ``layer``."""


def group_sizes(config: ModelConfig, group: str) -> tuple[int, ...]:
    """Output widths of the parts of a packed projection group."""
    return tuple(config.module_shape(m)[1] for m in GROUPS[group])


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, layer: int) -> None:
        super().__init__()
        self.layer = layer
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        self.q_size, self.kv_size = config.q_size, config.kv_size
        self.scale = self.head_dim ** -0.5
        self.qkv_proj = nn.Linear(config.hidden_size, self.q_size + 2 * self.kv_size, bias=config.attention_bias)
        self.o_proj = nn.Linear(self.q_size, config.hidden_size, bias=config.o_bias)
        self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps) if config.qk_norm else None
        self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps) if config.qk_norm else None

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, batch: FlatBatch,
                kv: KVCache | None, lora: LoraHook | None) -> torch.Tensor:
        qkv = self.qkv_proj(x)
        if lora is not None:
            qkv = lora.apply(self.layer, "qkv_proj", x, qkv)
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.reshape(-1, self.num_heads, self.head_dim)  # [T, H, hd]
        k = k.reshape(-1, self.num_kv_heads, self.head_dim)  # [T, KVH, hd]
        v = v.reshape(-1, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if kv is not None:
            kv.write(self.layer, batch.slot_mapping, k, v)
        o = paged_attention(q, k, v, kv.k[self.layer] if kv is not None else None,
                            kv.v[self.layer] if kv is not None else None, batch, self.scale)
        o = o.reshape(-1, self.q_size)
        y = self.o_proj(o)
        if lora is not None:
            y = lora.apply(self.layer, "o_proj", o, y)
        return y


class MLP(nn.Module):
    def __init__(self, config: ModelConfig, layer: int) -> None:
        super().__init__()
        self.layer = layer
        self.inter = config.intermediate_size
        self.gate_up_proj = nn.Linear(config.hidden_size, 2 * self.inter, bias=config.mlp_bias)
        self.down_proj = nn.Linear(self.inter, config.hidden_size, bias=config.mlp_bias)

    def forward(self, x: torch.Tensor, lora: LoraHook | None) -> torch.Tensor:
        gu = self.gate_up_proj(x)
        if lora is not None:
            gu = lora.apply(self.layer, "gate_up_proj", x, gu)
        h = swiglu(gu)  # silu(gate) * up
        y = self.down_proj(h)
        if lora is not None:
            y = lora.apply(self.layer, "down_proj", h, y)
        return y


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, layer: int) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config, layer)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config, layer)

    def forward(self, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, batch: FlatBatch,
                kv: KVCache | None, lora: LoraHook | None) -> torch.Tensor:
        h = h + self.self_attn(self.input_layernorm(h), cos, sin, batch, kv, lora)
        return h + self.mlp(self.post_attention_layernorm(h), lora)


class DecoderModel(nn.Module):
    """Parameter names follow the checkpoint's (``model.layers.N...``) except for the packed projections."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.model = nn.Module()
        self.model.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.model.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.model.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary = Rotary(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(self, batch: FlatBatch, kv: KVCache | None, lora: LoraHook | None = None) -> torch.Tensor:
        """Run one step; returns logits [len(batch.logits_indices), vocab] in float32. ``kv`` None: no cache
        (only for steps whose every chunk starts its sequence, e.g. training)."""
        return self.lm_head(self.final_hidden(batch, kv, lora)).float()

    def final_hidden(self, batch: FlatBatch, kv: KVCache | None, lora: LoraHook | None = None) -> torch.Tensor:
        """Run one step up to the head: the normed hidden states [len(batch.logits_indices), hidden]."""
        h = self.model.embed_tokens(batch.input_ids)
        cos, sin = self.rotary.cos_sin(batch.positions, h.dtype)
        for layer in self.model.layers:
            h = layer(h, cos, sin, batch, kv, lora)
        h = h.index_select(0, batch.logits_indices)
        return self.model.norm(h)
