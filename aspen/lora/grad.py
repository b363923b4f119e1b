"""The LoRA op's training path: one autograd node per projection group that adds every segment's delta to the
base output in place and writes its own backward.

For a segment ``[a, b)`` of one adapter and a packed projection ``m`` of the group (rows ``r0:r1`` of the
stacked A, output columns ``o0:o1``, ``Bt = (B * scale)^T``)::

    xd_m        = dropout_m(x[a:b])                  (a mask of its own per projection, as in PEFT)
    xa_m        = xd_m @ A_m^T                       [n, r]
    y[a:b, o]  += xa_m @ Bt_m

and backward, from the output gradient ``gy``::

    gxa_m  = gy[a:b, o] @ Bt_m^T        dBt_m = xa_m^T @ gy[a:b, o]
    dA_m   = gxa_m^T @ xd_m             dx[a:b] += dropout_m'(gxa_m @ A_m)

Written with plain autograd ops, the same math costs a zero-filled ``[tokens, width]`` delta per group (the
stitched per-segment deltas), an out-of-place add of it to the base output and the matching splits and
concatenations in backward — a quarter of the training step on the CPU. Here the delta goes straight into the
base output's rows and ``gy`` passes through to the base untouched.

Dropout draws a mask of its own per projection (as PEFT does) and applies ``1/(1-p)`` on the rank-wide side of
each product. On the CPU in float32 the mask comes from the compiled counter-based kernel
(``aspen.kernels.cpu_kernels.dropout_apply``): a pure function of a seed drawn from torch's generator and the element
index, about 8x cheaper to draw than ``bernoulli_``, and regenerated in backward, so no mask is kept between
forward and backward. Elsewhere it is ``F.dropout``'s own draw (``bernoulli_(1 - p)`` on a float tensor), kept
for backward. Either way forward and backward apply the same mask, and the masks follow the run's seed and
RNG state, which checkpoints save.

The base output is changed in place (``mark_dirty``): the base projections never keep their output for their
own backward, so nothing the autograd graph needs is overwritten.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from aspen.kernels.cpu_kernels import dropout_apply
from aspen.lora.group import GroupPart


@dataclass(frozen=True)
class SpanWork:
    """One segment's share of a group: rows ``[start, stop)``, dropout ``p``, the packed parts of its stacked A
    (one Bt tensor each, in order)."""
    start: int
    stop: int
    dropout: float
    parts: tuple[GroupPart, ...]


def add_group_delta(x: torch.Tensor, y: torch.Tensor, spans: list[SpanWork],
                    weights: list[torch.Tensor]) -> torch.Tensor:
    """``y`` (changed in place and returned) plus every span's LoRA delta; ``weights`` holds per span its
    stacked A ``[R, in]`` followed by its parts' Bt ``[r, out]``. Differentiable in ``x``, ``y`` and the
    weights."""
    return _GroupDelta.apply(x, y, spans, *weights)


class _GroupDelta(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, y: torch.Tensor, spans: list[SpanWork], *weights: torch.Tensor):
        saved_xa, saved_keep, at = [], [], 0
        for s in spans:
            a, bts = weights[at], weights[at + 1:at + 1 + len(s.parts)]
            at += 1 + len(s.parts)
            xs = x[s.start:s.stop]
            out = y[s.start:s.stop]
            if s.dropout > 0:
                c = 1.0 / (1.0 - s.dropout)
                xas, keeps = [], []
                for p, bt in zip(s.parts, bts):
                    xd, keep = _drop(xs, s.dropout)
                    xa = (xd @ a[p.rows].t()).mul_(c)  # the 1/(1-p) on the narrow side
                    out[:, p.cols].addmm_(xa, bt)
                    xas.append(xa)
                    keeps.append(keep)
                saved_xa.append(xas)
                saved_keep.append(keeps)
            else:
                xa = xs @ a.t()  # one shrink for every packed projection
                for p, bt in zip(s.parts, bts):
                    out[:, p.cols].addmm_(xa[:, p.rows], bt)
                saved_xa.append(xa)
                saved_keep.append(None)
        ctx.mark_dirty(y)
        ctx.spans = spans
        ctx.saved_xa, ctx.saved_keep = saved_xa, saved_keep
        ctx.save_for_backward(x, *weights)
        return y

    @staticmethod
    def backward(ctx, gy: torch.Tensor):
        x, *weights = ctx.saved_tensors
        spans = ctx.spans
        need_x = ctx.needs_input_grad[0]
        # the trainer's spans tile the batch: each span's first contribution is written, not added to zeros
        tiled = need_x and _tiles(spans, x.shape[0])
        gx = (torch.empty_like(x) if tiled else torch.zeros_like(x)) if need_x else None
        grads: list[torch.Tensor | None] = []
        at = 0
        for s, xa, keep in zip(spans, ctx.saved_xa, ctx.saved_keep):
            a, bts = weights[at], weights[at + 1:at + 1 + len(s.parts)]
            at += 1 + len(s.parts)
            xs, g = x[s.start:s.stop], gy[s.start:s.stop]
            gxs = gx[s.start:s.stop] if need_x else None
            ga = torch.empty_like(a)
            gbts = []
            if keep is None:
                gxa = torch.empty(xs.shape[0], a.shape[0], dtype=g.dtype, device=g.device)
                for p, bt in zip(s.parts, bts):
                    torch.mm(g[:, p.cols], bt.t(), out=gxa[:, p.rows])
                    gbts.append(xa[:, p.rows].t() @ g[:, p.cols])
                torch.mm(gxa.t(), xs, out=ga)
                if need_x:
                    if tiled:
                        torch.mm(gxa, a, out=gxs)
                    else:
                        gxs.addmm_(gxa, a)
            else:
                c = 1.0 / (1.0 - s.dropout)
                for k, (p, bt, xa_m, keep_m) in enumerate(zip(s.parts, bts, xa, keep)):
                    gxa = (g[:, p.cols] @ bt.t()).mul_(c)
                    gbts.append(xa_m.t() @ g[:, p.cols])
                    torch.mm(gxa.t(), _redrop(xs, s.dropout, keep_m), out=ga[p.rows])
                    if need_x:
                        _drop_into(gxs, gxa @ a[p.rows], s.dropout, keep_m, add=k > 0 or not tiled)
            grads.append(ga)
            grads.extend(gbts)
        ctx.saved_xa = ctx.saved_keep = None
        return (gx, gy, None, *grads)


# ---- dropout masks ---------------------------------------------------------------------------------------------
# A mask is an int (the seed of the CPU kernel's counter-based draw: regenerated in backward, nothing kept) or a
# 0/1 float tensor (torch's bernoulli_, as F.dropout draws it: other devices and dtypes, or no compiled kernel).

def _drop(xs: torch.Tensor, p: float) -> tuple[torch.Tensor, int | torch.Tensor]:
    """(``xs * keep``, the mask) for a fresh mask with drop probability ``p``; seeds come from torch's default
    generator, so a run's masks follow its seed and RNG state (checkpoints keep it)."""
    if xs.device.type == "cpu" and xs.dtype == torch.float32:
        seed = int(torch.randint(0, 2 ** 62, ()).item())
        xd = dropout_apply(xs, p, seed)
        if xd is not None:
            return xd, seed
    keep = torch.empty_like(xs).bernoulli_(1.0 - p)
    return xs * keep, keep


