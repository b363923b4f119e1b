"""Model configuration: the subset of a Hugging Face ``config.json`` that the decoder families we run use.

Read with :meth:`ModelConfig.from_hf_dict`; anything we do not implement is refused with a message naming it,
never ignored.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any

from aspen.errors import CheckpointError
from aspen.model.gguf import is_gguf_file

# architectures string -> family name. Each family differs only in flags below.
ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
}

# The seven projections a LoRA adapter may target, in the order the model packs them.
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

SUPPORTED_ROPE_TYPES = ("default", "llama3", "linear")


@dataclass(frozen=True)
class RopeScaling:
    rope_type: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192

    def __post_init__(self) -> None:
        if self.rope_type not in SUPPORTED_ROPE_TYPES:
            raise CheckpointError(
                f"rope_scaling type {self.rope_type!r} is not supported; expected one of {SUPPORTED_ROPE_TYPES}")
        if self.factor <= 0:
            raise CheckpointError(f"rope_scaling factor must be > 0, got {self.factor}")


@dataclass(frozen=True)
class ModelConfig:
    family: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    max_position_embeddings: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling = field(default_factory=RopeScaling)
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # bias on q/k/v (Qwen2 always; Llama when configured)
    o_bias: bool = False  # bias on o_proj (Llama's attention_bias covers o_proj too)
    mlp_bias: bool = False
    qk_norm: bool = False  # Qwen3: RMSNorm over each head of q and k
    sliding_window: int | None = None
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    pad_token_id: int | None = None
    name_or_path: str = ""

    def __post_init__(self) -> None:
        positive = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                    "num_attention_heads", "num_key_value_heads", "head_dim", "max_position_embeddings")
        for name in positive:
            if getattr(self, name) <= 0:
                raise CheckpointError(f"config field {name} must be > 0, got {getattr(self, name)}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise CheckpointError(
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})")
        if self.family not in ARCHITECTURES.values():
            raise CheckpointError(f"unknown model family {self.family!r}")

    @property
    def q_size(self) -> int:
        return self.num_attention_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_key_value_heads * self.head_dim

    def module_shape(self, module: str) -> tuple[int, int]:
        """(in_features, out_features) of one of the seven LoRA-targetable projections."""
        h, i = self.hidden_size, self.intermediate_size
        shapes = {
            "q_proj": (h, self.q_size), "k_proj": (h, self.kv_size), "v_proj": (h, self.kv_size),
            "o_proj": (self.q_size, h), "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h),
        }
        if module not in shapes:
            raise KeyError(f"unknown projection {module!r}; expected one of {LORA_TARGETS}")
        return shapes[module]

    @classmethod
    def from_hf_dict(cls, cfg: dict[str, Any], name_or_path: str = "") -> ModelConfig:
        archs = cfg.get("architectures") or []
        known = [a for a in archs if a in ARCHITECTURES]
        if not known:
            raise CheckpointError(
                f"unsupported architecture {archs or cfg.get('model_type')!r}; expected one of "
                f"{sorted(ARCHITECTURES)}")
        family = ARCHITECTURES[known[0]]
        _refuse_unsupported(cfg, family)
        heads = cfg["num_attention_heads"]
        hidden = cfg["hidden_size"]
        head_dim = cfg.get("head_dim") or hidden // heads
        eos = cfg.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (eos,))
        rope = cfg.get("rope_scaling") or {}
        rope_params = cfg.get("rope_parameters") or {}
        if not rope and rope_params.get("rope_type", "default") != "default":
            rope = rope_params
        rope_theta = cfg.get("rope_theta", rope_params.get("rope_theta", 10000.0))
        scaling = RopeScaling(
            rope_type=rope.get("rope_type", rope.get("type", "default")),
            factor=float(rope.get("factor", 1.0)),
            low_freq_factor=float(rope.get("low_freq_factor", 1.0)),
            high_freq_factor=float(rope.get("high_freq_factor", 4.0)),
            original_max_position_embeddings=int(rope.get("original_max_position_embeddings", 8192)),
        )
        attention_bias = bool(cfg.get("attention_bias", False))
        window = cfg.get("sliding_window") if cfg.get("use_sliding_window", family == "mistral") else None
        return cls(
            family=family,
            vocab_size=cfg["vocab_size"],
            hidden_size=hidden,
            intermediate_size=cfg["intermediate_size"],
            num_hidden_layers=cfg["num_hidden_layers"],
            num_attention_heads=heads,
            num_key_value_heads=cfg.get("num_key_value_heads") or heads,
            head_dim=head_dim,
            max_position_embeddings=cfg.get("max_position_embeddings", 2048),
            rms_norm_eps=cfg.get("rms_norm_eps", 1e-6),
            rope_theta=float(rope_theta),
            rope_scaling=scaling,
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            attention_bias=(family == "qwen2") or attention_bias,
            o_bias=family in ("llama", "qwen3") and attention_bias,
            mlp_bias=bool(cfg.get("mlp_bias", False)),
            qk_norm=family == "qwen3",
            sliding_window=window,
            bos_token_id=cfg.get("bos_token_id"),
            eos_token_ids=eos_ids,
            pad_token_id=cfg.get("pad_token_id"),
            name_or_path=name_or_path,
        )

    @classmethod
    def from_dir(cls, path: str) -> ModelConfig:
        cfg_path = os.path.join(path, "config.json")
        if not os.path.isdir(path):
            raise CheckpointError(f"model path {path!r} is not a directory{_what_file(path)}")
        if not os.path.isfile(cfg_path):
            raise CheckpointError(f"checkpoint {path!r} has no config.json")
        try:
            with open(cfg_path, encoding="utf-8") as f:
                cfg = json.load(f)
        except json.JSONDecodeError as e:
            raise CheckpointError(f"{cfg_path}: invalid JSON ({e})") from None
        return cls.from_hf_dict(cfg, name_or_path=cfg.get("_name_or_path") or os.path.abspath(path))


def _what_file(path: str) -> str:
    if is_gguf_file(path):
        return " but a GGUF file (aspen.load_model converts it to a checkpoint directory)"
    if os.path.isfile(path):
        return " but a file that is not a GGUF file either; expected a checkpoint directory or a .gguf file"
    return ""


def _refuse_unsupported(cfg: dict[str, Any], family: str) -> None:
    act = cfg.get("hidden_act", "silu")
    if act != "silu":
        raise CheckpointError(f"hidden_act {act!r} is not supported; expected 'silu'")
    if family == "qwen3" and cfg.get("attention_bias"):
        raise CheckpointError("Qwen3 with attention_bias=true is not supported")
    if cfg.get("pretraining_tp", 1) not in (1, None):
        raise CheckpointError(f"pretraining_tp={cfg['pretraining_tp']} is not supported; expected 1")
    types = cfg.get("layer_types")
    if types and any(t != "full_attention" for t in types) and cfg.get("use_sliding_window"):
        raise CheckpointError("per-layer sliding-window attention (layer_types) is not supported")
