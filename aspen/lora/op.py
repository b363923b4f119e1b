"""The one multi-LoRA op: every token of a flat batch gets its own adapter's low-rank delta.

For a projection group ``g`` of layer ``l`` (``qkv_proj`` packs q, k, v; ``gate_up_proj`` packs gate, up) and a
token ``t`` whose adapter targets projection ``m`` of the group:

    y[t, out_slice(m)] += scale_m * (x[t] @ A_m^T) @ B_m^T          A_m: [r_m, in], B_m: [out_m, r_m]

Tokens are grouped once per step into *segments* — the tokens that share an adapter (Punica's SGMV idea) — and
the same segments serve every layer. Per segment and group the op does one shrink matmul for all packed
projections at once (their A rows are stacked) and one expand matmul per projection. Tokens with no adapter are
in no segment and cost nothing.

Where the weights come from is the only difference between serving and training:

* serving (:class:`PoolWeights`): rows of the paged pool (``aspen.lora.pool``), scale already folded into B;
* training (``aspen.train``): trainable ``nn.Parameter`` A and B per (layer, projection); the segments of a group
  go through one autograd node (``aspen.lora.grad``) that adds their deltas in place and writes its own
  backward, so autograd reaches A and B (the base weights are frozen); LoRA dropout, applied to the segment's
  input there, uses the same mask in forward and backward.

A decode-heavy step with many distinct pooled adapters takes the batched path (:class:`_GatherPlan`): each row
reads its adapter's pages in place, one call per projection group. The plan puts one adapter's rows together;
on the CPU with AVX-512 the SGMV kernel (``aspen.kernels.sgmv``) takes each such segment a few rows at a time,
elsewhere each row goes alone (BGMV): the compiled CPU kernel (``aspen.kernels.cpu_kernels``), the Triton kernel on
CUDA (``aspen.kernels.triton_bgmv``), else gathers and batched matmuls.
"""
from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import torch
import torch.nn.functional as F

from aspen.kernels import triton_bgmv as triton_kernels
from aspen.kernels.cpu_kernels import bgmv_add, kernel
from aspen.kernels.sgmv import kernel as sgmv_kernel
from aspen.kernels.sgmv import sgmv_add
from aspen.lora.grad import SpanWork, add_group_delta
from aspen.lora.group import GroupPart, GroupWeights
from aspen.lora.pool import LoraPool, PooledAdapter
from aspen.model.batch import FlatBatch

# decode rows (single tokens) with adapters take the batched path once a step has this many of them
GATHER_MIN_SEGMENTS = 8
# with the CPU kernel, an adapter's prefill tokens of a step take the batched path up to this many: below it the
# per-adapter matmuls of a segment are mostly call overhead, above it they are efficient and the row-at-a-time
# kernel is the slower path (benchmarks/lora_overhead.py --phase prefill shows the crossover)
SHORT_PREFILL_TOKENS = 128
# ... and with the SGMV kernel (AVX-512), which takes an adapter's tokens 4 at a time, so it stays ahead of the
# segment matmuls for longer prompts
SGMV_PREFILL_TOKENS = 512
# the torch fallback of the batched path gathers [rows, R, in] page rows: this many rows at a time
FALLBACK_ROWS = 64


class WeightSource(Protocol):
    def group_weights(self, layer: int, group: str) -> GroupWeights | None:
        """The adapter's weights for ``group`` of ``layer``, or None if it does not target the group."""


@dataclass(frozen=True)
class PoolWeights:
    pool: LoraPool
    adapter: PooledAdapter

    def group_weights(self, layer: int, group: str) -> GroupWeights | None:
        g = self.adapter.groups.get(group)
        if g is None:
            return None
        span = g.row_span
        # [R, width]: a view of the pool when the adapter's pages are contiguous (the usual case), else a copy
        rows = self.pool.data[layer, span[0]:span[1]] if span else self.pool.data[layer].index_select(0, g.rows)
        i = g.in_features
        return GroupWeights(rows[:, :i], g.parts,
                            tuple(rows[p.rows, i:i + p.out_end - p.out_start] for p in g.parts))


@dataclass(frozen=True)
class Segment:
    tokens: slice | torch.Tensor  # the flat-batch tokens of this adapter
    weights: WeightSource
    dropout: float = 0.0


