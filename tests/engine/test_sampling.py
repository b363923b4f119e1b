"""SamplingParams validation and the batched Sampler: greedy, truncation support, penalties, seeding, logprobs."""
from __future__ import annotations

import math

import pytest
import torch

from engine.sampler import Sampler, SamplingState, make_generator
from engine.scheduling.sampling_params import SamplingParams, SamplingParamsError

# ---------------------------------------------------------------------------------------------------------------
# SamplingParams


@pytest.mark.parametrize("field,value", [
    ("temperature", -0.1), ("temperature", float("nan")), ("temperature", float("inf")), ("temperature", "1"),
    ("temperature", 1e4 * 1.001), ("temperature", 1e300),
    ("top_p", 0.0), ("top_p", 1.5), ("top_p", -0.2),
    ("top_k", -1), ("top_k", 2.5),
    ("min_p", -0.01), ("min_p", 1.01),
    ("repetition_penalty", 0.0), ("repetition_penalty", -1.0), ("repetition_penalty", float("inf")),
    ("repetition_penalty", 1e-300), ("repetition_penalty", 2e4),
    ("presence_penalty", 2.5), ("presence_penalty", -2.01),
    ("frequency_penalty", 3.0), ("frequency_penalty", -3.0),
    ("max_new_tokens", 0), ("max_new_tokens", -5), ("max_new_tokens", True),
    ("min_new_tokens", -1), ("min_new_tokens", 17),
    ("logprobs", -1), ("logprobs", 21),
    ("seed", -1), ("seed", 2**63), ("seed", 1.5),
    ("stop", [""]), ("stop", ["x" * 257]), ("stop", [f"s{i}" for i in range(17)]), ("stop", [3]),
    ("stop_token_ids", [-1]), ("stop_token_ids", [1.0]),
    ("ignore_eos", 1), ("skip_special_tokens", None),
])
def test_validation_names_field(field: str, value: object) -> None:
    with pytest.raises(SamplingParamsError) as info:
        SamplingParams(**{field: value})
    assert info.value.field == field
    assert field in str(info.value)
    assert info.value.reason and "expected" in info.value.reason
    assert isinstance(info.value, ValueError)


def test_params_defaults_and_normalisation() -> None:
    p = SamplingParams()
    assert (p.max_new_tokens, p.temperature, p.top_k, p.top_p, p.logprobs) == (16, 1.0, 0, 1.0, None)
    assert not p.greedy and not p.has_penalties
    assert SamplingParams(temperature=0).greedy
    assert SamplingParams(stop="END").stop == ("END",)
    q = SamplingParams(stop=["a", "b"], stop_token_ids=[5, 6])
    assert q.stop == ("a", "b") and q.stop_token_ids == (5, 6)
    assert hash(q) == hash(SamplingParams(stop=("a", "b"), stop_token_ids=(5, 6)))
    # Edges of the accepted ranges are accepted.
    SamplingParams(top_p=1.0, min_p=1.0, presence_penalty=-2, frequency_penalty=2, logprobs=20, seed=2**63 - 1,
                   min_new_tokens=16, stop=["x" * 256] * 16)
    SamplingParams(temperature=1e4, repetition_penalty=1e4)
    SamplingParams(repetition_penalty=1e-4)


def test_stops_on() -> None:
    assert SamplingParams().stops_on(2, [2])
    assert not SamplingParams(ignore_eos=True).stops_on(2, [2])
    assert SamplingParams(ignore_eos=True, stop_token_ids=[7]).stops_on(7, [2])


def test_check_context_and_vocab() -> None:
    p = SamplingParams(max_new_tokens=10, stop_token_ids=[3, 99])
    p.check_context(prompt_len=90, max_model_len=100)
    with pytest.raises(SamplingParamsError) as info:
        p.check_context(prompt_len=91, max_model_len=100)
    assert info.value.field == "max_new_tokens" and "<= 9" in info.value.reason
    p.check_vocab(100)
    with pytest.raises(SamplingParamsError) as info:
        p.check_vocab(99)
    assert info.value.field == "stop_token_ids"


# ---------------------------------------------------------------------------------------------------------------
# Sampler


def st(params: SamplingParams | None = None, prompt: list[int] | None = None,
       output: list[int] | None = None) -> SamplingState:
    return SamplingState(params or SamplingParams(), list(prompt or []), list(output or []))


@pytest.fixture
def logits() -> torch.Tensor:
    return torch.randn(8, 50, generator=make_generator(0))


