"""The token bitmask and the batched sampler with constrained rows: the mask is exact, only constrained rows
change, unconstrained rows get bit-identical logits and tokens, and a row whose grammar cannot go on never
poisons the step."""
from __future__ import annotations

import random

import pytest
import torch

from engine import ResponseFormat, SamplingParams
from engine.sampler import Sampler, SamplingState
from engine.structured.bitmask import TokenBitmask, apply_token_bitmask, unpack, words_for

V = 100


def random_bitmask(rows: int, vocab: int, seed: int) -> tuple[torch.Tensor, list[set[int]]]:
    rng = random.Random(seed)
    sets = [{t for t in range(vocab) if rng.random() < 0.3} | {rng.randrange(vocab)} for _ in range(rows)]
    packed = TokenBitmask().rows(rows, vocab)
    packed.zero_()
    for j, s in enumerate(sets):
        for t in s:
            word = int(packed[j, t // 32]) | (1 << (t % 32))
            packed[j, t // 32] = word - (1 << 32) if word >= 1 << 31 else word
    return packed, sets


def test_unpack_and_apply_are_exact():
    packed, sets = random_bitmask(5, V, 0)
    allowed = unpack(packed, V)
    assert [set(r.nonzero()[0].tolist()) for r in allowed] == sets
    x = torch.randn(8, V)
    before = x.clone()
    rows = [1, 3, 4, 6, 7]
    apply_token_bitmask(x, rows, packed)
    for j, i in enumerate(rows):
        finite = set(torch.isfinite(x[i]).nonzero().flatten().tolist())
        assert finite == sets[j] and torch.equal(x[i][list(sets[j])], before[i][list(sets[j])])
    for i in (0, 2, 5):
        assert torch.equal(x[i], before[i])
    full = torch.randn(5, V)
    apply_token_bitmask(full, range(5), packed)  # every row constrained
    assert [set(torch.isfinite(r).nonzero().flatten().tolist()) for r in full] == sets
    other = before.double()  # the torch path (other dtypes and devices) gives the same result
    apply_token_bitmask(other, rows, packed)
    assert torch.equal(other.float(), x)


class FakeMatcher:
    """Allows a fixed set of tokens; ``broken`` writes an empty mask (as a grammar allowing no token here)."""

    def __init__(self, allowed: set[int], broken: bool = False) -> None:
        self.allowed, self.broken, self.vocab_size = allowed, broken, V

    def fill_bitmask(self, row, tokens) -> bool:
        row.zero_()
        if self.broken:
            return True
        for t in self.allowed:
            word = int(row[t // 32]) | (1 << (t % 32))
            row[t // 32] = word - (1 << 32) if word >= 1 << 31 else word
        return True


def states(specs, seed_base=0):
    out = []
    for k, (matcher, temperature) in enumerate(specs):
        fmt = ResponseFormat.json_object() if matcher is not None else None
        params = SamplingParams(max_new_tokens=8, temperature=temperature, seed=seed_base + k, logprobs=3,
                                response_format=fmt)
        out.append(SamplingState(params, [5, 6], [], matcher=matcher))
    return out


def test_only_constrained_rows_change():
    torch.manual_seed(0)
    logits = torch.randn(6, V)
    original = logits.clone()
    free = [(None, 0.0), (None, 1.0), (None, 0.7)]
    mixed = [(None, 0.0), (FakeMatcher({3, 50, 99}), 0.0), (None, 1.0), (FakeMatcher({7}), 1.0), (None, 0.7),
             (FakeMatcher({1, 2}), 0.5)]
    ref = Sampler(seed=1)(logits[[0, 2, 4]], states(free))
    ref_x = Sampler().process(logits[[0, 2, 4]], states(free))
    s = Sampler(seed=1)
    got_states = states(mixed)
    for k, i in enumerate((0, 2, 4)):  # same per-row seeds as the free-only batch
        got_states[i] = states(free, seed_base=0)[k]
    out = s(logits, got_states)
    x = Sampler().process(logits, got_states)
    assert [out.token_ids[i] for i in (0, 2, 4)] == ref.token_ids
    assert torch.equal(x[[0, 2, 4]], ref_x)
    assert out.token_ids[1] in {3, 50, 99} and out.token_ids[3] == 7 and out.token_ids[5] in {1, 2}
    assert abs(out.logprobs[3]) < 1e-6  # the only allowed token
    assert [t for t, _ in out.top_logprobs[3]] == [7]  # masked tokens are never listed
    assert torch.equal(logits, original)  # the caller's logits are never modified


def test_free_batch_does_no_grammar_work(monkeypatch):
    calls = []
    monkeypatch.setattr(Sampler, "_apply_formats", lambda *a: calls.append(a))
    Sampler()(torch.randn(3, V), states([(None, 0.0), (None, 1.0), (None, 0.0)]))
    assert calls == []


def test_a_row_with_no_allowed_token_does_not_poison_the_step():
    logits = torch.randn(3, V)
    out = Sampler(seed=0)(logits, states([(FakeMatcher(set(), broken=True), 1.0), (None, 1.0),
                                          (FakeMatcher({4}), 1.0)]))
    assert all(0 <= t < V for t in out.token_ids) and out.token_ids[2] == 4


def test_bitmask_buffer_reused():
    buf = TokenBitmask()
    a = buf.rows(4, 1000)
    b = buf.rows(2, 1000)
    assert a.shape == (4, words_for(1000)) and b.shape == (2, words_for(1000))
    assert a.data_ptr() == b.data_ptr() and b.is_contiguous()


@pytest.mark.gpu
def test_device_path_matches_the_cpu_path():
    packed, _ = random_bitmask(3, V, 1)
    x = torch.randn(6, V)
    on_device = x.cuda()
    apply_token_bitmask(x, [0, 2, 5], packed)
    apply_token_bitmask(on_device, [0, 2, 5], packed)
    assert torch.equal(on_device.cpu(), x)
