"""The packed token bitmask of constrained rows and its application to their logits.

A bitmask row holds one bit per vocabulary entry, 32 to an ``int32`` word (bit ``t % 32`` of word ``t // 32``; set
= the token may be sampled). The grammar engine writes the rows on the CPU (:meth:`TokenBitmask.rows`,
:meth:`engine.structured.matcher.GrammarMatcher.fill_bitmask`); :func:`apply_token_bitmask` unpacks them on the
logits' device and sets the disallowed logits of those rows to ``-inf``. Other rows are not touched.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

_SHIFTS: dict[torch.device, torch.Tensor] = {}


def words_for(vocab_size: int) -> int:
    """``int32`` words of one bitmask row for ``vocab_size`` tokens."""
    return (vocab_size + 31) // 32


class TokenBitmask:
    """A reusable CPU buffer for the bitmask rows of one step (grown on demand, never shrunk)."""

    def __init__(self) -> None:
        self._buffer = torch.empty(0, dtype=torch.int32)

    def rows(self, n: int, vocab_size: int) -> torch.Tensor:
        """A contiguous ``[n, words_for(vocab_size)]`` int32 CPU tensor (contents unspecified)."""
        words = words_for(vocab_size)
        if self._buffer.numel() < n * words:
            self._buffer = torch.empty(n * words, dtype=torch.int32)
        return self._buffer[:n * words].view(n, words)


def unpack(bitmask: torch.Tensor, vocab_size: int, device: torch.device) -> torch.Tensor:
    """Bool ``[n, vocab_size]`` on ``device``: True where the packed ``bitmask`` rows allow the token."""
    shifts = _SHIFTS.get(device)
    if shifts is None:
        shifts = _SHIFTS[device] = torch.arange(32, dtype=torch.int32, device=device)
    packed = bitmask.to(device, non_blocking=True)
    bits = (packed.unsqueeze(-1) >> shifts) & 1  # arithmetic shift of negative words: & 1 keeps the one bit
    return bits.view(packed.shape[0], -1)[:, :vocab_size].bool()


def apply_token_bitmask(x: torch.Tensor, rows: Sequence[int], bitmask: torch.Tensor) -> None:
    """Set ``x[rows[j], t] = -inf`` in place wherever row ``j`` of ``bitmask`` does not allow token ``t``.
    ``x`` is ``[B, V]`` float; the bitmask must cover at least ``V`` tokens (bits past ``V`` are ignored)."""
    if not rows:
        return
    vocab = x.shape[1]
    if bitmask.shape[1] * 32 < vocab:
        raise ValueError(f"a bitmask of {bitmask.shape[1]} words covers {bitmask.shape[1] * 32} tokens, fewer than "
                         f"the {vocab} logits")
    allowed = unpack(bitmask, vocab, x.device)
    if len(rows) == x.shape[0] and list(rows) == list(range(x.shape[0])):
        x.masked_fill_(~allowed, float("-inf"))
        return
    idx = torch.tensor(list(rows), dtype=torch.long, device=x.device)
    x.index_copy_(0, idx, x.index_select(0, idx).masked_fill_(~allowed, float("-inf")))