class LoraBatch:
    """Implements the model's ``LoraHook`` for one step."""

    def __init__(self, segments: Sequence[Segment], pool: LoraPool | None = None,
                 gathered: _GatherPlan | None = None) -> None:
        self.segments = list(segments)
        self.pool = pool
        self.gathered = gathered

    @classmethod
    def for_step(cls, batch: FlatBatch, pooled: Sequence[PooledAdapter | None], pool: LoraPool,
                 dtype: torch.dtype = torch.float32) -> LoraBatch:
        """The LoRA work of a serving step; ``pooled[slot]`` is the pooled adapter of adapter slot ``slot``,
        ``dtype`` the activations' dtype.

        Rows go to the batched path (:class:`_GatherPlan`: one kernel call per projection group) or to
        per-adapter segments (matmuls): decode rows (one token) once there are GATHER_MIN_SEGMENTS of them; and
        where the compiled CPU kernel takes this step (float32 activations on the CPU), every decode row and
        every adapter's prefill tokens when they are at most SHORT_PREFILL_TOKENS in this step (short prompts
        of many adapters: per-adapter matmuls of a few dozen rows are mostly call overhead). Everything else —
        long prefills, whose matmuls are efficient — is grouped into one segment per adapter."""
        device = batch.input_ids.device
        by_slot: dict[int, list[tuple[int, int]]] = {}
        for s, slot in enumerate(batch.adapter_slots):
            if slot >= 0 and pooled[slot] is not None:
                by_slot.setdefault(slot, []).append((batch.query_start[s], batch.query_start[s + 1]))
        cpu_kernel = pool.data.device.type == "cpu" and dtype == torch.float32 and kernel() is not None
        limit = short_prefill_tokens()
        rows: list[tuple[int, int, PooledAdapter]] = []
        for slot, spans in by_slot.items():
            short = cpu_kernel and sum(b - a for a, b in spans) <= limit
            taken = [(a, b) for a, b in spans if b - a == 1 or short]
            rows += [(a, b, pooled[slot]) for a, b in taken]
        if not cpu_kernel and len(rows) < GATHER_MIN_SEGMENTS:
            rows = []
        gathered = _GatherPlan.build(rows, device) if rows else None
        in_plan = {(a, b) for a, b, _ in rows}
        segments = []
        for slot, spans in by_slot.items():
            rest = [span for span in spans if span not in in_plan]
            if rest:
                segments.append(Segment(_token_index(rest, device), PoolWeights(pool, pooled[slot])))
        return cls(segments, pool, gathered)

    def apply(self, layer: int, group: str, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled():
            y = self._apply_differentiable(layer, group, x, y)
        else:
            for seg in self.segments:
                w = seg.weights.group_weights(layer, group)
                if w is not None:
                    y = _apply_segment(x, y, seg.tokens, w, seg.dropout)
        if self.gathered is not None:
            y = self.gathered.apply(self.pool, layer, group, x, y)
        return y

    def _apply_differentiable(self, layer: int, group: str, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Training: contiguous segments (the trainer's) go through one autograd node that adds their deltas to
        ``y`` in place and writes its own backward (``aspen.lora.grad``); segments of scattered tokens are
        gathered, computed out of place and scattered back by index."""
        spans: list[SpanWork] = []
        weights: list[torch.Tensor] = []
        for seg in self.segments:
            w = seg.weights.group_weights(layer, group)
            if w is None:
                continue
            if isinstance(seg.tokens, slice):
                spans.append(SpanWork(seg.tokens.start, seg.tokens.stop, seg.dropout, w.parts))
                weights += [w.a.to(x.dtype)] + [bt.to(x.dtype) for bt in w.bts]
            else:
                delta = _segment_delta(x.index_select(0, seg.tokens), w, seg.dropout, y.shape[1], y.dtype)
                y = y.index_add(0, seg.tokens, delta)
        if spans:
            y = add_group_delta(x, y, spans, weights)
        return y


def short_prefill_tokens() -> int:
    """Up to how many prefill tokens of one adapter in a step take the batched CPU kernel (else: a segment)."""
    return SGMV_PREFILL_TOKENS if sgmv_kernel() is not None else SHORT_PREFILL_TOKENS


def _token_index(spans: list[tuple[int, int]], device: torch.device) -> slice | torch.Tensor:
    if len(spans) == 1:
        return slice(*spans[0])
    return torch.cat([torch.arange(a, b, device=device) for a, b in spans])


def _shrink(xs: torch.Tensor, w: GroupWeights, dropout: float) -> torch.Tensor:
    """xa [n, R] = (dropout of) the segment's input rows times the stacked A rows of every packed projection."""
    if dropout > 0:
        # like PEFT, every projection draws its own dropout mask on its input; autograd keeps each mask for
        # the backward pass, so forward and backward see the same dropped units
        return torch.cat([F.dropout(xs, p=dropout, training=True) @ w.a[p.rows].t().to(xs.dtype)
                          for p in w.parts], dim=1)
    return xs @ w.a.t().to(xs.dtype)  # one shrink for every packed projection


def _segment_delta(xs: torch.Tensor, w: GroupWeights, dropout: float, width: int,
                   dtype: torch.dtype) -> torch.Tensor:
    """The delta [n, width] of the segment's input rows ``xs`` for the whole group output (zeros where no
    projection is targeted)."""
    xa = _shrink(xs, w, dropout)
    cols, at = [], 0
    for p, bt in zip(w.parts, w.bts):
        if p.out_start > at:
            cols.append(xa.new_zeros(xa.shape[0], p.out_start - at))
        cols.append(xa[:, p.rows] @ bt.to(xa.dtype))
        at = p.out_end
    if at < width:
        cols.append(xa.new_zeros(xa.shape[0], width - at))
    return torch.cat(cols, dim=1).to(dtype)


def _apply_segment(x: torch.Tensor, y: torch.Tensor, tokens: slice | torch.Tensor, w: GroupWeights,
                   dropout: float) -> torch.Tensor:
    """Inference: add the segment's delta to ``y`` in place."""
    if isinstance(tokens, slice):
        xa = _shrink(x[tokens], w, dropout)
        for p, bt in zip(w.parts, w.bts):
            y[tokens, p.cols].addmm_(xa[:, p.rows], bt.to(xa.dtype))
        return y
    delta = _segment_delta(x.index_select(0, tokens), w, dropout, y.shape[1], y.dtype)
    return _add_rows(y, tokens, delta)


# On the CPU an accumulating index_put_ has the lower fixed cost and index_add_ the lower cost per row: up to
# this many rows index_put_ is the faster of the two.
SMALL_SCATTER_ROWS = 8


def _add_rows(y: torch.Tensor, tokens: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """``y[tokens] += delta`` in place (``tokens`` distinct), by whichever torch op is faster for that many rows."""
    if y.is_cpu and tokens.shape[0] <= SMALL_SCATTER_ROWS:
        return y.index_put_((tokens,), delta, accumulate=True)
    return y.index_add_(0, tokens, delta)


@dataclass(frozen=True)
class _GatherGroup:
    rows: torch.Tensor  # [N, R] pool rows per token (0 = zero page pads shorter adapters)
    in_features: int
    parts: tuple[GroupPart, ...]  # in the padded row layout
    parts_tensor: torch.Tensor  # their bounds, [K, 4] long on the CPU, for the kernel


@functools.lru_cache(maxsize=256)
def _triton_plan(parts: tuple[GroupPart, ...], width: int, in_features: int, device: str):
    """The Triton kernel's block plan for a group layout; a layout recurs step after step, so its small device
    tensors are made once."""
    bounds = [p.bounds for p in parts]
    blocks = triton_kernels.output_blocks(tuple(bounds), width)
    if blocks is None:
        return None
    block_o, owner = blocks
    block_r = max(16, 1 << (max(p.row_end - p.row_start for p in parts) - 1).bit_length())
    return (block_o, torch.tensor(owner, dtype=torch.int32, device=device),
            torch.tensor(bounds, dtype=torch.int32, device=device), block_r, in_features)


@dataclass(frozen=True)
class _GatherPlan:
    tokens: torch.Tensor  # [N] flat token index of each single-token row, one adapter's rows together
    segments: torch.Tensor  # [S + 1] CPU long: rows segments[s] .. segments[s + 1] - 1 share adapter s
    groups: dict[str, _GatherGroup]
    triton_plans: dict = field(default_factory=dict)  # group -> the CUDA kernel's block plan (built on first use)

    def _triton_plan(self, group: str, g: _GatherGroup, width: int, device: torch.device):
        if group not in self.triton_plans:
            self.triton_plans[group] = _triton_plan(g.parts, width, g.in_features, str(device))
        return self.triton_plans[group]

    @classmethod
    def build(cls, spans: list[tuple[int, int, PooledAdapter]], device: torch.device) -> _GatherPlan:
        """One row per token of ``spans`` ((first token, end, adapter)); built on the host with numpy, one
        row vector per distinct adapter repeated over its tokens (no per-token Python, no device syncs)."""
        distinct = list({id(ad): ad for _, _, ad in spans}.values())
        position = {id(ad): i for i, ad in enumerate(distinct)}
        spans = sorted(spans, key=lambda span: position[id(span[2])])  # one adapter's rows together: segments
        which = np.asarray([position[id(ad)] for _, _, ad in spans], dtype=np.int64)
        lengths = np.asarray([b - a for a, b, _ in spans], dtype=np.int64)
        per_adapter_rows = np.bincount(which, weights=lengths, minlength=len(distinct)).astype(np.int64)
        segments = torch.from_numpy(np.concatenate([[0], np.cumsum(per_adapter_rows)]).astype(np.int64))
        groups: dict[str, _GatherGroup] = {}
        for g in {name for ad in distinct for name in ad.groups}:
            members = [ad.groups.get(g) for ad in distinct]
            ref = next(m for m in members if m is not None)
            # per part, pad every adapter's rows to the largest rank present in this step
            widths: dict[tuple[int, int], int] = {}
            for m in members:
                for p in m.parts if m is not None else ():
                    key = (p.out_start, p.out_end)
                    widths[key] = max(widths.get(key, 0), p.row_end - p.row_start)
            layout, r0 = [], 0
            for (o0, o1), width in sorted(widths.items()):
                layout.append(GroupPart(r0, r0 + width, o0, o1))
                r0 += width
            first_row = {part.out_start: part.row_start for part in layout}
            per_adapter = np.zeros((len(distinct), r0), dtype=np.int64)  # 0 = the zero page
            for i, m in enumerate(members):
                for p in m.parts if m is not None else ():
                    dst = first_row[p.out_start]
                    per_adapter[i, dst:dst + p.row_end - p.row_start] = m.row_list[p.row_start:p.row_end]
            table = np.repeat(per_adapter[which], lengths, axis=0)
            groups[g] = _GatherGroup(torch.from_numpy(table).to(device), ref.in_features, tuple(layout),
                                     torch.tensor([part.bounds for part in layout], dtype=torch.long))
        tokens = np.concatenate([np.arange(a, b, dtype=np.int64) for a, b, _ in spans])
        return cls(torch.from_numpy(tokens).to(device), segments, groups)

    def apply(self, pool: LoraPool, layer: int, group: str, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        g = self.groups.get(group)
        if g is None:
            return y
        if sgmv_add(y, x, pool.data[layer], self.tokens, g.rows, self.segments, g.parts_tensor, g.in_features):
            return y
        if bgmv_add(y, x, pool.data[layer], self.tokens, g.rows, g.parts_tensor, g.in_features):
            return y
        if y.is_cuda and triton_kernels.bgmv_add(y, x, pool.data[layer], self.tokens, g.rows,
                                                 self._triton_plan(group, g, y.shape[1], y.device)):
            return y
        for c in range(0, self.tokens.shape[0], FALLBACK_ROWS):  # bounded memory for long plans
            y = _gathered_delta(pool.data[layer], g, self.tokens[c:c + FALLBACK_ROWS], g.rows[c:c + FALLBACK_ROWS],
                                x, y)
        return y


def _gathered_delta(data: torch.Tensor, g: _GatherGroup, tokens: torch.Tensor, rows: torch.Tensor,
                    x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The torch path of the batched op for some rows: gathered page rows and batched matmuls (math in the
    activations' dtype, whatever the pool stores)."""
    xs = x.index_select(0, tokens)  # [N, in]
    a = data[rows, :g.in_features].to(xs.dtype)  # [N, R, in]: gathers only the A columns
    xa = torch.bmm(a, xs.unsqueeze(2)).squeeze(2)  # [N, R]
    delta = torch.zeros(xs.shape[0], y.shape[1], dtype=y.dtype, device=y.device)
    for p in g.parts:
        bt = data[rows[:, p.rows], g.in_features:g.in_features + p.out_end - p.out_start].to(xs.dtype)  # [N, r, out]
        delta[:, p.cols] = torch.bmm(xa[:, None, p.rows], bt).squeeze(1).to(y.dtype)
    return _add_rows(y, tokens, delta)
