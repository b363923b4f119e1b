"""Acceptance on the tiny model: constrained requests with different formats, unconstrained ones and several
adapters decode in the same batches; every constrained output matches its format, and greedy unconstrained
outputs are the same as without constrained neighbours."""
from __future__ import annotations

import itertools

from engine import SamplingParams
from tests.helpers.structured import MAX_FORMAT_TOKENS, check_output, cycle_formats
from tests.structured.conftest import ADAPTERS, prompts

FREE = SamplingParams(max_new_tokens=24, temperature=0.0, ignore_eos=True)


def mixed_workload(n_constrained: int, seed: int = 0):
    """(prompt, params, adapter, format name or None) for n_constrained constrained requests and one unconstrained
    request after every second one; adapters round-robin; greedy and seeded sampling alternate."""
    formats = cycle_formats()
    adapters = itertools.cycle(ADAPTERS)
    work = []
    for i, prompt in enumerate(prompts(n_constrained + n_constrained // 2, seed)):
        adapter = next(adapters)
        if i % 3 == 2:
            work.append((prompt, FREE, adapter, None))
            continue
        name, fmt = next(formats)
        temperature = 0.0 if i % 2 else 0.9
        params = SamplingParams(max_new_tokens=MAX_FORMAT_TOKENS, temperature=temperature, seed=i,
                                response_format=fmt)
        work.append((prompt, params, adapter, name))
    return work


def record_batches(engine) -> list[tuple[set, set, int]]:
    """Wraps the runner: per step, (adapters, format kinds, unconstrained sampled rows)."""
    seen, real = [], engine.runner.run

    def run(chunks, states):
        rows = [c for c in chunks if c.sample]
        fmts = {states(c.request.request_id).params.response_format for c in rows}
        seen.append(({c.request.adapter_id for c in rows}, {f.kind for f in fmts if f is not None},
                     sum(1 for c in rows if c.request.params.response_format is None)))
        return real(chunks, states)

    engine.runner.run = run
    return seen


def test_two_hundred_constrained_requests_in_mixed_batches(tiny_engine):
    work = mixed_workload(200)
    assert sum(1 for w in work if w[3] is not None) == 200
    batches = record_batches(tiny_engine)
    try:
        outs = tiny_engine.generate([w[0] for w in work], [w[1] for w in work], [w[2] for w in work])
    finally:
        del tiny_engine.runner.run
    for (_, _, adapter, name), out in zip(work, outs):
        if name is None:
            assert out.finish_reason == "length"
            continue
        assert out.finish_reason in ("stop", "eos"), (name, out.finish_reason, out.text)
        check_output(name, out.text)
    # the batches really were mixed: several adapters, several kinds of format and free rows in one step
    assert any(len(a) >= 3 and len(k) >= 3 and free > 0 for a, k, free in batches)
    assert tiny_engine.check_invariants()["kv_blocks_used"] == 0
    assert tiny_engine.grammars.stats().hits > 0


def test_greedy_free_outputs_unchanged_by_constrained_neighbours(tiny_engine):
    work = mixed_workload(60, seed=3)
    free = [(p, a) for p, _, a, name in work if name is None]
    alone = [tiny_engine.generate([p], FREE, [a])[0].token_ids for p, a in free]
    free_only = tiny_engine.generate([p for p, _ in free], FREE, [a for _, a in free])
    assert [o.token_ids for o in free_only] == alone
    mixed = tiny_engine.generate([w[0] for w in work], [w[1] for w in work], [w[2] for w in work])
    assert [o.token_ids for o, w in zip(mixed, work) if w[3] is None] == alone
