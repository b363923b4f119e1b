"""The adapter-loading kernels against the torch paths they replace: the NaN/Inf check and the pool write."""
from __future__ import annotations

import dataclasses

import pytest
import torch

import aspen.lora.pool
from aspen.kernels import adapter_kernels
from aspen.lora.peft.reader import LoraAdapter, LoraWeights
from aspen.lora.peft.writer import random_adapter
from aspen.lora.pool import LoraPool, pages_needed
from aspen.model.config import LORA_TARGETS, ModelConfig

pytestmark = pytest.mark.skipif(adapter_kernels.kernel() is None, reason="the C++ extension could not be built")

CONFIG = ModelConfig(family="llama", vocab_size=64, hidden_size=32, intermediate_size=88, num_hidden_layers=3,
                     num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=64)


def _bits(value: float) -> torch.Tensor:
    return torch.tensor([value], dtype=torch.float32)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf"), None])
@pytest.mark.parametrize("where", [0, 1, 4095, 4096])
def test_all_finite_finds_any_nan_or_inf(bad, where):
    gen = torch.Generator().manual_seed(where)
    tensors = [torch.randn(3, 17, generator=gen), torch.randn(4097, generator=gen), torch.empty(0)]
    if bad is not None:
        tensors[1][where] = bad
    assert adapter_kernels.all_finite(tensors) is (bad is None)
    assert adapter_kernels.all_finite(tensors) == all(bool(torch.isfinite(t).all()) for t in tensors)


def test_all_finite_accepts_huge_finite_values_and_checks_other_dtypes_with_torch():
    huge = torch.full((1000,), 3.0e38)  # their sum overflows to inf: not a reason to refuse
    assert adapter_kernels.all_finite([huge, -huge])
    assert adapter_kernels.all_finite([torch.finfo(torch.float32).max * torch.ones(3), _bits(1e-45)])
    half = torch.ones(8, dtype=torch.float16)
    assert adapter_kernels.all_finite([half])
    half[3] = float("inf")
    assert not adapter_kernels.all_finite([torch.ones(2), half])  # a float16 tensor: the torch path
    assert not adapter_kernels.all_finite([torch.ones(4)[::2].clone().fill_(float("nan"))])


def _uneven_adapter(seed: int) -> LoraAdapter:
    """Rank 6 on all seven projections, but rank 2 for o_proj in layer 1 (as rank_pattern gives) and layer 2
    skipping the MLP (as layers_to_transform does)."""
    full = random_adapter(CONFIG, 6, LORA_TARGETS, seed=seed)
    weights = dict(full.weights)
    o = weights[1, "o_proj"]
    weights[1, "o_proj"] = LoraWeights(o.A[:2].contiguous(), o.B[:, :2].contiguous(), 1.5)
    for proj in ("gate_proj", "up_proj", "down_proj"):
        del weights[2, proj]
    return dataclasses.replace(full, weights=weights)


def _write_both_ways(adapters, pages_of, monkeypatch) -> tuple[LoraPool, LoraPool]:
    total = max(p for pages in pages_of for p in pages) + 1
    with_kernel, with_torch = LoraPool(CONFIG, total), LoraPool(CONFIG, total)
    with_kernel.data.normal_()  # leftovers of earlier adapters: rows an adapter leaves short must come out zero
    with_kernel.data[:, 0] = 0
    with_torch.data.copy_(with_kernel.data)
    calls = []
    real = aspen.lora.pool.write_rows_kernel

    def spy(data, sources):
        fn = real(data, sources)
        calls.append(fn is not None)
        return fn

    monkeypatch.setattr(aspen.lora.pool, "write_rows_kernel", spy)
    for adapter, pages in zip(adapters, pages_of):
        with_kernel.write(adapter, pages)
    assert calls and all(calls), "the pool write did not take the kernel"
    monkeypatch.setattr(aspen.lora.pool, "write_rows_kernel", lambda data, sources: None)
    for adapter, pages in zip(adapters, pages_of):
        with_torch.write(adapter, pages)
    return with_kernel, with_torch


def test_pool_write_kernel_matches_the_torch_path_on_contiguous_scattered_and_uneven_pages(monkeypatch):
    adapters = [random_adapter(CONFIG, 4, LORA_TARGETS, seed=0), random_adapter(CONFIG, 3, ["v_proj", "down_proj"],
                                                                                seed=1), _uneven_adapter(2)]
    need = [pages_needed(a) for a in adapters]
    order = torch.randperm(sum(need) + 5, generator=torch.Generator().manual_seed(0)).tolist()
    pages_of = [list(range(need[0])), order[:need[1]], order[need[1]:need[1] + need[2]]]
    with_kernel, with_torch = _write_both_ways(adapters, pages_of, monkeypatch)
    assert torch.equal(with_kernel.data, with_torch.data)
    # and the values are where the layout says: layer 1's o_proj rows 2.. of the uneven adapter are zero
    pooled = with_torch.write(adapters[2], pages_of[2])
    o_rows = pooled.groups["o_proj"].row_list
    assert torch.count_nonzero(with_kernel.data[1, o_rows[2:], :2 * CONFIG.hidden_size]) == 0
    assert torch.allclose(with_kernel.data[1, o_rows[0], :CONFIG.hidden_size], adapters[2].weights[1, "o_proj"].A[0])


def test_pool_write_kernel_refuses_a_row_outside_the_pool_and_writes_nothing():
    pool = LoraPool(CONFIG, 8)
    before = pool.data.clone()
    w = random_adapter(CONFIG, 2, ["q_proj"], seed=0).weights[0, "q_proj"]
    rows = torch.tensor([3, pool.data.shape[1]])
    with pytest.raises(RuntimeError, match="out of range"):
        adapter_kernels.kernel().write_lora_rows(pool.data, [0], [rows], [w.A], [w.B], [1.0])
    assert torch.equal(pool.data, before)
