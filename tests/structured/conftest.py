"""A tiny base checkpoint (512 positions) and four PEFT adapters, made once for the structured-output tests."""
from __future__ import annotations

import random

import pytest

from engine import LLMEngine
from tests.helpers.adapters import ALL7, ATTN, make_peft_adapter
from tests.helpers.tiny_models import make_checkpoint

ADAPTERS = (None, "a0", "a1", "a2")


@pytest.fixture(scope="session")
def tiny_setup(tmp_path_factory):
    base = make_checkpoint(str(tmp_path_factory.mktemp("structured-base")), "llama", max_position_embeddings=512)
    root = tmp_path_factory.mktemp("structured-adapters")
    for i, (r, t) in enumerate([(4, ATTN), (8, ALL7), (2, ["v_proj"])]):
        make_peft_adapter(base, str(root / f"a{i}"), seed=i, r=r, lora_alpha=2 * r, target_modules=t)
    return base, str(root)


def make_engine(setup, **kw) -> LLMEngine:
    base, root = setup
    kw.setdefault("num_kv_blocks", 512)
    kw.setdefault("block_size", 4)
    kw.setdefault("lora_pool_pages", 2048)
    return LLMEngine(model=base, adapter_dir=root, progress=False, **kw)


@pytest.fixture(scope="module")
def tiny_engine(tiny_setup):
    return make_engine(tiny_setup, max_num_seqs=32)


def prompts(n: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(4, 320) for _ in range(rng.randrange(3, 30))] for _ in range(n)]
