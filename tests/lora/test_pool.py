"""The paged adapter pool: writes into any pages (scattered, previously used), 16-bit storage, and the decode
kernel reading it against the torch path."""
from __future__ import annotations

import dataclasses

import pytest
import torch

import aspen
import aspen.lora.op
from aspen.lora.op import LoraBatch
from aspen.lora.peft.writer import random_adapter
from aspen.lora.pool import LoraPool, pages_needed
from aspen.model.batch import SeqChunk
from tests.helpers.adapters import POOL_SPECS, decode_logits
from tests.helpers.tiny_models import make_checkpoint


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return aspen.load_model(make_checkpoint(str(tmp_path_factory.mktemp("llama")), "llama"), progress=False)


@pytest.fixture(scope="module")
def adapters(model):
    return [random_adapter(model.config, r, t, seed=i) for i, (r, t) in enumerate(POOL_SPECS)]


def _group_delta(pool, pooled, layer: int, group: str, x: torch.Tensor, width: int) -> torch.Tensor:
    w = aspen.lora.op.PoolWeights(pool, pooled).group_weights(layer, group)
    return aspen.lora.op._segment_delta(x, w, 0.0, width, torch.float32)


def test_scattered_and_reused_pages_read_back_as_a_fresh_write(model, adapters):
    cfg = model.config
    need = [pages_needed(a) for a in adapters]
    fresh = LoraPool(cfg, sum(need))
    dirty = LoraPool(cfg, sum(need) + 40)
    dirty.data.normal_()  # pages left over from other adapters: every unwritten value must not matter
    dirty.data[:, 0] = 0  # (page 0 is the pool's zero page, never handed out)
    order = torch.randperm(sum(need) + 40, generator=torch.Generator().manual_seed(0)).tolist()
    start = 0
    x = {g: torch.randn(5, cfg.module_shape(m[0])[0]) for g, m in aspen.model.decoder.GROUPS.items()}
    for a, n in zip(adapters, need):
        ref = fresh.write(a, list(range(start, start + n)))
        got = dirty.write(a, order[start:start + n])  # scattered, non-contiguous page ids
        start += n
        assert set(ref.groups) == set(got.groups)
        for g, members in aspen.model.decoder.GROUPS.items():
            if g not in ref.groups:
                continue
            width = sum(cfg.module_shape(m)[1] for m in members)
            for layer in range(cfg.num_hidden_layers):
                torch.testing.assert_close(_group_delta(dirty, got, layer, g, x[g], width),
                                           _group_delta(fresh, ref, layer, g, x[g], width), rtol=0, atol=0)


def test_rank_pattern_rows_are_zeroed_on_used_pages(model):
    """A module with a smaller rank in some layer leaves rows of its pages unused there: they must read as zero
    even when the pages held another adapter before."""
    cfg = model.config
    full = random_adapter(cfg, 8, ["q_proj"], seed=1)
    w0 = full.weights[0, "q_proj"]
    weights = {**full.weights, (0, "q_proj"): type(w0)(w0.A[:3].clone(), w0.B[:, :3].clone(), w0.scale)}
    small = dataclasses.replace(full, weights=weights)  # rank 3 in layer 0, 8 elsewhere
    pool = LoraPool(cfg, 8)
    pool.data.normal_()
    pool.data[:, 0] = 0
    pooled = pool.write(small, list(range(8)))
    rows = pooled.groups["qkv_proj"].row_list
    assert pool.data[0, list(rows[3:]), :sum(cfg.module_shape("q_proj"))].abs().max() == 0
    assert pool.data[1, list(rows), :sum(cfg.module_shape("q_proj"))].abs().min() > 0


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_sixteen_bit_pool_kernel_matches_torch_path_and_stays_near_float32(model, adapters, monkeypatch, dtype):
    from aspen.kernels.cpu_kernels import kernel

    assert kernel() is not None, "the CPU LoRA kernel failed to build"
    pool32, pooled32 = model.pool_adapters(adapters)
    pool16, pooled16 = model.pool_adapters(adapters, dtype)
    assert pool16.data.dtype == dtype and pool16.nbytes * 2 == pool32.nbytes
    base = decode_logits(model, pool32, [None] * len(adapters))
    exact = decode_logits(model, pool32, pooled32)
    kernel16 = decode_logits(model, pool16, pooled16)
    monkeypatch.setattr(aspen.lora.op, "bgmv_add", lambda *a: False)
    torch16 = decode_logits(model, pool16, pooled16)
    # the kernel converts the same 16-bit values the torch path converts: float32 rounding apart, equal
    assert (kernel16 - torch16).abs().max().item() < 1e-4
    # 16-bit storage rounds each weight (float16: 11 significant bits, bfloat16: 8); the adapters' effect on the
    # logits (> 0.05) is far larger than that rounding
    effect = (exact - base).abs().max().item()
    tol = 2e-3 if dtype == torch.float16 else 2e-2
    assert effect > 10 * tol
    assert (kernel16 - exact).abs().max().item() < tol


def test_triton_output_blocks_tile_every_part():
    from aspen.kernels.triton_bgmv import output_blocks

    # qkv of a GQA model: q 0..256, (k untargeted) 256..320, v 320..384 -> blocks of 64
    block, owner = output_blocks(((0, 8, 0, 256), (8, 12, 320, 384)), 384)
    assert block == 64 and owner == [0, 0, 0, 0, -1, 1]
    assert output_blocks(((0, 4, 0, 100),), 100) is None  # no power-of-two block >= 16 tiles 100 columns


