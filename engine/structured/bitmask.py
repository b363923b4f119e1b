"""The packed token bitmask of constrained rows and its application to their logits.

A bitmask row holds one bit per vocabulary entry, 32 to an ``int32`` word (bit ``t % 32`` of word ``t // 32``; set
= the token may be sampled). The grammar engine writes the rows on the CPU (:meth:`TokenBitmask.rows`,
:meth:`engine.structured.matcher.GrammarMatcher.fill_bitmask`); :func:`apply_token_bitmask` turns them into a
``0`` / ``-inf`` bias through a 256-entry table (one lookup per byte of the mask) and adds it to those rows of the
logits. Other rows are not touched.

On the CPU this is done with NumPy, single-threaded: the arrays are small (a row of a 32k vocabulary is 4 KB of
mask), and torch's intra-op threads would cost more in synchronisation than the work itself. On other devices
the table lookup and the add run there.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

#: _BIAS[byte, bit]: 0.0 where ``bit`` of ``byte`` is set (allowed), -inf elsewhere.
_BIAS = np.where((np.arange(256)[:, None] >> np.arange(8)[None, :]) & 1, 0.0, -np.inf).astype(np.float32)
_DEVICE_BIAS: dict[torch.device, torch.Tensor] = {}


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


def _bytes(bitmask: torch.Tensor) -> np.ndarray:
    """The mask as bytes, lowest tokens first (little-endian words)."""
    return bitmask.numpy().astype("<i4", copy=False).view(np.uint8)


def allowed_any(bitmask: torch.Tensor, vocab_size: int) -> np.ndarray:
    """Per row: whether it allows at least one token below ``vocab_size``."""
    b = _bytes(bitmask)[:, :(vocab_size + 7) // 8].copy()
    if vocab_size % 8:
        b[:, -1] &= (1 << (vocab_size % 8)) - 1
    return b.any(axis=1)


def bias(bitmask: torch.Tensor, vocab_size: int) -> np.ndarray:
    """Float32 ``[n, vocab_size]``: 0 where the packed rows allow the token, ``-inf`` elsewhere."""
    b = _bytes(bitmask)[:, :(vocab_size + 7) // 8]
    return _BIAS[b].reshape(b.shape[0], -1)[:, :vocab_size]


def unpack(bitmask: torch.Tensor, vocab_size: int) -> np.ndarray:
    """Bool ``[n, vocab_size]``: True where the packed rows allow the token."""
    return bias(bitmask, vocab_size) == 0


def apply_token_bitmask(x: torch.Tensor, rows: Sequence[int], bitmask: torch.Tensor) -> None:
    """Set ``x[rows[j], t] = -inf`` in place wherever row ``j`` of ``bitmask`` does not allow token ``t``.
    ``x`` is ``[B, V]`` float32; the bitmask must cover at least ``V`` tokens (bits past ``V`` are ignored)."""
    if not len(rows):
        return
    vocab = x.shape[1]
    if bitmask.shape[1] * 32 < vocab:
        raise ValueError(f"a bitmask of {bitmask.shape[1]} words covers {bitmask.shape[1] * 32} tokens, fewer than "
                         f"the {vocab} logits")
    rows = list(rows)
    if x.device.type == "cpu" and x.dtype == torch.float32 and x.is_contiguous():
        xn = x.numpy()
        xn[rows] += bias(bitmask, vocab)  # adding 0 keeps a logit exactly; adding -inf removes it
        return
    table = _DEVICE_BIAS.get(x.device)
    if table is None:
        table = _DEVICE_BIAS[x.device] = torch.from_numpy(_BIAS).to(x.device)
    b = torch.from_numpy(_bytes(bitmask)[:, :(vocab + 7) // 8]).to(x.device, non_blocking=True)
    add = table[b.long()].reshape(b.shape[0], -1)[:, :vocab].to(x.dtype)
    x.index_add_(0, torch.tensor(rows, dtype=torch.long, device=x.device), add)
