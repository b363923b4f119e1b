"""The same parity checks on CUDA (run where a GPU is present; CI has none and skips them)."""
from __future__ import annotations

import pytest
import torch

import aspen
from tests.helpers.adapters import ALL7, POOL_SPECS, decode_logits, make_peft_adapter
from tests.helpers.tiny_models import hf_model, make_checkpoint

pytestmark = pytest.mark.gpu


def _ids(n: int) -> list[int]:
    return torch.randint(4, 320, (n,), generator=torch.Generator().manual_seed(3)).tolist()


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3", "mistral"])
def test_cuda_score_matches_transformers(tmp_path, family):
    path = make_checkpoint(str(tmp_path / family), family)
    ids = _ids(45)
    ours = aspen.load_model(path, device="cuda", progress=False).score(ids, block_size=8).cpu()
    with torch.inference_mode():
        ref = hf_model(path).cuda()(torch.tensor([ids], device="cuda")).logits[0].cpu()
    assert (ours - ref).abs().max().item() < 1e-3  # TF32/cuBLAS kernels differ from CPU summation order


def test_cuda_adapter_matches_peft_and_engine_runs(tmp_path):
    from engine import LLMEngine, SamplingParams

    base = make_checkpoint(str(tmp_path / "base"), "llama")
    ref_model = make_peft_adapter(base, str(tmp_path / "adapters" / "a"), r=8, lora_alpha=16, target_modules=ALL7)
    ids = _ids(40)
    with torch.inference_mode():
        ref = ref_model.cuda()(torch.tensor([ids], device="cuda")).logits[0].cpu()
    model = aspen.load_model(base, device="cuda", progress=False)
    ours = model.score(ids, adapter=str(tmp_path / "adapters" / "a"), block_size=8).cpu()
    assert (ours - ref).abs().max().item() < 1e-3
    llm = LLMEngine(model=base, adapter_dir=str(tmp_path / "adapters"), device="cuda", progress=False,
                    num_kv_blocks=128, block_size=8)
    greedy = SamplingParams(max_new_tokens=8, temperature=0.0, ignore_eos=True)
    outs = llm.generate([ids[:10]] * 3 + [ids[:20]] * 9, greedy, ["a", None, "a"] + ["a"] * 9)
    alone = [llm.generate([ids[:10]], greedy, [a])[0].token_ids for a in ("a", None)]
    assert outs[0].token_ids == alone[0] and outs[1].token_ids == alone[1]
    assert llm.check_invariants()["kv_blocks_used"] == 0


@pytest.mark.parametrize("mode", ["nf4", "int8"])
def test_cuda_quantized_runs(tmp_path, mode):
    pytest.importorskip("bitsandbytes")
    path = make_checkpoint(str(tmp_path / "q"), "qwen2")
    logits = aspen.load_model(path, quantize=mode, device="cuda", progress=False).score(_ids(20))
    assert torch.isfinite(logits).all()


def test_cuda_head_cross_entropy_matches_torch():
    import torch.nn.functional as F

    from aspen.train.loss import token_nll

    g = torch.Generator(device="cuda").manual_seed(0)
    hidden = torch.randn(300, 64, device="cuda", generator=g)
    weight = torch.randn(1000, 64, device="cuda", generator=g)
    targets = torch.randint(0, 1000, (300,), device="cuda", generator=g)
    h1, h2 = hidden.clone().requires_grad_(True), hidden.clone().requires_grad_(True)
    ours = token_nll(h1, weight, targets)
    ours.sum().backward()
    ref = F.cross_entropy(h2 @ weight.t(), targets, reduction="none")
    ref.sum().backward()
    torch.testing.assert_close(ours, ref.detach(), rtol=1e-3, atol=1e-3)  # TF32 matmuls on either side
    torch.testing.assert_close(h1.grad, h2.grad, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_cuda_triton_bgmv_matches_torch_path(tmp_path, monkeypatch, dtype):
    """Decode rows of 9 adapters (odd ranks, partial targets) through the Triton kernel vs the torch gather path."""
    from aspen.kernels import triton_bgmv as triton_kernels
    from aspen.lora.peft.writer import random_adapter
    from aspen.model.config import LORA_TARGETS

    if triton_kernels._triton() is None:
        pytest.skip("triton is not installed")
    model = aspen.load_model(make_checkpoint(str(tmp_path / "m"), "llama"), device="cuda", progress=False)
    specs = [*POOL_SPECS, (64, LORA_TARGETS)]
    adapters = [random_adapter(model.config, r, t, seed=i) for i, (r, t) in enumerate(specs)]
    pool, pooled = model.pool_adapters(adapters, dtype)

    def decode():
        return decode_logits(model, pool, pooled).cpu()

    calls = []
    real = triton_kernels.bgmv_add
    monkeypatch.setattr(triton_kernels, "bgmv_add", lambda *a: calls.append(1) or real(*a))
    ours = decode()
    assert calls, "the Triton kernel was not used"
    monkeypatch.setattr(triton_kernels, "bgmv_add", lambda *a: False)
    ref = decode()
    assert (ours - ref).abs().max().item() < 1e-3  # TF32 matmuls in the torch path