def _redrop(xs: torch.Tensor, p: float, mask: int | torch.Tensor) -> torch.Tensor:
    """``xs * keep`` again for a mask drawn by :func:`_drop`."""
    if isinstance(mask, int):
        return _kernel_done(dropout_apply(xs, p, mask))
    return xs * mask


def _drop_into(dst: torch.Tensor, t: torch.Tensor, p: float, mask: int | torch.Tensor, add: bool) -> None:
    """``dst (+)= t * keep`` in place."""
    if isinstance(mask, int):
        _kernel_done(dropout_apply(t, p, mask, acc=dst) if add else dropout_apply(t, p, mask, out=dst))
    elif add:
        dst.addcmul_(t, mask)
    else:
        torch.mul(t, mask, out=dst)


def _kernel_done(result: torch.Tensor | None) -> torch.Tensor:
    """A seed mask's kernel call in backward must run: a refusal would silently drop a gradient."""
    if result is None:
        raise RuntimeError("the dropout kernel refused, in backward, tensors of the shape and layout it took in "
                           "forward (contiguous float32 on the CPU expected)")
    return result


def _tiles(spans: list[SpanWork], n: int) -> bool:
    """Whether the spans are disjoint and cover rows [0, n) exactly."""
    at = 0
    for s in sorted(spans, key=lambda s: s.start):
        if s.start != at:
            return False
        at = s.stop
    return at == n


def keep_mask(like: torch.Tensor, p: float, mask: int | torch.Tensor) -> torch.Tensor:
    """The 0/1 float mask shaped like ``like`` that a draw of :func:`_drop` applied (tests, debugging)."""
    return _redrop(torch.ones_like(like), p, mask)
