"""The packed layout of one projection group's LoRA weights, shared by the pool, the op and its autograd path.

A projection group (``qkv_proj``, ``gate_up_proj``, ...; see ``aspen.model.decoder.GROUPS``) packs the
projections that read the same input. An adapter's A rows for the group's targeted projections are stacked into
one ``[R, in]`` matrix, so one shrink serves them all; each targeted projection is a :class:`GroupPart`: its
rows of that stack and its columns of the group's output.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class GroupPart:
    """One projection of a packed group: rows ``[row_start, row_end)`` of the stacked A (its rank) and columns
    ``[out_start, out_end)`` of the group output."""

    row_start: int
    row_end: int
    out_start: int
    out_end: int

    @property
    def rows(self) -> slice:
        return slice(self.row_start, self.row_end)

    @property
    def cols(self) -> slice:
        return slice(self.out_start, self.out_end)

    @property
    def bounds(self) -> tuple[int, int, int, int]:
        """``(row_start, row_end, out_start, out_end)``: the row of a kernel's part table."""
        return self.row_start, self.row_end, self.out_start, self.out_end


@dataclass(frozen=True)
class GroupWeights:
    """One adapter's weights for one group of one layer: the stacked A ``[R, in]``, its parts, and per part
    ``Bt = (B * scale)^T`` ``[row_end - row_start, out_end - out_start]``."""

    a: torch.Tensor
    parts: tuple[GroupPart, ...]
    bts: tuple[torch.Tensor, ...]
