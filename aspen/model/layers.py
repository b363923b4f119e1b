"""Small building blocks of the decoder: RMSNorm and rotary position embeddings (default, linear, llama3)."""
from __future__ import annotations

import math

import torch
from torch import nn

from aspen.kernels.fused_ops import Rotation, rms_norm, rotary
from aspen.model.config import ModelConfig


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fused = rms_norm(x, self.weight, self.eps)  # float32 CPU, frozen weight: one pass (aspen.kernels.fused_ops)
        if fused is not None:
            return fused
        dtype = x.dtype
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(dtype)


def rope_inv_freq(config: ModelConfig) -> torch.Tensor:
    """Inverse frequencies [head_dim/2], with the checkpoint's rope_scaling applied."""
    dim = config.head_dim
    inv = 1.0 / (config.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    rs = config.rope_scaling
    if rs.rope_type == "linear":
        return inv / rs.factor
    if rs.rope_type == "llama3":
        old = rs.original_max_position_embeddings
        low_wavelen = old / rs.low_freq_factor
        high_wavelen = old / rs.high_freq_factor
        wavelen = 2 * math.pi / inv
        scaled = torch.where(wavelen > low_wavelen, inv / rs.factor, inv)
        smooth = (old / wavelen - rs.low_freq_factor) / (rs.high_freq_factor - rs.low_freq_factor)
        smoothed = (1 - smooth) * scaled / rs.factor + smooth * scaled
        medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
        return torch.where(medium, smoothed, scaled)
    return inv


class Rotary(nn.Module):
    """cos/sin tables for every position up to max_position_embeddings, looked up per step."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.register_buffer("inv_freq", rope_inv_freq(config), persistent=False)

    def cos_sin(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = positions.float()[:, None] * self.inv_freq.float()[None, :]  # [T, hd/2]
        emb = torch.cat((freqs, freqs), dim=-1)  # [T, hd]
        return emb.cos().to(dtype)[:, None, :], emb.sin().to(dtype)[:, None, :]  # [T, 1, hd]


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [T, heads, hd]; rotate-half convention of the Hugging Face checkpoints (``x * cos + rotate_half(x) *
    sin``): each half is written straight into the output (no concatenated ``rotate_half`` copy), and under
    autograd the backward pass is the inverse rotation. Float32 CPU tensors take the single-pass kernel of
    ``aspen.kernels.fused_ops`` instead (same math, forward and backward)."""
    fused = rotary(x, cos, sin)
    if fused is not None:
        return fused
    if torch.is_grad_enabled() and x.requires_grad:
        return Rotation.apply(x, cos, sin, _rotate)
    return _rotate(x, cos, sin, 1.0)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, sign: float) -> torch.Tensor:
    """Rotation of every (i, i + hd/2) pair of ``x`` by the position's angle (``sign`` -1: by minus it)."""
    half = x.shape[-1] // 2
    c, s = cos[..., :half], sin[..., :half]  # the tables repeat their first half
    x1, x2 = x[..., :half], x[..., half:]
    out = torch.empty(x.shape, dtype=torch.result_type(x, cos), device=x.device)
    o1, o2 = out[..., :half], out[..., half:]
    torch.mul(x1, c, out=o1).addcmul_(x2, s, value=-sign)
    torch.mul(x2, c, out=o2).addcmul_(x1, s, value=sign)
    return out

