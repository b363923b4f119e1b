"""The async wrapper: streams from a background thread, aborts on early exit, validation errors surface."""
from __future__ import annotations

import asyncio

import pytest

from engine import LLMEngine, SamplingParams
from engine.async_engine import AsyncLLMEngine
from tests.helpers.tiny_models import make_checkpoint


@pytest.fixture(scope="module")
def aeng(tmp_path_factory):
    base = make_checkpoint(str(tmp_path_factory.mktemp("base")), "qwen2")
    eng = AsyncLLMEngine(LLMEngine(model=base, progress=False, num_kv_blocks=64, block_size=4)).start()
    yield eng
    eng.shutdown()


def test_stream_equals_offline_and_cancel_frees(aeng):
    params = SamplingParams(max_new_tokens=8, temperature=0.0, ignore_eos=True)
    prompt = [5, 6, 7, 8, 9]

    async def main():
        async def collect():
            deltas, last = [], None
            async for out in aeng.generate(prompt, params):
                deltas.append(out.delta_token_ids)
                last = out
            return [t for d in deltas for t in d], last

        results = await asyncio.gather(*(collect() for _ in range(4)))
        # a stream abandoned after its first output
        agen = aeng.generate(prompt, SamplingParams(max_new_tokens=50, temperature=0.0, ignore_eos=True))
        await agen.__anext__()
        await agen.aclose()
        await asyncio.sleep(0.3)
        return results

    results = asyncio.run(main())
    for tokens, last in results:
        assert last.finished and tokens == list(last.token_ids) == list(results[0][1].token_ids)
    state = aeng.engine.check_invariants()
    assert state["kv_blocks_used"] == 0 and state["tracked"] == 0 and aeng.num_in_flight == 0


def test_validation_error_raised_before_stream(aeng):
    async def main():
        async for _ in aeng.generate([], SamplingParams()):
            pass

    with pytest.raises(ValueError, match="prompt is empty"):
        asyncio.run(main())
    assert aeng.num_in_flight == 0
