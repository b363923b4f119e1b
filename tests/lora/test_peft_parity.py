"""The multi-LoRA op against PEFT: adapters made by peft itself, logits compared token by token."""
from __future__ import annotations

import pytest
import torch

import aspen
from aspen.lora.op import GATHER_MIN_SEGMENTS, LoraBatch
from aspen.model.batch import SeqChunk
from tests.helpers.adapters import ALL7, ATTN, make_peft_adapter
from tests.helpers.tiny_models import hf_model, make_checkpoint


def _ids(n: int, seed: int) -> list[int]:
    return torch.randint(4, 320, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    return {fam: make_checkpoint(str(tmp_path_factory.mktemp(fam)), fam) for fam in ("llama", "qwen2")}


CASES = [
    {"r": 4, "lora_alpha": 8, "target_modules": ATTN, "use_rslora": False},
    {"r": 8, "lora_alpha": 16, "target_modules": ALL7, "use_rslora": True},
    {"r": 16, "lora_alpha": 8, "target_modules": ALL7, "use_rslora": False},
    {"r": 64, "lora_alpha": 32, "target_modules": ATTN, "use_rslora": True},
    {"r": 8, "lora_alpha": 16, "target_modules": ALL7, "rank_pattern": {"k_proj": 2, "down_proj": 12},
         "alpha_pattern": {"v_proj": 3}},
    {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"], "layers_to_transform": [1]},
]


@pytest.mark.parametrize("family", ["llama", "qwen2"])
@pytest.mark.parametrize("case", range(len(CASES)))
def test_score_with_adapter_matches_peft(bases, tmp_path, family, case):
    ref_model = make_peft_adapter(bases[family], str(tmp_path / "a"), seed=case, **CASES[case])
    ids = _ids(40, seed=case)
    with torch.inference_mode():
        ref = ref_model(torch.tensor([ids])).logits[0]
        base_ref = hf_model(bases[family])(torch.tensor([ids])).logits[0]
    model = aspen.load_model(bases[family], progress=False)
    ours = model.score(ids, adapter=str(tmp_path / "a"), block_size=8)
    assert (ours - ref).abs().max().item() < 1e-4
    assert (ref - base_ref).abs().max().item() > 1e-2  # the adapter really changes the logits


def test_score_takes_an_adapter_or_its_directory(bases, tmp_path):
    make_peft_adapter(bases["llama"], str(tmp_path / "a"), r=4, lora_alpha=8, target_modules=ATTN)
    model = aspen.load_model(bases["llama"], progress=False)
    adapter = model.read_adapter(str(tmp_path / "a"))
    ids = _ids(12, 3)
    assert torch.equal(model.score(ids, adapter=adapter), model.score(ids, adapter=str(tmp_path / "a")))
    with pytest.raises(FileNotFoundError, match="nope"):
        model.score(ids, adapter="nope")


@pytest.mark.parametrize("decode_path", ["kernel", "torch"])
def test_mixed_flat_batch_of_eight_adapters_and_base_rows(bases, tmp_path, monkeypatch, decode_path):
    """Prefill (segment path) and decode (batched path: C++ kernel or torch gather) steps mixing 8 adapters and
    base-only rows."""
    import aspen.lora.op
    from aspen.kernels.cpu_kernels import kernel

    if decode_path == "torch":
        monkeypatch.setattr(aspen.lora.op, "bgmv_add", lambda *a: False)
    else:
        assert kernel() is not None, "the CPU LoRA kernel failed to build"
    path = bases["llama"]
    model = aspen.load_model(path, progress=False)
    specs = [{"r": r, "lora_alpha": 2 * r, "target_modules": t} for r, t in
             [(4, ATTN), (8, ALL7), (16, ALL7), (64, ATTN), (2, ["v_proj"]), (8, ["down_proj", "up_proj"]),
              (16, ["q_proj", "gate_proj"]), (4, ALL7)]]
    adapters = []
    for i, spec in enumerate(specs):
        make_peft_adapter(path, str(tmp_path / f"a{i}"), seed=10 + i, **spec)
        adapters.append(model.read_adapter(str(tmp_path / f"a{i}")))
    pool, pooled = model.pool_adapters(adapters)
    # 8 adapter rows, 2 base rows, and a second sequence of adapter 3 (its segment is not contiguous)
    slots = [0, 1, -1, 2, 3, 4, 5, -1, 6, 7, 3]
    seqs = [_ids(9 + 3 * i, seed=100 + i) for i in range(len(slots))]
    alone = [model.score(s, adapter=adapters[k] if k >= 0 else None, block_size=4) for s, k in zip(seqs, slots)]

    assert len([k for k in slots if k >= 0]) - 1 >= GATHER_MIN_SEGMENTS  # the decode step takes the gather path
    kv = model.new_kv_cache(num_blocks=128, block_size=4)
    tables = [list(range(i, 128, len(slots))) for i in range(len(slots))]

    def step(chunks):
        batch = model.flat_batch(chunks, kv.block_size)
        return model.step(batch, kv, LoraBatch.for_step(batch, pooled, pool))

    prefill = step([SeqChunk(s[:-1], 0, t, adapter_slot=k) for s, t, k in zip(seqs, tables, slots)])
    decode = step([SeqChunk(s[-1:], len(s) - 1, t, adapter_slot=k) for s, t, k in zip(seqs, tables, slots)])
    for i in range(len(slots)):
        assert (prefill[i] - alone[i][-2]).abs().max().item() < 1e-4, f"prefill row {i}"
        assert (decode[i] - alone[i][-1]).abs().max().item() < 1e-4, f"decode row {i}"


@pytest.mark.parametrize("mode", ["int8", "nf4"])
def test_adapter_on_quantized_base_matches_peft(bases, tmp_path, mode):
    from peft import PeftModel
    from transformers import BitsAndBytesConfig

    path = bases["qwen2"]
    make_peft_adapter(path, str(tmp_path / "a"), r=8, lora_alpha=16, target_modules=ALL7)
    if mode == "int8":
        bnb = BitsAndBytesConfig(load_in_8bit=True)
    else:
        bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
    ids = _ids(40, 7)
    with torch.inference_mode():
        qbase = hf_model(path, quantization_config=bnb, device_map="cpu")
        ref = PeftModel.from_pretrained(qbase, str(tmp_path / "a")).eval()(torch.tensor([ids])).logits[0]
        full = PeftModel.from_pretrained(hf_model(path), str(tmp_path / "a")).eval()(torch.tensor([ids])).logits[0]
    ours = aspen.load_model(path, quantize=mode, progress=False).score(ids, adapter=str(tmp_path / "a"), block_size=8)
    # same reasoning as the base-model test: int8 kernels are identical; bitsandbytes' 4-bit CPU path rounds
    # differently by the number of rows per call (~1e-2), far below the quantization error itself
    tol = 1e-4 if mode == "int8" else 0.05
    assert (ours - ref).abs().max().item() < tol
    assert (ref - full).abs().max().item() > 10 * tol