def _block_tables(lengths: list[int], block_size: int) -> list[list[int]]:
    """Consecutive KV blocks for sequences of these lengths."""
    tables, at = [], 0
    for n in lengths:
        need = -(-n // block_size)
        tables.append(list(range(at, at + need)))
        at += need
    return tables


@pytest.fixture
def prefill_limit(monkeypatch):
    """A limit of 40 prefill tokens per adapter for the batched kernel, whichever kernel this machine has: the
    tiny model holds 256 positions, fewer than the engine's limits."""
    monkeypatch.setattr(aspen.lora.op, "SHORT_PREFILL_TOKENS", 40)
    monkeypatch.setattr(aspen.lora.op, "SGMV_PREFILL_TOKENS", 40)
    return 40


def _prefill(model, adapters, seqs: list[list[int]], slots: list[int]):
    """One step prefilling ``seqs`` (adapter slot per sequence, -1: none) over ``adapters``; its logits, its
    LoraBatch, and a check that every sequence's logits match the sequence scored alone."""
    pool, pooled = model.pool_adapters(adapters)
    kv = model.new_kv_cache(num_blocks=256, block_size=4)
    tables = _block_tables([len(s) for s in seqs], 4)
    chunks = [SeqChunk(s, 0, t, adapter_slot=k, logits="all") for s, t, k in zip(seqs, tables, slots)]
    batch = model.flat_batch(chunks, kv.block_size)
    lora = LoraBatch.for_step(batch, pooled, pool)
    logits = model.step(batch, kv, lora)
    at = 0
    for s, k in zip(seqs, slots):
        alone = model.score(s, adapter=adapters[k] if k >= 0 else None, block_size=4)
        assert (logits[at:at + len(s)] - alone).abs().max().item() < 1e-4
        at += len(s)
    return lora


def _tokens(*lengths: int) -> list[list[int]]:
    return [torch.randint(4, 320, (n,), generator=torch.Generator().manual_seed(n)).tolist() for n in lengths]


def test_short_prefills_take_the_kernel_and_long_ones_segments(model, adapters, prefill_limit):
    """With the CPU kernel, an adapter's short prefill joins the batched rows; a long one stays a segment
    (matmuls); the logits match each sequence alone either way."""
    from aspen.kernels.cpu_kernels import kernel

    assert kernel() is not None and aspen.lora.op.short_prefill_tokens() == prefill_limit
    n0 = prefill_limit + 6
    lb = _prefill(model, adapters[:2], _tokens(n0, 10, 5), [0, 1, -1])
    assert lb.gathered.tokens.tolist() == list(range(n0, n0 + 10))  # the short prefill, one row per token
    assert len(lb.segments) == 1 and lb.segments[0].tokens == slice(0, n0)  # the long one


def test_an_adapters_prompts_apart_in_the_batch_form_one_segment_and_match_each_alone(model, adapters,
                                                                                       prefill_limit):
    """Two prompts of one adapter, with another adapter's prompt between them and too long together for the
    batched rows: one segment over scattered tokens (gathered, then added back row by row)."""
    n = prefill_limit // 2 + 10
    lb = _prefill(model, adapters[:2], _tokens(n, 7, n + 1), [0, 1, 0])
    (seg,) = lb.segments
    assert isinstance(seg.tokens, torch.Tensor)
    assert seg.tokens.tolist() == list(range(n)) + list(range(n + 7, 2 * n + 8))


@pytest.mark.parametrize("rows", [1, 8, 9, 64])
def test_rows_are_added_in_place_by_either_scatter(rows):
    from aspen.lora.op import SMALL_SCATTER_ROWS, _add_rows

    assert SMALL_SCATTER_ROWS in range(1, 64)  # both branches are taken by the cases above
    g = torch.Generator().manual_seed(rows)
    y = torch.randn(100, 24, generator=g)
    tokens = torch.randperm(100, generator=g)[:rows]
    delta = torch.randn(rows, 24, generator=g)
    want = y.clone()
    for i, t in enumerate(tokens.tolist()):
        want[t] += delta[i]
    out = _add_rows(y, tokens, delta)
    assert out.data_ptr() == y.data_ptr() and torch.allclose(y, want, atol=1e-6)


def test_the_batched_plan_puts_each_adapters_rows_together(model, adapters):
    from aspen.lora.op import _GatherPlan

    _, (a, b) = model.pool_adapters(adapters[:2])
    plan = _GatherPlan.build([(0, 1, a), (1, 2, b), (2, 3, a), (3, 5, b), (5, 6, a)], torch.device("cpu"))
    assert plan.tokens.tolist() == [0, 2, 5, 1, 3, 4]
    assert plan.segments.tolist() == [0, 3, 6]
    for g in plan.groups.values():  # a segment's rows read the same pages
        assert all(torch.equal(g.rows[i], g.rows[0]) for i in range(3))
        assert all(torch.equal(g.rows[i], g.rows[3]) for i in range(3, 6))
        assert not torch.equal(g.rows[0], g.rows[3])
