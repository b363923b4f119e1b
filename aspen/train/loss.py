"""Per-token cross-entropy through the frozen LM head, a chunk of tokens at a time.

Training only ever needs the NLL of the *label* tokens and, for the backward pass, its gradient with respect to
the final hidden states (the head is frozen). :class:`LinearCrossEntropy` computes both in one pass over row
chunks of ``[chunk, vocab]`` logits: per chunk the log-softmax is written over the logits, the NLL is minus
each row's target entry, and ``(softmax - onehot) @ W`` is kept as the hidden-state gradient. The full
``[tokens, vocab]`` logits, their log-softmax and its gradient are never held at once (for 2,000 tokens of a 32k
vocabulary that is three 256 MB tensors less at the peak), and the backward pass is one multiply.

On the CPU in float32, :class:`FrozenHead` holds the head packed for MKL's GEMM both ways (``h @ W^T`` and
``g @ W``; 2 x 98 MB more for a 32k x 768 head). A plain ``torch.mm`` repacks the whole head on every chunk's
call; the packed copy is re-laid out once, at construction, which is why it is kept.
"""
from __future__ import annotations

import torch

CHUNK_ELEMENTS = 1 << 23  # logits per chunk: 32 MB of float32


class FrozenHead:
    """The frozen LM head ``W`` [vocab, hidden] for the two products of the loss: logits ``h @ W^T`` and hidden-state
    gradients ``g @ W`` (packed for MKL when on the CPU in float32 and available, else plain ``torch.mm``)."""

    def __init__(self, weight: torch.Tensor) -> None:
        if weight.requires_grad:
            raise ValueError("the LM head must be frozen (its weight requires grad)")
        self.weight = weight
        self.vocab = weight.shape[0]
        self.chunk = max(1, CHUNK_ELEMENTS // self.vocab)
        self._fwd = self._bwd = None
        if weight.device.type == "cpu" and weight.dtype == torch.float32:
            from aspen.model.packed_linear import PackedMatrix, available

            # MKL's layout where there is one: the panels were measured at inference's row counts, not for this
            backend = "mkl" if available("mkl") else "auto"
            if available(backend):
                self._fwd = PackedMatrix(weight, transposed=True, rows_hint=self.chunk, backend=backend)
                self._bwd = PackedMatrix(weight, transposed=False, rows_hint=self.chunk, backend=backend)

    def logits(self, h: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        return torch.mm(h, self.weight.t(), out=out) if self._fwd is None else self._fwd.mm(h, out)

    def input_grad(self, g: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        return torch.mm(g, self.weight, out=out) if self._bwd is None else self._bwd.mm(g, out)


class LinearCrossEntropy(torch.autograd.Function):
    """nll[t] = logsumexp(h[t] @ W^T) - (h[t] @ W^T)[target[t]]; differentiable in ``h`` only."""

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, head: FrozenHead, targets: torch.Tensor) -> torch.Tensor:
        n, vocab = hidden.shape[0], head.vocab
        need_grad = ctx.needs_input_grad[0]
        nll = torch.empty(n, dtype=torch.float32, device=hidden.device)
        grad = torch.empty_like(hidden) if need_grad else None
        step = max(1, min(n, head.chunk))
        # one logits buffer for every chunk, the (log-)softmax written over it: a fresh 32 MB tensor per chunk is a
        # fresh mapping from the allocator each time, whose page faults slow the head GEMM that writes into it
        buf = torch.empty(step, vocab, dtype=hidden.dtype, device=hidden.device)
        for a in range(0, n, step):
            b = min(n, a + step)
            logits = head.logits(hidden[a:b], buf[:b - a]).float()  # [c, vocab]
            tgt = targets[a:b, None]
            # log-probabilities written over the logits (a row-wise kernel: each row stays in cache), so nothing
            # chunk-sized is allocated: logsumexp allocated a shifted copy of the chunk for every chunk
            logp = torch.log_softmax(logits, dim=1, out=logits)
            nll[a:b] = logp.gather(1, tgt).squeeze(1).neg()
            if need_grad:
                soft = logp.exp_()  # softmax
                soft.scatter_add_(1, tgt, soft.new_full(tgt.shape, -1.0))
                head.input_grad(soft.to(hidden.dtype), grad[a:b])
        ctx.save_for_backward(grad if need_grad else None)
        return nll

    @staticmethod
    def backward(ctx, grad_nll: torch.Tensor):
        (grad,) = ctx.saved_tensors
        return grad * grad_nll[:, None].to(grad.dtype), None, None


def token_nll(hidden: torch.Tensor, head: FrozenHead | torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-token NLL [n] (float32) of ``targets`` under the frozen head (a :class:`FrozenHead`, or its weight
    [vocab, hidden]) given ``hidden`` [n, hidden]."""
    return LinearCrossEntropy.apply(hidden, head if isinstance(head, FrozenHead) else FrozenHead(head), targets)
