"""A real pretrained GGUF checkpoint, SmolLM2-135M-Instruct (Q4_1), fetched once through
``tests.helpers.real_model``: our model's logits on its converted checkpoint equal transformers'. Slow (the first
run downloads 93 MB and converts the file; later runs load both from ``$ASPEN_HOME``); skipped with the reason
where the file cannot be had."""
from __future__ import annotations

import os

import pytest
import torch

import aspen
from aspen.model.gguf_cache import GGUFCheckpoint
from tests.helpers.real_model import smollm2_gguf

MESSAGES = [{"role": "user", "content": "What is the capital of France?"}]


def _chat_ids(tokenizer) -> list[int]:
    ids = tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=True)
    return list(ids["input_ids"] if hasattr(ids, "keys") else ids)


@pytest.mark.slow
def test_smollm2_logits_equal_transformers_on_the_converted_checkpoint():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = smollm2_gguf()
    lm = aspen.load_model(path, dtype="float32")
    assert (lm.config.family, lm.config.num_hidden_layers, lm.config.vocab_size) == ("llama", 30, 49152)
    ids = _chat_ids(lm.tokenizer)
    directory, name = os.path.split(path)
    assert ids == _chat_ids(AutoTokenizer.from_pretrained(directory, gguf_file=name))  # the file's own tokenizer
    assert lm.tokenizer.decode(ids).startswith("<|im_start|>system\n") and lm.tokenizer.eos_token == "<|im_end|>"

    ours = lm.score(ids)
    converted = GGUFCheckpoint(path, torch.float32).directory
    with torch.inference_mode():
        hf = AutoModelForCausalLM.from_pretrained(converted, dtype=torch.float32).eval()
        ref = hf(torch.tensor([ids])).logits[0]
    assert ours.shape == ref.shape == (len(ids), 49152)
    error = (ours - ref).abs().max().item()
    if error >= 1e-4:  # say whether it is fp32 rounding (both as far from float64) or a real difference
        with torch.inference_mode():
            exact = hf.double()(torch.tensor([ids])).logits[0]
        pytest.fail(f"max |ours - transformers| = {error:.2e} >= 1e-4; from float64: ours "
                    f"{(ours.double() - exact).abs().max().item():.2e}, transformers' float32 "
                    f"{(ref.double() - exact).abs().max().item():.2e}")
    assert lm.tokenizer.decode([int(ours[-1].argmax())]) == "The"  # "The capital of France is Paris."
