"""CUDA kernel for the decode hot spot of the LoRA op: BGMV over the paged pool, in Triton.

The same contract as the CPU kernel (``aspen.kernels.cpu_kernels.bgmv_add``): for each decode row ``n`` (one token, one
adapter) the adapter's pages are read in place from the pool and its low-rank delta is added to the row's output

    xa[j]            = x[tok[n], :in] . pool[rows[n, j], :in]                      (shrink)
    y[tok[n], o0+c] += sum_{j in part} xa[j] * pool[rows[n, j], in + c]              (expand, B scale folded)

in one launch per projection group instead of the torch path's gathers, batched matmuls and scatters (a
decode step of a small model is launch-bound on a GPU). The grid is (row, block of output columns): each program
finds which projection of the packed group its columns belong to, recomputes that projection's shrink (a few
rank rows, cheap) and writes its output block, so no two programs write the same element. Math is float32
whatever the pool and activations store. Used only when Triton is importable and the tensors are on CUDA;
``ASPEN_TRITON=0`` disables it (the torch path then runs, same results).
"""
from __future__ import annotations

import functools
import os

import torch


@functools.lru_cache(maxsize=1)
def _triton():
    """The compiled kernel's launcher, or None when Triton is unavailable or disabled."""
    if os.environ.get("ASPEN_TRITON", "1").lower() in ("0", "false", "no", "off"):
        return None
    try:
        import triton
        import triton.language as tl
    except ImportError:
        return None

    @triton.jit
    def bgmv_kernel(y_ptr, x_ptr, pool_ptr, tok_ptr, rows_ptr, block_part_ptr, parts_ptr,
                    y_stride, x_stride, W, R, in_features, width,
                    BLOCK_O: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_R: tl.constexpr):
        n = tl.program_id(0)
        ob = tl.program_id(1)
        k = tl.load(block_part_ptr + ob)
        if k >= 0:
            r0 = tl.load(parts_ptr + 4 * k)
            r1 = tl.load(parts_ptr + 4 * k + 1)
            o0 = tl.load(parts_ptr + 4 * k + 2)
            tok = tl.load(tok_ptr + n).to(tl.int64)
            offs_r = tl.arange(0, BLOCK_R)
            rmask = offs_r < r1 - r0
            page = tl.load(rows_ptr + n * R + r0 + offs_r, mask=rmask, other=0).to(tl.int64)
            xa = tl.zeros([BLOCK_R], dtype=tl.float32)
            for i0 in range(0, in_features, BLOCK_I):
                offs_i = i0 + tl.arange(0, BLOCK_I)
                imask = offs_i < in_features
                xv = tl.load(x_ptr + tok * x_stride + offs_i, mask=imask, other=0.0).to(tl.float32)
                a = tl.load(pool_ptr + page[:, None] * W + offs_i[None, :],
                            mask=rmask[:, None] & imask[None, :], other=0.0).to(tl.float32)
                xa += tl.sum(a * xv[None, :], axis=1)
            offs_o = ob * BLOCK_O + tl.arange(0, BLOCK_O)
            omask = offs_o < width
            b = tl.load(pool_ptr + page[:, None] * W + (in_features + offs_o - o0)[None, :],
                        mask=rmask[:, None] & omask[None, :], other=0.0).to(tl.float32)
            delta = tl.sum(b * xa[:, None], axis=0)
            yp = y_ptr + tok * y_stride + offs_o
            y = tl.load(yp, mask=omask, other=0.0)
            tl.store(yp, (y.to(tl.float32) + delta).to(y.dtype), mask=omask)

    def launch(y, x, pool_layer, tok, rows, block_part, parts, in_features, block_o, block_r):
        grid = (rows.shape[0], block_part.shape[0])
        bgmv_kernel[grid](y, x, pool_layer, tok, rows, block_part, parts, y.stride(0), x.stride(0),
                          pool_layer.stride(0), rows.shape[1], in_features, y.shape[1],
                          BLOCK_O=block_o, BLOCK_I=128, BLOCK_R=block_r)

    return launch


def output_blocks(parts: tuple[tuple[int, int, int, int], ...], width: int) -> tuple[int, list[int]] | None:
    """(BLOCK_O, the part of each output block: index into ``parts`` or -1) for a group's (row0, row1, out0,
    out1) layout, or None when no power-of-two block of >= 16 columns tiles every part boundary."""
    block = 128
    bounds = [b for _, _, o0, o1 in parts for b in (o0, o1)] + [width]
    while block >= 16 and any(b % block for b in bounds):
        block //= 2
    if block < 16:
        return None
    owner = [-1] * -(-width // block)
    for k, (_, _, o0, o1) in enumerate(parts):
        for ob in range(o0 // block, o1 // block):
            owner[ob] = k
    return block, owner


def bgmv_add(y: torch.Tensor, x: torch.Tensor, pool_layer: torch.Tensor, tok: torch.Tensor, rows: torch.Tensor,
             plan) -> bool:
    """y[tok] += LoRA delta in place on CUDA; ``plan`` = (block_o, block_part [B] int32, parts [K, 4] int32,
    block_r, in_features) on y's device. False (nothing done) when the kernel cannot take these tensors."""
    if not y.is_cuda or torch.is_grad_enabled() or plan is None:
        return False
    launch = _triton()
    if launch is None or not (y.is_contiguous() and x.stride(1) == 1 and pool_layer.is_contiguous()):
        return False
    block_o, block_part, parts, block_r, in_features = plan
    launch(y, x, pool_layer, tok, rows, block_part, parts, in_features, block_o, block_r)
    return True
