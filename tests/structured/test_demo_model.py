"""Acceptance on the demo model with its demo adapters (trained once, about a minute, then cached under
``$ASPEN_HOME/demo/adapters``): 200 constrained requests with different formats, mixed with unconstrained ones and
the three adapters in the same batches; every constrained output matches its format, and greedy unconstrained
outputs do not change with constrained neighbours."""
from __future__ import annotations

import itertools
import os

import pytest

from aspen.demo import DEMO_PROMPTS, default_home, ensure_demo_base
from aspen.demo.adapters import DEMO_ADAPTERS, ensure_demo_adapters
from engine import LLMEngine, SamplingParams
from tests.helpers.structured import MAX_FORMAT_TOKENS, check_output, cycle_formats

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def demo_engine():
    base = ensure_demo_base()
    adapter_dir = os.path.join(default_home(), "demo", "adapters")
    ensure_demo_adapters(base, adapter_dir, progress=False)
    return LLMEngine(model=base, adapter_dir=adapter_dir, progress=False, max_num_seqs=32, num_kv_blocks=1024,
                     block_size=16)


def workload(n_constrained: int):
    formats = cycle_formats()
    adapters = itertools.cycle((None, *DEMO_ADAPTERS))
    prompts = itertools.cycle(DEMO_PROMPTS)
    free = SamplingParams(max_new_tokens=32, temperature=0.0)
    work = []
    for i in range(n_constrained + n_constrained // 2):
        prompt, adapter = next(prompts), next(adapters)
        if i % 3 == 2:
            work.append((prompt, free, adapter, None))
            continue
        name, fmt = next(formats)
        params = SamplingParams(max_new_tokens=MAX_FORMAT_TOKENS, temperature=0.0 if i % 2 else 0.8, seed=i,
                                response_format=fmt)
        work.append((prompt, params, adapter, name))
    return work


def test_two_hundred_constrained_requests_with_the_demo_adapters(demo_engine):
    work = workload(200)
    free = [(p, sp, a) for p, sp, a, name in work if name is None]
    alone = [demo_engine.generate([p], sp, [a])[0].token_ids for p, sp, a in free]
    outs = demo_engine.generate([w[0] for w in work], [w[1] for w in work], [w[2] for w in work])
    for (_, _, adapter, name), out in zip(work, outs):
        if name is not None:
            assert out.finish_reason in ("stop", "eos"), (name, adapter, out.finish_reason, out.text)
            check_output(name, out.text)
    assert [o.token_ids for o, w in zip(outs, work) if w[3] is None] == alone
    assert demo_engine.check_invariants()["kv_blocks_used"] == 0
