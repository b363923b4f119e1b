"""The one description of a model step: a *flat* batch of tokens from many sequences.

A step runs any mix of prefill chunks (several new tokens of one sequence) and decodes (one new token) in one
forward call. The caller describes each sequence's share of the step with a :class:`SeqChunk` (plain Python, no
torch); :meth:`FlatBatch.build` turns the list into the tensors every layer reads, once per step:

    tokens of the step:   t = 0 .. T-1, grouped by sequence s = 0 .. S-1 in the order given
    query_start[s]        first token of sequence s in the flat batch (len S+1, last = T)
    positions[t]          absolute position of token t in its sequence
    slot_mapping[t]       KV-pool slot where token t's key/value is written:
                          block_table[pos // block_size] * block_size + pos % block_size
    logits_indices[n]     flat indices of the tokens whose logits the caller wants
    context_lens[s]       tokens of sequence s in the KV cache after this step (start_pos + new tokens)
    adapter_slots[s]      LoRA adapter slot of sequence s (-1 = base model only): the LoRA batch groups the
                          tokens of each slot into segments from these and ``query_start``

Attention needs, for each query, the slots of every key it may see. Decode rows (one new token) are batched:
``decode_kv_slots`` [D, Lmax] lists each decode sequence's key slots padded to the longest, ``decode_mask``
[D, Lmax] marks the real ones. Prefill chunks are run one by one, each with its own slot list and causal mask
(:class:`PrefillSeq`). Both are computed here once and reused by every layer.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

LOGITS_LAST = "last"
LOGITS_ALL = "all"
LOGITS_NONE = "none"


@dataclass(frozen=True)
class SeqChunk:
    """One sequence's part of a step (pure Python).

    token_ids:   the new tokens to run now (a prefill chunk, or the single last token for a decode)
    start_pos:   position of token_ids[0]; equals the number of this sequence's tokens already in the KV cache
    block_table: KV blocks of the sequence, enough to hold start_pos + len(token_ids) tokens
    adapter_slot: LoRA adapter slot for every token of this chunk (-1 = base only)
    logits:      which logits to return: "last" token, "all" tokens of the chunk, or "none"
    """

    token_ids: Sequence[int]
    start_pos: int
    block_table: Sequence[int]
    adapter_slot: int = -1
    logits: str = LOGITS_LAST

    def __post_init__(self) -> None:
        if not self.token_ids:
            raise ValueError("SeqChunk.token_ids must hold at least one token")
        if self.start_pos < 0:
            raise ValueError(f"SeqChunk.start_pos must be >= 0, got {self.start_pos}")
        if self.logits not in (LOGITS_LAST, LOGITS_ALL, LOGITS_NONE):
            raise ValueError(f"SeqChunk.logits must be 'last', 'all' or 'none', got {self.logits!r}")

    @property
    def end_pos(self) -> int:
        return self.start_pos + len(self.token_ids)


@dataclass(frozen=True)
class PrefillSeq:
    """Attention inputs of one multi-token chunk."""

    token_start: int  # first flat token index of the chunk
    token_end: int  # one past the last
    kv_slots: torch.Tensor  # [context_len] long: slots of keys 0 .. context_len-1
    mask: torch.Tensor | None  # [n_new, context_len] bool (True = may attend); None = plain causal, no prefix


@dataclass(frozen=True)
class FlatBatch:
    input_ids: torch.Tensor  # [T] long
    positions: torch.Tensor  # [T] long
    slot_mapping: torch.Tensor  # [T] long
    logits_indices: torch.Tensor  # [N] long
    query_start: tuple[int, ...]  # S+1 flat offsets
    context_lens: tuple[int, ...]  # S
    prefills: tuple[PrefillSeq, ...]
    decode_token_index: torch.Tensor  # [D] long: flat index of each decode row's token
    decode_kv_slots: torch.Tensor  # [D, Lmax] long
    decode_mask: torch.Tensor  # [D, Lmax] bool
    decode_starts: torch.Tensor  # [D] long: first visible key (> 0 only under a sliding window)
    decode_lens: torch.Tensor  # [D] long: keys of each decode row (its context length)
    adapter_slots: tuple[int, ...] = field(default=())  # per sequence, -1 = base only (see the module docstring)
    # steps of fresh prefills only (every chunk starts its sequence; training, first prompt chunks): the
    # (gather [B, Lmax], valid [T]) indices that run them as one right-padded causal batch; None otherwise
    padded_prefill: tuple[torch.Tensor, torch.Tensor] | None = None

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.numel())

    @property
    def num_seqs(self) -> int:
        return len(self.context_lens)

    @classmethod
    def build(cls, chunks: Sequence[SeqChunk], block_size: int, device: torch.device | str = "cpu",
              sliding_window: int | None = None) -> FlatBatch:
        """Cost in Python is O(new tokens + blocks): context slots are expanded from block tables by tensor ops,
        so long contexts do not make the per-step setup slower."""
        if not chunks:
            raise ValueError("a step needs at least one sequence chunk")
        ids: list[int] = []
        pos: list[int] = []
        slots: list[int] = []
        logits_idx: list[int] = []
        qstart = [0]
        ctx: list[int] = []
        prefill_specs: list[tuple[int, int, Sequence[int], int]] = []
        dec_tok: list[int] = []
        dec_tables: list[Sequence[int]] = []
        dec_lens: list[int] = []
        for c in chunks:
            end = c.end_pos
            table = c.block_table
            if len(table) * block_size < end:
                raise ValueError(
                    f"block table of {len(table)} blocks holds {len(table) * block_size} "
                    f"tokens, the chunk needs {end}")
            t0 = len(ids)
            ids.extend(c.token_ids)
            pos.extend(range(c.start_pos, end))
            slots.extend(table[p // block_size] * block_size + p % block_size for p in range(c.start_pos, end))
            if c.logits == LOGITS_LAST:
                logits_idx.append(len(ids) - 1)
            elif c.logits == LOGITS_ALL:
                logits_idx.extend(range(t0, len(ids)))
            qstart.append(len(ids))
            ctx.append(end)
            if len(c.token_ids) == 1:
                dec_tok.append(t0)
                dec_tables.append(table)
                dec_lens.append(end)
            else:
                prefill_specs.append((t0, len(ids), table, c.start_pos))

        def tensor(x: list[int]) -> torch.Tensor:
            return torch.tensor(x, dtype=torch.long, device=device)

        prefills = tuple(
            PrefillSeq(t0, t1, _context_slots([table], block_size, t1 - t0 + start, device)[0],
                       _prefill_mask(start, t1 - t0, sliding_window, device))
            for t0, t1, table, start in prefill_specs)
        padded = _padded_prefill(prefill_specs, len(ids), device) \
            if not dec_tok and all(p.mask is None for p in prefills) else None
        lmax = max(dec_lens, default=0)
        lens_np = np.asarray(dec_lens, dtype=np.int64)
        starts_np = np.zeros_like(lens_np) if sliding_window is None else np.maximum(lens_np - sliding_window, 0)
        keys = np.arange(lmax, dtype=np.int64)
        mask_np = (keys[None, :] >= starts_np[:, None]) & (keys[None, :] < lens_np[:, None])
        dec_slots = _context_slots(dec_tables, block_size, lmax, "cpu")
        dec_slots = torch.from_numpy(dec_slots.numpy() * mask_np).to(device)  # padding reads slot 0, masked
        mask, lens, starts = (torch.from_numpy(a).to(device) for a in (mask_np, lens_np, starts_np))
        return cls(
            input_ids=tensor(ids), positions=tensor(pos), slot_mapping=tensor(slots),
            logits_indices=tensor(logits_idx),
            query_start=tuple(qstart), context_lens=tuple(ctx), prefills=prefills,
            decode_token_index=tensor(dec_tok), decode_kv_slots=dec_slots, decode_mask=mask,
            decode_starts=starts, decode_lens=lens,
            adapter_slots=tuple(c.adapter_slot for c in chunks), padded_prefill=padded,
        )


def _padded_prefill(specs: Sequence[tuple[int, int, Sequence[int], int]], num_tokens: int,
                    device: torch.device | str) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Indices that lay ``specs`` (fresh prefill chunks covering the step's tokens in order) out as a
    right-padded [B, Lmax] batch (pads repeat a chunk's last token: under a causal mask no real query sees them)
    and pick the real rows back out of the flattened batch. None for one chunk or when padding would more than
    double the work."""
    lens = [t1 - t0 for t0, t1, _, _ in specs]
    if len(lens) < 2 or len(lens) * max(lens) > 2 * num_tokens:
        return None
    lmax = max(lens)
    cols = np.arange(lmax, dtype=np.int64)
    starts = np.asarray([t0 for t0, _, _, _ in specs], dtype=np.int64)[:, None]
    n = np.asarray(lens, dtype=np.int64)[:, None]
    gather = starts + np.minimum(cols[None, :], n - 1)
    valid = (np.arange(len(lens), dtype=np.int64)[:, None] * lmax + cols[None, :])[cols[None, :] < n]
    return torch.from_numpy(gather).to(device), torch.from_numpy(valid).to(device)


def _context_slots(tables: Sequence[Sequence[int]], block_size: int, length: int,
                   device: torch.device | str) -> torch.Tensor:
    """[len(tables), length] KV slots of positions 0..length-1 of each table (past a table's end: garbage).

    numpy, not torch: these small index computations must not fork the intra-op thread pool every step."""
    nblocks = -(-length // block_size) if length else 0
    bt = np.zeros((len(tables), nblocks), dtype=np.int64)
    for i, t in enumerate(tables):
        row = t[:nblocks]
        bt[i, :len(row)] = row
    full = (bt[:, :, None] * block_size + np.arange(block_size, dtype=np.int64)).reshape(
        len(tables), nblocks * block_size)
    return torch.from_numpy(np.ascontiguousarray(full[:, :length])).to(device)


def _prefill_mask(start: int, n: int, window: int | None, device: torch.device | str) -> torch.Tensor | None:
    """[n, start+n] causal mask for a chunk whose first query sits at position `start`."""
    if start == 0 and (window is None or window >= n):
        return None
    q = torch.arange(start, start + n).unsqueeze(1)
    k = torch.arange(start + n).unsqueeze(0)
    mask = k <= q
    if window is not None:
        mask &= k > q - window
    return mask.to(device)
