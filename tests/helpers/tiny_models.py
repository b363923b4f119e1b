"""Tiny random checkpoints of each supported family, made locally with transformers' ``save_pretrained``."""
from __future__ import annotations

import os

import torch

from benchmarks.local_tokenizer import CHAT_TEMPLATE, TEXT, VOCAB, make_tokenizer  # noqa: F401 -- the tests' too

FAMILIES = {
    "llama": {"arch": "LlamaConfig", "cls": "LlamaForCausalLM"},
    "mistral": {"arch": "MistralConfig", "cls": "MistralForCausalLM"},
    "qwen2": {"arch": "Qwen2Config", "cls": "Qwen2ForCausalLM"},
    "qwen3": {"arch": "Qwen3Config", "cls": "Qwen3ForCausalLM"},
}


def make_checkpoint(out_dir: str, family: str = "llama", seed: int = 0, max_shard_size: str | None = None,
                    chat_template: str | None = CHAT_TEMPLATE, **overrides) -> str:
    """Save a tiny random model of `family` (and a tokenizer with ``chat_template``, None for none) to out_dir;
    returns out_dir."""
    import transformers

    spec = FAMILIES[family]
    kw = {"vocab_size": VOCAB, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
              "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 256,
              "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 3, "tie_word_embeddings": False}
    if family == "qwen3":
        kw["head_dim"] = 16
    kw.update(overrides)
    config = getattr(transformers, spec["arch"])(**kw)
    torch.manual_seed(seed)
    model = getattr(transformers, spec["cls"])(config)
    # random init is tiny (std 0.02): widen it so logits differ clearly between tokens and bugs show
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            elif p.dim() == 1:
                p.normal_(0, 0.1)
            else:
                p.normal_(0, 0.08)
    os.makedirs(out_dir, exist_ok=True)
    extra = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(out_dir, safe_serialization=True, **extra)
    make_tokenizer(out_dir, chat_template)
    return out_dir


def hf_model(path: str, **kwargs):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, **kwargs).eval()
