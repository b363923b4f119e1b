"""The real pretrained chat model (SmolLM2-135M-Instruct from its GGUF file) served over gRPC: a chat request
returns what transformers' ``apply_chat_template`` + greedy ``generate`` return, and a PEFT adapter trained on it
here gives the same greedy tokens through the server as through PEFT. Slow (the model is fetched once into
``$ASPEN_HOME``, converted once, and run by both sides); skipped with the reason where it cannot be had."""
from __future__ import annotations

import os

import pytest
import torch

from clients.client import AspenClient
from tests.helpers.real_model import smollm2_gguf
from tests.helpers.server import ServerThread

pytestmark = pytest.mark.slow

QUESTIONS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "You are a terse assistant."},
     {"role": "user", "content": "Name three primary colours."}],
]
NEW = 24


@pytest.fixture(scope="module")
def real(tmp_path_factory):
    from aspen.model.gguf_cache import GGUFCheckpoint

    path = smollm2_gguf()
    converted = GGUFCheckpoint(path, torch.float32).directory
    adapters = tmp_path_factory.mktemp("real-adapters")
    _train_peft_adapter(converted, str(adapters / "terse"))
    return {"base": path, "converted": converted, "adapters": str(adapters)}


def _train_peft_adapter(converted: str, out_dir: str) -> None:
    """A few AdamW steps of a rank-8 LoRA on one chat exchange: enough to move the greedy output."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(converted)
    torch.manual_seed(0)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(converted, dtype=torch.float32),
                           LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "down_proj"]))
    ids = tok.apply_chat_template(QUESTIONS[0] + [{"role": "assistant", "content": "Paris. Next question?"}],
                                  tokenize=True, return_dict=False)
    x = torch.tensor([ids])
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    for _ in range(4):
        loss = model(x, labels=x).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    model.save_pretrained(out_dir)


def _reference(real, messages, adapter: str | None) -> list[int]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(real["converted"])
    ids = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
    model = AutoModelForCausalLM.from_pretrained(real["converted"], dtype=torch.float32).eval()
    if adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, os.path.join(real["adapters"], adapter)).eval()
    x = torch.tensor([ids])
    with torch.inference_mode():
        out = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=NEW, do_sample=False)
    return out[0, len(ids):].tolist()


def test_chat_over_grpc_equals_transformers_and_peft_on_the_real_model(real):
    server = ServerThread(real, engine={"max_model_len": 1024})
    try:
        with AspenClient(server.address, timeout=300) as c:
            assert c.model_info().chat_template
            for adapter in (None, "terse"):
                for messages in QUESTIONS:
                    out = c.generate(messages, adapter, max_new_tokens=NEW, temperature=0.0)
                    assert list(out.token_ids) == _reference(real, messages, adapter), (adapter, messages)
            answer = c.generate(QUESTIONS[0], max_new_tokens=NEW, temperature=0.0)
            assert "Paris" in answer.text
    finally:
        server.stop()
