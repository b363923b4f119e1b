"""The paged device pool that holds every resident LoRA adapter (in the spirit of S-LoRA's unified pool).

Layout
------
``data`` is one tensor ``[num_layers, num_pages + 1, page_width]``. A *page* is one rank row of one projection,
for every layer at once: page ``p`` of layer ``l`` holds, for the projection ``m`` it was given to,

    data[l, p, :in_m]               = row j of lora_A  (A is [r, in_m])
    data[l, p, in_m : in_m + out_m] = column j of lora_B, times the module's scale (B is [out_m, r])

so an adapter of rank ``r`` on projection ``m`` occupies exactly ``r`` pages, adapters of different ranks sit
side by side with no padding to a maximum rank, and a freed page is reused by any adapter for any projection.
``page_width = max_m(in_m + out_m)``: rows of narrower projections leave the tail of their page unused (for a
Llama MLP with intermediate = 8/3 hidden, attention pages use about half their width) — the price of one pool
that any mix of targets can share; page 0 is kept all-zero as padding. Where ``rank_pattern`` gives a module a
smaller rank in some layers, those layers' extra rows stay zero. The LoRA scale (alpha/r or alpha/sqrt(r),
after alpha_pattern) is folded into B on the way in, so the op never multiplies by it.

Which pages an adapter holds is decided by the pure-Python adapter cache (``engine.adapters.cache``); the pool
only writes and reads rows.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import torch

from aspen.kernels.adapter_kernels import write_rows_kernel
from aspen.lora.group import GroupPart
from aspen.model.config import LORA_TARGETS, ModelConfig
from aspen.model.decoder import GROUPS


@dataclass(frozen=True)
class PooledGroup:
    rows: torch.Tensor  # [R] long, on the pool's device: pool rows of the group's projections, part after part
    row_list: tuple[int, ...]  # the same rows as Python ints, for per-step planning without device syncs
    in_features: int
    parts: tuple[GroupPart, ...]

    @cached_property
    def row_span(self) -> tuple[int, int] | None:
        """(first, end) when the rows are one contiguous run (then a slice of the pool reads them, no copy)."""
        first = self.row_list[0]
        if self.row_list == tuple(range(first, first + len(self.row_list))):
            return first, first + len(self.row_list)
        return None


@dataclass(frozen=True)
class PooledAdapter:
    """An adapter resident in the pool: the pages it holds and, per projection group it targets, the rows to read."""

    pages: tuple[int, ...]
    groups: dict[str, PooledGroup]


def module_ranks(adapter) -> dict[str, int]:
    """Rows each targeted projection needs: its largest rank over layers."""
    ranks: dict[str, int] = {}
    for (_, module), w in adapter.weights.items():
        ranks[module] = max(ranks.get(module, 0), w.A.shape[0])
    return ranks


def pages_needed(adapter) -> int:
    return sum(module_ranks(adapter).values())


class LoraPool:
    def __init__(self, config: ModelConfig, num_pages: int, dtype: torch.dtype = torch.float32,
                 device: torch.device | str = "cpu") -> None:
        if num_pages <= 0:
            raise ValueError(f"the LoRA pool needs num_pages > 0, got {num_pages}")
        self.config = config
        self.num_pages = num_pages
        self.width = max(sum(config.module_shape(m)) for m in LORA_TARGETS)
        # zero_() writes every page now: a lazily mapped (calloc'd) pool would page-fault on each first write,
        # putting that cost on the first load of every page, i.e. on requests
        self.data = torch.empty((config.num_hidden_layers, num_pages + 1, self.width), dtype=dtype,
                                device=device).zero_()

    @staticmethod
    def bytes_per_page(config: ModelConfig, dtype: torch.dtype) -> int:
        width = max(sum(config.module_shape(m)) for m in LORA_TARGETS)
        return config.num_hidden_layers * width * torch.empty((), dtype=dtype).element_size()

    @property
    def nbytes(self) -> int:
        return self.data.numel() * self.data.element_size()

    def write(self, adapter, pages: list[int]) -> PooledAdapter:
        """Copy ``adapter`` (an :class:`aspen.lora.peft.reader.LoraAdapter`) into ``pages`` (ids 0..num_pages-1)."""
        ranks = module_ranks(adapter)
        need = sum(ranks.values())
        if len(pages) != need:
            raise ValueError(f"adapter needs {need} pages, got {len(pages)}")
        rows = [p + 1 for p in pages]  # row 0 is the zero page
        if min(rows) < 1 or max(rows) > self.num_pages:
            raise ValueError(f"page ids must be in [0, {self.num_pages}), got {pages}")
        module_rows: dict[str, list[int]] = {}
        it = iter(rows)
        for m in LORA_TARGETS:
            if m in ranks:
                module_rows[m] = [next(it) for _ in range(ranks[m])]
        write_rows = write_rows_kernel(self.data, [t for w in adapter.weights.values() for t in (w.A, w.B)])
        if write_rows is not None:  # one call, GIL released (see aspen.kernels.adapter_kernels)
            write_rows(self.data, *self._kernel_entries(adapter, module_rows))
        else:
            for m, m_rows in module_rows.items():
                self._write_module(adapter, m, m_rows)
        groups = {}
        for g, members in GROUPS.items():
            targeted = [m for m in members if m in module_rows]
            if not targeted:
                continue
            parts, g_rows, out0 = [], [], 0
            for m in members:
                out_f = self.config.module_shape(m)[1]
                if m in module_rows:
                    parts.append(GroupPart(len(g_rows), len(g_rows) + len(module_rows[m]), out0, out0 + out_f))
                    g_rows.extend(module_rows[m])
                out0 += out_f
            groups[g] = PooledGroup(torch.tensor(g_rows, dtype=torch.long, device=self.data.device), tuple(g_rows),
                                    self.config.module_shape(members[0])[0], tuple(parts))
        return PooledAdapter(tuple(pages), groups)

    def _kernel_entries(self, adapter, module_rows: dict[str, list[int]]) -> tuple[list, list, list, list, list]:
        """``write_lora_rows``'s arguments: per targeted projection and layer, its rows, A, B and scale (a layer
        the adapter skips gets empty A and B, so its rows are zeroed)."""
        layers, rows, As, Bs, scales = [], [], [], [], []
        for m, m_rows in module_rows.items():
            in_f, out_f = self.config.module_shape(m)
            index = torch.tensor(m_rows, dtype=torch.long)
            for layer in range(self.config.num_hidden_layers):
                w = adapter.weights.get((layer, m))
                layers.append(layer)
                rows.append(index)
                if w is None:
                    As.append(torch.zeros(0, in_f))
                    Bs.append(torch.zeros(out_f, 0))
                    scales.append(0.0)
                else:
                    As.append(w.A)
                    Bs.append(w.B)
                    scales.append(w.scale)
        return layers, rows, As, Bs, scales

    def _write_module(self, adapter, module: str, rows: list[int]) -> None:
        """Write projection ``module`` of every layer into pool rows ``rows`` (one page per rank row).

        Only the ``[:in + out]`` columns a page's projection reads are written; rows a layer does not fill (a
        layer the adapter skips, or a smaller rank there from ``rank_pattern``) are zeroed. A contiguous run of
        rows — what a fresh or defragmented pool hands out — is written with plain slice copies."""
        in_f, out_f = self.config.module_shape(module)
        r0 = rows[0]
        contiguous = rows == list(range(r0, r0 + len(rows)))
        index = None if contiguous else torch.tensor(rows, dtype=torch.long, device=self.data.device)
        per_layer = [adapter.weights.get((layer, module)) for layer in range(self.config.num_hidden_layers)]
        if contiguous and all(w is not None and w.A.shape[0] == len(rows) for w in per_layer):
            # the common case, every layer at full rank: per layer, A's row block copied and B scaled and
            # transposed straight into the page rows (one pass each, no temporaries)
            dst = self.data[:, r0:r0 + len(rows), :in_f + out_f]
            for layer, w in enumerate(per_layer):
                dst[layer, :, :in_f].copy_(w.A)
                torch.mul(w.B.t(), w.scale, out=dst[layer, :, in_f:])
            return
        for layer, w in enumerate(per_layer):
            r = 0 if w is None else w.A.shape[0]
            if contiguous:
                dst = self.data[layer, r0:r0 + len(rows), :in_f + out_f]
                if r:
                    dst[:r, :in_f].copy_(w.A)
                    dst[:r, in_f:].copy_(w.B.t() * w.scale)
                if r < len(rows):
                    dst[r:].zero_()
            else:
                block = torch.zeros(len(rows), in_f + out_f, dtype=self.data.dtype)
                if r:
                    block[:r, :in_f] = w.A
                    block[:r, in_f:] = w.B.t() * w.scale
                self.data[layer, index, :in_f + out_f] = block.to(self.data.device)