def test_greedy_is_argmax(logits: torch.Tensor) -> None:
    states = [st(SamplingParams(temperature=0)) for _ in range(8)]
    before = logits.clone()
    res = Sampler()(logits, states)
    assert res.token_ids == logits.argmax(-1).tolist()
    assert torch.equal(logits, before)  # input untouched
    assert res.logprobs == [None] * 8 and res.top_logprobs == [None] * 8


def test_greedy_rows_in_mixed_batch_and_top_k_1(logits: torch.Tensor) -> None:
    params = [SamplingParams(temperature=0), SamplingParams(temperature=0.7, top_k=1),
              SamplingParams(temperature=1.3, top_k=1, top_p=0.5), SamplingParams(temperature=2.0, top_k=1)]
    states = [st(params[i % 4]) for i in range(8)]
    for _ in range(3):
        assert Sampler()(logits, states).token_ids == logits.argmax(-1).tolist()


def _support(params: SamplingParams, row: torch.Tensor, n: int = 3000) -> set[int]:
    states = [st(params) for _ in range(n)]
    return set(Sampler(seed=1)(row.expand(n, -1).contiguous(), states).token_ids)


ROW = torch.log(torch.tensor([0.30, 0.25, 0.20, 0.10, 0.08, 0.04, 0.02, 0.01]))


@pytest.mark.parametrize("params,allowed", [
    (SamplingParams(top_k=3), {0, 1, 2}),
    (SamplingParams(top_p=0.5), {0, 1}),          # 0.30 < 0.5 <= 0.55: tokens 0 and 1
    (SamplingParams(top_p=0.56), {0, 1, 2}),
    (SamplingParams(min_p=0.3), {0, 1, 2, 3}),    # p >= 0.09
    (SamplingParams(min_p=0.5), {0, 1, 2}),       # p >= 0.15
    (SamplingParams(top_k=5, top_p=0.6), {0, 1, 2}),
    (SamplingParams(top_k=2, min_p=0.1), {0, 1}),
    (SamplingParams(), set(range(8))),
])
def test_truncation_restricts_support(params: SamplingParams, allowed: set[int]) -> None:
    assert _support(params, ROW) == allowed


def test_top_p_after_top_k_renormalises() -> None:
    # After top_k=2 the kept mass is 0.30/0.55 and 0.25/0.55; top_p=0.5 keeps only token 0.
    assert _support(SamplingParams(top_k=2, top_p=0.5), ROW) == {0}


def test_penalties_match_formulas() -> None:
    row = torch.tensor([[2.0, -1.0, 0.5, 3.0, -2.0, 1.0]])
    params = SamplingParams(repetition_penalty=2.0, presence_penalty=0.5, frequency_penalty=0.25, temperature=0)
    state = st(params, prompt=[0, 5], output=[1, 3, 3])
    got = Sampler().process(row, [state])
    # token 0: prompt, positive -> 2/2; token 1: output once, negative -> -1*2 - 0.25 - 0.5;
    # token 3: output twice -> 3/2 - 2*0.25 - 0.5; token 5: prompt -> 1/2; others unchanged.
    expected = torch.tensor([[1.0, -2.75, 0.5, 0.5, -2.0, 0.5]])
    torch.testing.assert_close(got, expected)
    # Presence/frequency only look at the output, repetition only affects seen tokens.
    only_freq = st(SamplingParams(frequency_penalty=1.0, temperature=0), prompt=[0], output=[2, 2, 2])
    torch.testing.assert_close(Sampler().process(row, [only_freq]),
                               torch.tensor([[2.0, -1.0, -2.5, 3.0, -2.0, 1.0]]))
    only_pres = st(SamplingParams(presence_penalty=-1.0, temperature=0), prompt=[0], output=[4, 4])
    torch.testing.assert_close(Sampler().process(row, [only_pres]),
                               torch.tensor([[2.0, -1.0, 0.5, 3.0, -1.0, 1.0]]))
    # Penalised argmax: token 3 would win unpenalised; after penalties token 0 (1.0) wins.
    assert Sampler()(row, [state]).token_ids == [0]


def test_penalties_in_batch_only_touch_their_rows(logits: torch.Tensor) -> None:
    states = [st(SamplingParams(temperature=0, repetition_penalty=1.5 if i % 2 else 1.0), prompt=[i], output=[1])
              for i in range(8)]
    got = Sampler().process(logits, states)
    for i in range(0, 8, 2):
        assert torch.equal(got[i], logits[i])
    alone = Sampler().process(logits[1:2], [states[1]])
    assert torch.equal(got[1:2], alone)


