"""Our decoder over the paged KV cache against transformers' reference implementation (fp32 and bitsandbytes)."""
from __future__ import annotations

import pytest
import torch

import aspen
from aspen.model.batch import SeqChunk
from tests.helpers.tiny_models import hf_model, make_checkpoint

LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 64}

CASES = {
    "llama-gqa-untied": ("llama", {}),
    "llama-tied-bias-llama3rope": ("llama", {"tie_word_embeddings": True, "attention_bias": True,
                                                 "rope_scaling": LLAMA3_ROPE}),
    "llama-mha-linear-rope": ("llama", {"num_key_value_heads": 4, "rope_scaling": {"rope_type": "linear",
                                                                                  "factor": 2.0}}),
    "mistral-sliding-window": ("mistral", {"sliding_window": 20}),
    "qwen2-qkv-bias": ("qwen2", {}),
    "qwen2-tied": ("qwen2", {"tie_word_embeddings": True}),
    "qwen3-qk-norm": ("qwen3", {}),
}


def _ids(n: int, seed: int = 1) -> list[int]:
    return torch.randint(4, 320, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    return {name: make_checkpoint(str(tmp_path_factory.mktemp(name)), fam, **kw)
            for name, (fam, kw) in CASES.items()}


@pytest.mark.parametrize("case", sorted(CASES))
def test_score_matches_transformers(checkpoints, case):
    path = checkpoints[case]
    model = aspen.load_model(path, progress=False)
    ids = _ids(45)  # block size 8: prompt half (23 tokens) spans 3 blocks; decodes cross 3 more boundaries
    ours = model.score(ids, block_size=8)
    with torch.inference_mode():
        ref = hf_model(path)(torch.tensor([ids])).logits[0]
    assert ours.shape == ref.shape == (45, 320)
    assert (ours - ref).abs().max().item() < 1e-4


def test_sliding_window_is_applied(checkpoints, tmp_path):
    """The mistral case only proves something if the window changes the result."""
    no_window = make_checkpoint(str(tmp_path / "nw"), "mistral", sliding_window=None)
    ids = _ids(45)
    a = aspen.load_model(checkpoints["mistral-sliding-window"], progress=False).score(ids, block_size=8)
    b = aspen.load_model(no_window, progress=False).score(ids, block_size=8)
    assert (a - b).abs().max().item() > 1e-2


def test_mixed_flat_batch_equals_single_sequences(checkpoints):
    """Two decodes and two prefill chunks (one continuing a cached prefix) in one step, vs each alone."""
    model = aspen.load_model(checkpoints["qwen2-qkv-bias"], progress=False)
    seqs = [_ids(n, seed=s) for s, n in enumerate((30, 9, 17, 40))]
    ref = [model.score(s, block_size=4)[-1] for s in seqs]
    kv = model.new_kv_cache(num_blocks=64, block_size=4)
    tables = [list(range(i, 64, 4)) for i in range(4)]  # interleaved, non-contiguous blocks
    # warm the caches: sequences 0 and 1 up to their last token, sequence 3 up to token 25
    model.step(model.flat_batch([SeqChunk(seqs[0][:-1], 0, tables[0]), SeqChunk(seqs[1][:-1], 0, tables[1]),
                                 SeqChunk(seqs[3][:25], 0, tables[3])], kv.block_size), kv)
    logits = model.step(model.flat_batch([
        SeqChunk(seqs[0][-1:], 29, tables[0]),  # decode
        SeqChunk(seqs[2], 0, tables[2]),  # fresh prefill
        SeqChunk(seqs[1][-1:], 8, tables[1]),  # decode
        SeqChunk(seqs[3][25:], 25, tables[3]),  # prefill chunk after a cached prefix
    ], kv.block_size), kv)
    for row, want in zip(logits, (ref[0], ref[2], ref[1], ref[3])):
        assert (row - want).abs().max().item() < 1e-4


@pytest.mark.parametrize("mode", ["int8", "nf4", "fp4"])
def test_quantized_matches_transformers_bitsandbytes(checkpoints, mode):
    from transformers import BitsAndBytesConfig

    path = checkpoints["qwen2-qkv-bias"]
    ids = _ids(45)
    if mode == "int8":
        bnb_config = BitsAndBytesConfig(load_in_8bit=True)
    else:
        bnb_config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=mode,
                                        bnb_4bit_compute_dtype=torch.float32)
    with torch.inference_mode():
        ref = hf_model(path, quantization_config=bnb_config, device_map="cpu")(torch.tensor([ids])).logits[0]
        full = hf_model(path)(torch.tensor([ids])).logits[0]
    ours = aspen.load_model(path, quantize=mode, progress=False).score(ids, block_size=8)
    quant_effect = (ref - full).abs().max().item()
    # int8: identical bitsandbytes kernels on identical rows (the packed q/k/v rows are quantized row-wise),
    # so only float summation order differs. 4-bit: bitsandbytes' CPU path dequantizes per call and its result
    # depends on the number of rows in the call (our decode steps run one row, transformers runs all 45), which
    # moves logits by ~1e-2; we require agreement 10x tighter than the quantization error itself.
    tol = 1e-4 if mode == "int8" else 0.05
    assert (ours - ref).abs().max().item() < tol
    assert quant_effect > 10 * tol
    assert quant_effect > 1e-2  # the comparison is meaningful: quantization really changed the logits


def test_decode_kernel_and_torch_fallback_agree(checkpoints, monkeypatch):
    """The compiled paged-decode kernel and the pure-torch SDPA path give the same logits (GQA + window)."""
    import aspen.model.attention
    from aspen.kernels.cpu_kernels import kernel

    assert kernel() is not None, "the CPU kernels failed to build"
    ids = _ids(45)
    for case in ("mistral-sliding-window", "qwen3-qk-norm"):
        model = aspen.load_model(checkpoints[case], progress=False)
        fast = model.score(ids, block_size=8)
        monkeypatch.setattr(aspen.model.attention, "paged_decode_attention", lambda *a: None)
        slow = model.score(ids, block_size=8)
        monkeypatch.undo()
        assert (fast - slow).abs().max().item() < 1e-5
