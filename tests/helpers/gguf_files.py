"""Tiny GGUF files for the tests, written with the ``gguf`` package's writer.

:func:`write_gguf` stores a tiny Llama checkpoint (``tests.helpers.tiny_models.make_checkpoint``) the way
llama.cpp's converter lays one out: GGUF tensor names, q/k rows in llama.cpp's rotary order, the byte-level BPE
tokenizer as a ``gpt2`` vocabulary with its merges, and a chat template. ``arch``, ``qtype`` and ``extra`` make
files that a loader must refuse.
"""
from __future__ import annotations

import json
import os

import numpy as np
from safetensors.numpy import load_file

CHAT_TEMPLATE = ("{% for m in messages %}<s>{{ m['role'] }}\n{{ m['content'] }}</s>\n{% endfor %}"
                 "{% if add_generation_prompt %}<s>assistant\n{% endif %}")

_TOKEN_NORMAL, _TOKEN_CONTROL = 1, 3


def _rotary_rows(w: np.ndarray, heads: int) -> np.ndarray:
    """Rows of a q or k projection in llama.cpp's order: per head, the two rotary halves interleaved."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_gguf(path: str, checkpoint: str, *, arch: str = "llama", qtype: str = "F32",
               extra: dict | None = None) -> str:
    """Write the Llama checkpoint directory ``checkpoint`` as the GGUF file ``path``; returns ``path``.

    ``qtype``: GGML type of the 2-D weights ("F32", "F16", "Q8_0", or a type stored as zero bytes, e.g. "Q8_1",
    which no dequantizer reads). ``arch``: the ``general.architecture`` written (the tensors stay Llama's).
    ``extra``: {"rope_freqs": True} adds a rope frequency tensor; {"expert_count": n} marks the file as a
    mixture of experts."""
    import gguf

    extra = extra or {}
    with open(os.path.join(checkpoint, "config.json"), encoding="utf-8") as f:
        cfg = json.load(f)
    layers, heads, kv_heads = cfg["num_hidden_layers"], cfg["num_attention_heads"], cfg["num_key_value_heads"]
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // heads
    writer = gguf.GGUFWriter(path, arch)
    writer.add_name("tiny test llama")
    writer.add_block_count(layers)
    writer.add_context_length(cfg["max_position_embeddings"])
    writer.add_embedding_length(cfg["hidden_size"])
    writer.add_feed_forward_length(cfg["intermediate_size"])
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(cfg.get("rope_theta", 10000.0))
    writer.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    writer.add_vocab_size(cfg["vocab_size"])
    if extra.get("expert_count"):
        writer.add_expert_count(extra["expert_count"])
    _add_tokenizer(writer, checkpoint, cfg)

    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, layers)
    for hf_name, w in load_file(os.path.join(checkpoint, "model.safetensors")).items():
        base, suffix = hf_name.rsplit(".", 1)
        name = names.get_name(base)
        assert name is not None, f"no GGUF name for {hf_name}"
        w = w.astype(np.float32)
        if base.endswith("q_proj"):
            w = _rotary_rows(w, heads)
        elif base.endswith("k_proj"):
            w = _rotary_rows(w, kv_heads)
        _add_tensor(writer, f"{name}.{suffix}", w, qtype if w.ndim == 2 else "F32")
    if extra.get("rope_freqs"):
        writer.add_tensor("rope_freqs.weight", np.ones(head_dim // 2, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def _add_tensor(writer, name: str, w: np.ndarray, qtype: str) -> None:
    import gguf

    kind = gguf.GGMLQuantizationType[qtype]
    if kind == gguf.GGMLQuantizationType.F32:
        writer.add_tensor(name, w)
    elif kind == gguf.GGMLQuantizationType.F16:
        writer.add_tensor(name, w.astype(np.float16))
    else:
        try:
            data = gguf.quantize(w, kind)
        except NotImplementedError:  # a type nothing here can write: zero bytes of the right size
            block, size = gguf.GGML_QUANT_SIZES[kind]
            data = np.zeros((w.shape[0], w.shape[1] // block * size), dtype=np.uint8)
        writer.add_tensor(name, data, raw_shape=data.shape, raw_dtype=kind)


def _add_tokenizer(writer, checkpoint: str, cfg: dict) -> None:
    with open(os.path.join(checkpoint, "tokenizer.json"), encoding="utf-8") as f:
        tok = json.load(f)
    vocab = tok["model"]["vocab"]
    tokens = sorted(vocab, key=vocab.get)
    assert [vocab[t] for t in tokens] == list(range(len(tokens))), "vocabulary ids must be 0..n-1"
    special = {t["content"] for t in tok.get("added_tokens", []) if t.get("special")}
    merges = [m if isinstance(m, str) else " ".join(m) for m in tok["model"]["merges"]]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types([_TOKEN_CONTROL if t in special else _TOKEN_NORMAL for t in tokens])
    writer.add_token_merges(merges)
    writer.add_bos_token_id(cfg["bos_token_id"])
    writer.add_eos_token_id(cfg["eos_token_id"])
    writer.add_pad_token_id(cfg["pad_token_id"])
    writer.add_unk_token_id(0)
    writer.add_add_bos_token(False)
    writer.add_chat_template(CHAT_TEMPLATE)