def test_temperature_scales_processed_logits(logits: torch.Tensor) -> None:
    states = [st(SamplingParams(temperature=0.5 + i / 4)) for i in range(8)]
    got = Sampler().process(logits, states)
    for i in range(8):
        torch.testing.assert_close(got[i], logits[i] / (0.5 + i / 4))


def test_min_new_tokens_masks_eos_and_stop_ids() -> None:
    eos, stop_id = 4, 2
    row = torch.tensor([[0.0, 1.0, 9.0, 2.0, 10.0]])
    params = SamplingParams(temperature=0, min_new_tokens=3, stop_token_ids=[stop_id])
    sampler = Sampler()
    state = st(params)
    picks = []
    for _ in range(4):
        tok = sampler(row, [state], eos_token_ids=[eos]).token_ids[0]
        picks.append(tok)
        state.output_token_ids.append(tok)
    assert picks == [3, 3, 3, eos]
    # ignore_eos: EOS cannot stop the request, so it is not masked; stop ids still are.
    ign = st(SamplingParams(temperature=0, min_new_tokens=3, stop_token_ids=[stop_id], ignore_eos=True))
    assert sampler(row, [ign], eos_token_ids=[eos]).token_ids == [eos]
    row2 = torch.tensor([[0.0, 1.0, 9.0, 2.0, -10.0]])
    assert sampler(row2, [ign], eos_token_ids=[eos]).token_ids == [3]
    # Random sampling never draws a masked token either.
    hot = [st(SamplingParams(temperature=1.0, min_new_tokens=1, stop_token_ids=[stop_id])) for _ in range(500)]
    toks = set(Sampler(seed=0)(row.expand(500, -1), hot, eos_token_ids=[eos]).token_ids)
    assert eos not in toks and stop_id not in toks


def _run_seeded(position: int, batch: int, steps: int = 12) -> list[int]:
    """Sample ``steps`` tokens for one seeded request placed at ``position`` among random unseeded neighbours."""
    vocab = 64
    noise = make_generator(1000 + position * 7 + batch)
    seeded = st(SamplingParams(seed=1234, temperature=0.9, top_p=0.9, repetition_penalty=1.2), prompt=[1, 2, 3])
    neighbours = [st(SamplingParams(temperature=1.0 + 0.1 * j, top_k=j + 3, frequency_penalty=0.3), prompt=[j])
                  for j in range(batch - 1)]
    sampler = Sampler()
    target_logits = make_generator(77)
    out = []
    for _ in range(steps):
        row = torch.randn(1, vocab, generator=target_logits)
        others = torch.randn(batch - 1, vocab, generator=noise)
        logits = torch.cat([others[:position], row, others[position:]])
        states = neighbours[:position] + [seeded] + neighbours[position:]
        res = sampler(logits, states)
        for s, t in zip(states, res.token_ids):
            s.output_token_ids.append(t)
        out.append(res.token_ids[position])
    return out


def test_seeded_request_independent_of_batch() -> None:
    alone = _run_seeded(0, 1)
    assert _run_seeded(0, 5) == alone
    assert _run_seeded(3, 5) == alone
    assert _run_seeded(6, 7) == alone
    assert len(set(alone)) > 1  # genuinely random


def test_unseeded_sampler_seed_reproducible(logits: torch.Tensor) -> None:
    states = [st() for _ in range(8)]
    assert Sampler(seed=5)(logits, states).token_ids == Sampler(seed=5)(logits, states).token_ids


@pytest.mark.parametrize("greedy", [True, False])
def test_logprobs(logits: torch.Tensor, greedy: bool) -> None:
    temp = 0.0 if greedy else 0.8
    counts = [None, 0, 1, 5, 20, None, 3, 0]
    states = [st(SamplingParams(temperature=temp, logprobs=n, top_k=5, presence_penalty=0.5), output=[i])
              for i, n in enumerate(counts)]
    sampler = Sampler(seed=3)
    processed = sampler.process(logits, states)
    res = sampler(logits, states)
    lsm = processed.log_softmax(-1)
    for i, n in enumerate(counts):
        tok = res.token_ids[i]
        if n is None:
            assert res.logprobs[i] is None and res.top_logprobs[i] is None
            continue
        assert math.isclose(res.logprobs[i], lsm[i, tok].item(), rel_tol=1e-6, abs_tol=1e-6)
        top = res.top_logprobs[i]
        assert len(top) == n
        assert [t for t, _ in top] == lsm[i].topk(n).indices.tolist()
        assert [v for _, v in top] == sorted((v for _, v in top), reverse=True)
        if greedy and n:
            assert top[0][0] == tok
