"""Batched token sampling over one decoding step.

:class:`Sampler` turns logits ``[B, V]`` into one token per row, each row with its own
:class:`~engine.scheduling.sampling_params.SamplingParams` and token history (a :class:`SamplingState`). Per row, in order:

1. penalties: repetition (HF, over prompt + output), then frequency and presence (OpenAI, over output);
2. ``min_new_tokens``: while ``len(output) < min_new_tokens`` the ``stop_token_ids`` and, unless ``ignore_eos``,
   the EOS ids (and the row's ``end_of_turn_ids``) are set to ``-inf`` (with ``ignore_eos`` EOS cannot end the request, so it is never masked and may
   be sampled as an ordinary token);
3. response format: rows with a grammar matcher (``SamplingState.matcher``) get every token that cannot continue
   their format set to ``-inf`` (one packed bitmask for the constrained rows, :mod:`engine.structured.bitmask`);
   rows without one are not touched and a step without any does no grammar work at all;
4. greedy rows (``params.greedy``) take the argmax of the result: exact and deterministic;
5. other rows: divide by temperature, then truncate with top-k (exactly ``k`` tokens, ties broken towards the lower
   id), top-p (the smallest prefix of the sorted distribution whose mass reaches ``top_p``, after top-k) and min-p
   (drop tokens with probability below ``min_p`` times the largest), then draw from the softmax.

Log-probabilities (``params.logprobs`` not ``None``) are ``log_softmax`` of the *processed* row: after steps 1 to 3
and the temperature of step 5 (greedy rows use temperature 1), **before** the top-k / top-p / min-p truncation, so
alternatives outside the truncated support still get finite values; masked tokens (``-inf``) are never listed
among the top alternatives. :meth:`Sampler.process` returns exactly these processed logits.

Randomness: a seeded request draws with its own :class:`torch.Generator` (``SamplingState.generator``, created
lazily from ``params.seed`` on the logits' device), one ``torch.multinomial`` call per seeded row, so its tokens
depend only on its own logits and generator, never on what else is in the batch. Unseeded rows share the
sampler's generator.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from engine.scheduling.sampling_params import SamplingParams
from engine.structured.bitmask import TokenBitmask, allowed_any, apply_token_bitmask
from engine.structured.matcher import GrammarMatcher


def make_generator(seed: int, device: torch.device | str = "cpu") -> torch.Generator:
    """A generator on ``device`` seeded with ``seed``."""
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    return gen


@dataclass
class SamplingState:
    """The sampler's view of one request; the engine owns it and appends each sampled token to ``output_token_ids``.

    ``generator`` is created by the sampler on first use when ``params.seed`` is set (or pass one made with
    :func:`make_generator`). ``prompt_token_ids`` must not change once sampling has started. ``matcher`` (set for
    a request with a response format) is brought up to ``output_token_ids`` by the sampler before each mask.
    """

    params: SamplingParams
    prompt_token_ids: list[int]
    output_token_ids: list[int] = field(default_factory=list)
    generator: torch.Generator | None = None
    matcher: GrammarMatcher | None = None
    end_of_turn_ids: tuple[int, ...] = ()  # end the request like EOS (and are masked with it by min_new_tokens)
    _prompt_tensor: torch.Tensor | None = field(default=None, repr=False, compare=False)

    def prompt_tensor(self, device: torch.device) -> torch.Tensor:
        """The prompt ids as a long tensor on ``device``, cached across steps."""
        t = self._prompt_tensor
        if t is None or t.device != device or t.numel() != len(self.prompt_token_ids):
            t = torch.tensor(self.prompt_token_ids, dtype=torch.long, device=device)
            self._prompt_tensor = t
        return t


@dataclass
class SampleResult:
    """One step's result, one entry per row.

    ``logprobs[i]`` is the sampled token's log-probability (see module docstring) or ``None`` when the row's
    ``params.logprobs`` is ``None``; ``top_logprobs[i]`` is the top-``n`` ``(token_id, logprob)`` list sorted by
    decreasing logprob (empty for ``logprobs=0``, ``None`` when not requested).
    """

    token_ids: list[int]
    logprobs: list[float | None]
    top_logprobs: list[list[tuple[int, float]] | None]


def _copy(t: torch.Tensor) -> torch.Tensor:
    """A copy of ``t``; a CPU float32 one is copied by NumPy, single-threaded (a few MB at most: torch's
    intra-op threads cost more in synchronisation than the copy)."""
    if t.device.type == "cpu" and t.dtype == torch.float32 and t.is_contiguous():
        return torch.from_numpy(t.numpy().copy())
    return t.clone()


def _padded(rows: Sequence[Sequence[int]], pad: int, device: torch.device) -> torch.Tensor:
    width = max((len(r) for r in rows), default=0)
    return torch.tensor([list(r) + [pad] * (width - len(r)) for r in rows], dtype=torch.long,
                        device=device).reshape(len(rows), width)


class Sampler:
    """Samples one token per row. ``seed`` seeds the generator shared by unseeded rows (random when ``None``)."""

    def __init__(self, seed: int | None = None) -> None:
        self.seed = seed
        self._generators: dict[torch.device, torch.Generator] = {}
        self._bitmask = TokenBitmask()

    def _shared_generator(self, device: torch.device) -> torch.Generator:
        gen = self._generators.get(device)
        if gen is None:
            gen = torch.Generator(device=device)
            if self.seed is None:
                gen.seed()
            else:
                gen.manual_seed(self.seed)
            self._generators[device] = gen
        return gen

    # -- processing ---------------------------------------------------------------------------------------------

    def process(self, logits: torch.Tensor, states: Sequence[SamplingState],
                eos_token_ids: Sequence[int] = ()) -> torch.Tensor:
        """Penalties, ``min_new_tokens`` and format masks, then temperature (1 for greedy rows), on a float32 copy.

        This is the distribution that log-probabilities are reported on; ``logits`` is never modified.
        """
        x = self._penalised(logits, states, eos_token_ids)
        temps = [1.0 if s.params.greedy else float(s.params.temperature) for s in states]
        if any(t != 1.0 for t in temps):
            x = x / torch.tensor(temps, dtype=x.dtype, device=x.device).unsqueeze(1)
        return x

    def _penalised(self, logits: torch.Tensor, states: Sequence[SamplingState],
                   eos_token_ids: Sequence[int]) -> torch.Tensor:
        if logits.dim() != 2 or logits.shape[0] != len(states):
            raise ValueError(f"expected logits of shape [{len(states)}, vocab], got {tuple(logits.shape)}")
        x = logits.float()
        pen_rows = [i for i, s in enumerate(states) if s.params.has_penalties]
        min_rows = [i for i, s in enumerate(states) if len(s.output_token_ids) < s.params.min_new_tokens]
        fmt_rows = [i for i, s in enumerate(states) if s.matcher is not None]
        if not pen_rows and not min_rows and not fmt_rows:
            return x
        x = _copy(x) if x is logits else x
        if pen_rows:
            self._apply_penalties(x, pen_rows, states)
        eos = tuple(eos_token_ids)
        for i in min_rows:
            p = states[i].params
            ends = [] if p.ignore_eos else list(eos) + list(states[i].end_of_turn_ids)
            banned = list(p.stop_token_ids) + ends
            banned = [t for t in banned if 0 <= t < x.shape[1]]
            if banned:
                x[i, banned] = float("-inf")
        if fmt_rows:
            self._apply_formats(x, fmt_rows, states)
        return x

    def _apply_formats(self, x: torch.Tensor, rows: list[int], states: Sequence[SamplingState]) -> None:
        """In place on the given rows of ``x``: every token their grammar does not allow next becomes ``-inf``.

        A row whose matcher cannot go on, or whose grammar allows no token within the logits, is left unmasked
        (so the step never meets a row of no finite logit); recording its token then fails that request alone."""
        matchers = [states[i].matcher for i in rows]
        bitmask = self._bitmask.rows(len(rows), matchers[0].vocab_size)
        for j, (i, m) in enumerate(zip(rows, matchers)):
            m.fill_bitmask(bitmask[j], states[i].output_token_ids)
        for j in np.flatnonzero(~allowed_any(bitmask, x.shape[1])):
            bitmask[j].fill_(-1)
        apply_token_bitmask(x, rows, bitmask)

    @staticmethod
    def _apply_penalties(x: torch.Tensor, rows: list[int], states: Sequence[SamplingState]) -> None:
        """In place on the given rows of ``x``: repetition penalty, then frequency and presence penalties."""
        device, vocab = x.device, x.shape[1]
        idx = torch.tensor(rows, dtype=torch.long, device=device)
        sub = x.index_select(0, idx)
        n = len(rows)
        outs = _padded([states[i].output_token_ids for i in rows], vocab, device)
        counts = torch.zeros(n, vocab + 1, dtype=x.dtype, device=device)
        counts.scatter_add_(1, outs, torch.ones_like(outs, dtype=x.dtype))
        counts = counts[:, :vocab]
        params = [states[i].params for i in rows]
        rep = torch.tensor([p.repetition_penalty for p in params], dtype=x.dtype, device=device).unsqueeze(1)
        rep_rows = [j for j, p in enumerate(params) if p.repetition_penalty != 1.0]
        if rep_rows:
            seen = counts > 0
            for j in rep_rows:
                prompt = states[rows[j]].prompt_tensor(device)
                if prompt.numel():
                    seen[j].index_fill_(0, prompt, True)
            seen &= (rep != 1.0)
            sub = torch.where(seen, torch.where(sub > 0, sub / rep, sub * rep), sub)
        freq = torch.tensor([p.frequency_penalty for p in params], dtype=x.dtype, device=device).unsqueeze(1)
        pres = torch.tensor([p.presence_penalty for p in params], dtype=x.dtype, device=device).unsqueeze(1)
        sub = sub - freq * counts - pres * (counts > 0).to(x.dtype)
        x.index_copy_(0, idx, sub)

    @staticmethod
    def truncate(x: torch.Tensor, params: Sequence[SamplingParams]) -> torch.Tensor:
        """Top-k, then top-p, then min-p on temperature-scaled logits ``x``; dropped tokens become ``-inf``.

        Rows whose parameters disable all three come back bit-identical.
        """
        vocab = x.shape[1]
        device = x.device
        kp_rows = [j for j, p in enumerate(params) if 0 < p.top_k < vocab or p.top_p < 1.0]
        out = x
        if kp_rows:
            out = x.clone()
            idx = torch.tensor(kp_rows, dtype=torch.long, device=device)
            sub = x.index_select(0, idx)
            ks = torch.tensor([params[j].top_k if 0 < params[j].top_k < vocab else vocab for j in kp_rows],
                              device=device).unsqueeze(1)
            ps = torch.tensor([params[j].top_p for j in kp_rows], dtype=x.dtype, device=device).unsqueeze(1)
            vals, order = sub.sort(dim=-1, descending=True, stable=True)
            vals = vals.masked_fill(torch.arange(vocab, device=device).unsqueeze(0) >= ks, float("-inf"))
            probs = vals.softmax(dim=-1)
            before = probs.cumsum(dim=-1) - probs  # mass of strictly more likely tokens
            drop = (before >= ps) & (ps < 1.0)
            drop[:, 0] = False
            vals = vals.masked_fill(drop, float("-inf"))
            out.index_copy_(0, idx, torch.empty_like(sub).scatter_(1, order, vals))
        mp_rows = [j for j, p in enumerate(params) if p.min_p > 0.0]
        if mp_rows:
            out = out.clone() if out is x else out
            idx = torch.tensor(mp_rows, dtype=torch.long, device=device)
            sub = out.index_select(0, idx)
            probs = sub.softmax(dim=-1)
            mins = torch.tensor([params[j].min_p for j in mp_rows], dtype=x.dtype, device=device).unsqueeze(1)
            thresh = probs.max(dim=-1, keepdim=True).values * mins
            out.index_copy_(0, idx, sub.masked_fill(probs < thresh, float("-inf")))
        return out

    # -- sampling -----------------------------------------------------------------------------------------------

    def __call__(self, logits: torch.Tensor, states: Sequence[SamplingState],
                 eos_token_ids: Sequence[int] = ()) -> SampleResult:
        """Sample one token per row of ``logits`` ``[B, V]``; ``states[i]`` describes row ``i``.

        The states are not modified except that a seeded row's ``generator`` is created (and advanced).
        """
        n_rows = len(states)
        if n_rows == 0:
            return SampleResult([], [], [])
        x = self._penalised(logits, states, eos_token_ids)
        greedy = [s.params.greedy for s in states]
        want_lp = any(s.params.logprobs is not None for s in states)
        if all(greedy):  # fast path: one argmax, no temperature
            tokens = x.argmax(dim=-1)
            return self._result(tokens, x if want_lp else None, states)
        temps = [1.0 if g else float(s.params.temperature) for g, s in zip(greedy, states)]
        scaled = x / torch.tensor(temps, dtype=x.dtype, device=x.device).unsqueeze(1)
        tokens = x.argmax(dim=-1)
        rows = [i for i, g in enumerate(greedy) if not g]
        idx = torch.tensor(rows, dtype=torch.long, device=x.device)
        probs = self.truncate(scaled.index_select(0, idx), [states[i].params for i in rows]).softmax(dim=-1)
        drawn = torch.empty(len(rows), dtype=torch.long, device=x.device)
        shared = [j for j, i in enumerate(rows) if states[i].params.seed is None]
        if shared:
            sidx = torch.tensor(shared, dtype=torch.long, device=x.device)
            pick = torch.multinomial(probs.index_select(0, sidx), 1, generator=self._shared_generator(x.device))
            drawn.index_copy_(0, sidx, pick.squeeze(1))
        for j, i in enumerate(rows):
            state = states[i]
            if state.params.seed is None:
                continue
            if state.generator is None:
                state.generator = make_generator(state.params.seed, x.device)
            drawn[j] = torch.multinomial(probs[j], 1, generator=state.generator)[0]
        tokens.index_copy_(0, idx, drawn)
        return self._result(tokens, scaled if want_lp else None, states)

    @staticmethod
    def _result(tokens: torch.Tensor, processed: torch.Tensor | None,
                states: Sequence[SamplingState]) -> SampleResult:
        token_ids = tokens.tolist()
        logprobs: list[float | None] = [None] * len(states)
        tops: list[list[tuple[int, float]] | None] = [None] * len(states)
        if processed is None:
            return SampleResult(token_ids, logprobs, tops)
        rows = [i for i, s in enumerate(states) if s.params.logprobs is not None]
        idx = torch.tensor(rows, dtype=torch.long, device=processed.device)
        lsm = processed.index_select(0, idx).log_softmax(dim=-1)
        chosen = lsm.gather(1, tokens.index_select(0, idx).unsqueeze(1)).squeeze(1).tolist()
        n_max = max(states[i].params.logprobs or 0 for i in rows)
        top_vals: list[list[float]] = [[] for _ in rows]
        top_ids: list[list[int]] = [[] for _ in rows]
        if n_max:
            tv, ti = lsm.topk(min(n_max, lsm.shape[1]), dim=-1)
            top_vals, top_ids = tv.tolist(), ti.tolist()
        for j, i in enumerate(rows):
            n = states[i].params.logprobs or 0
            logprobs[i] = chosen[j]
            tops[i] = [(t, v) for t, v in zip(top_ids[j][:n], top_vals[j][:n]) if v != float("-inf")]
        return SampleResult(token_ids, logprobs, tops)
