"""PEFT LoRA adapter reading / writing, checked against adapters made and loaded by ``peft`` itself."""
from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import struct
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

pytest.importorskip("peft")
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora import LoraLayer
from safetensors.torch import load_file, save_file

from aspen.errors import AdapterError, AdapterNotFoundError
from aspen.lora.peft.reader import LoraAdapter, LoraWeights, load_peft_adapter
from aspen.lora.peft.writer import random_adapter, save_peft_adapter
from aspen.model.config import LORA_TARGETS, ModelConfig
from tests.helpers.adapters import ATTN
from tests.helpers.tiny_models import hf_model, make_checkpoint

ALL = list(LORA_TARGETS)
ST = "adapter_model.safetensors"


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("ckpt")
    return {fam: make_checkpoint(str(root / fam), fam) for fam in ("llama", "qwen2")}


def make_peft(ckpt: str, out: Path | str, seed: int = 0, **lora: Any):
    torch.manual_seed(seed)
    pm = get_peft_model(hf_model(ckpt), LoraConfig(init_lora_weights=False, **lora)).eval()
    pm.save_pretrained(str(out))
    return pm


def peft_modules(pm) -> dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor, float]]:
    out = {}
    for name, mod in pm.named_modules():
        if isinstance(mod, LoraLayer) and "default" in mod.lora_A:
            m = re.search(r"layers\.(\d+)\.(?:self_attn|mlp)\.(\w+)$", name)
            assert m, name
            out[int(m.group(1)), m.group(2)] = (mod.lora_A["default"].weight.detach(),
                                                mod.lora_B["default"].weight.detach(), mod.scaling["default"])
    return out


def assert_matches_peft(adapter: LoraAdapter, pm) -> None:
    """``pm``: a PEFT model, or what :func:`peft_modules` returned for one."""
    expected = pm if isinstance(pm, dict) else peft_modules(pm)
    assert set(adapter.weights) == set(expected)
    for key, (A, B, scale) in expected.items():
        w = adapter.weights[key]
        assert w.A.dtype == torch.float32 and w.A.is_contiguous() and w.B.is_contiguous()
        assert torch.equal(w.A, A) and torch.equal(w.B, B), key
        assert w.scale == scale, (key, w.scale, scale)
    assert adapter.target_modules == tuple(sorted({p for _, p in expected}))


def assert_same(a: LoraAdapter, b: LoraAdapter) -> None:
    assert set(a.weights) == set(b.weights)
    for k, w in a.weights.items():
        assert torch.equal(w.A, b.weights[k].A) and torch.equal(w.B, b.weights[k].B), k
        assert w.scale == b.weights[k].scale, k


def spec(**lora: Any) -> dict[str, Any]:
    return lora


CASES = {
    "llama-attn-r4": ("llama", spec(r=4, lora_alpha=8, target_modules=ATTN)),
    "llama-all-r8": ("llama", spec(r=8, lora_alpha=16, target_modules=ALL)),
    "qwen2-all-r16-rslora": ("qwen2", spec(r=16, lora_alpha=32, target_modules=ALL, use_rslora=True)),
    "qwen2-qv-r64": ("qwen2", spec(r=64, lora_alpha=16, target_modules=["q_proj", "v_proj"])),
    "llama-patterns": ("llama", spec(r=8, lora_alpha=16, target_modules=ALL,
                                     rank_pattern={"model.layers.0.self_attn.q_proj": 4, "down_proj": 16},
                                     alpha_pattern={"k_proj": 3, r"layers\.1\.mlp\.up_proj": 5.5})),
    "qwen2-regex": ("qwen2", spec(r=8, lora_alpha=8,
                                  target_modules=r".*\.layers\.1\.(self_attn\.(q|v)_proj|mlp\.down_proj)")),
    "llama-layers-list": ("llama", spec(r=4, lora_alpha=4, target_modules=ALL, layers_to_transform=[1],
                                        layers_pattern="layers")),
    "qwen2-layer-int-rslora-pattern": ("qwen2", spec(r=8, lora_alpha=16, target_modules=ATTN, layers_to_transform=0,
                                                     use_rslora=True, rank_pattern={"v_proj": 4})),
}


@pytest.mark.parametrize("case", list(CASES))
def test_load_matches_peft(case: str, ckpts: dict[str, str], tmp_path: Path) -> None:
    family, lora = CASES[case]
    pm = make_peft(ckpts[family], tmp_path / "ad", **lora)
    cfg = ModelConfig.from_dir(ckpts[family])
    adapter = load_peft_adapter(str(tmp_path / "ad"), cfg)
    assert_matches_peft(adapter, pm)
    assert adapter.source == str(tmp_path / "ad")
    assert adapter.base_model_name_or_path == ckpts[family]
    assert adapter.max_rank == max(w.rank for w in adapter.weights.values())
    assert adapter.nbytes == sum(4 * (w.A.numel() + w.B.numel()) for w in adapter.weights.values())


@pytest.mark.parametrize("case", ["llama-all-r8", "qwen2-all-r16-rslora", "llama-patterns", "qwen2-regex",
                                  "llama-layers-list", "qwen2-layer-int-rslora-pattern"])
@pytest.mark.parametrize("rslora", [False, True])
def test_round_trip_through_peft(case: str, rslora: bool, ckpts: dict[str, str], tmp_path: Path) -> None:
    family, lora = CASES[case]
    ckpt = ckpts[family]
    pm = make_peft(ckpt, tmp_path / "ad", **lora)
    cfg = ModelConfig.from_dir(ckpt)
    adapter = load_peft_adapter(str(tmp_path / "ad"), cfg)
    out = tmp_path / "out"
    save_peft_adapter(adapter, str(out), base_model_name_or_path=ckpt, use_rslora=rslora)
    ids = torch.randint(0, 320, (2, 12), generator=torch.Generator().manual_seed(1))
    pm2 = PeftModel.from_pretrained(hf_model(ckpt), str(out)).eval()
    with torch.no_grad():
        diff = (pm(input_ids=ids).logits - pm2(input_ids=ids).logits).abs().max().item()
    assert diff < 1e-5
    assert_matches_peft(load_peft_adapter(str(out), cfg), pm2)
    assert_same(load_peft_adapter(str(out), cfg), adapter)


# ---------------------------------------------------------------- error cases, on copies of one saved adapter


@pytest.fixture(scope="module")
def saved(ckpts: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Any]:
    out = tmp_path_factory.mktemp("saved") / "ad"
    pm = make_peft(ckpts["llama"], out, r=4, lora_alpha=8, target_modules=ATTN)
    return str(out), peft_modules(pm)


@pytest.fixture
def cfg(ckpts: dict[str, str]) -> ModelConfig:
    return ModelConfig.from_dir(ckpts["llama"])


@pytest.fixture
def ad(saved: tuple[str, Any], tmp_path: Path) -> str:
    dst = tmp_path / "copy"
    shutil.copytree(saved[0], dst)
    return str(dst)


def edit_config(path: str, **changes: Any) -> None:
    file = os.path.join(path, "adapter_config.json")
    with open(file) as f:
        raw = json.load(f)
    for k, v in changes.items():
        if v is ...:
            raw.pop(k, None)
        else:
            raw[k] = v
    with open(file, "w") as f:
        json.dump(raw, f)


def edit_tensors(path: str, fn: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]]) -> None:
    file = os.path.join(path, ST)
    save_file(fn(load_file(file)), file)


def expect_error(path: str, cfg: ModelConfig, *needles: str, cls: type = AdapterError, **kw: Any) -> str:
    with pytest.raises(cls) as ei:
        load_peft_adapter(path, cfg, **kw)
    msg = str(ei.value)
    for n in needles:
        assert n in msg, (n, msg)
    return msg


def key(layer: int, proj: str, kind: str) -> str:
    block = "self_attn" if proj in ATTN else "mlp"
    return f"base_model.model.model.layers.{layer}.{block}.{proj}.{kind}.weight"


def test_corrupt_json(ad: str, cfg: ModelConfig) -> None:
    Path(ad, "adapter_config.json").write_text('{"peft_type": "LORA", "r": ')
    expect_error(ad, cfg, "adapter_config.json", "invalid JSON")


def test_truncated_safetensors(ad: str, cfg: ModelConfig) -> None:
    f = Path(ad, ST)
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    expect_error(ad, cfg, ST, "cannot read safetensors")


def test_a_loaded_adapter_keeps_its_weights_when_its_file_is_rewritten(ad: str, cfg: ModelConfig,
                                                                      saved: tuple[str, Any]) -> None:
    """What was validated is what is served: the weights are a private copy, not a view of the file (a training
    job re-saving into the adapter root rewrites the file in place; a mapping would then change under us, or
    kill the process with SIGBUS once the file is shorter)."""
    adapter = load_peft_adapter(ad, cfg)
    f = Path(ad, ST)
    with open(f, "r+b") as out:  # in place, as `open(path, "wb")` would: same inode, same pages
        (header,) = struct.unpack("<Q", out.read(8))
        out.seek(8 + header)
        out.write(b"\xff" * (f.stat().st_size - 8 - header))  # every weight NaN
    assert_matches_peft(adapter, saved[1])
    os.truncate(f, 0)
    assert_matches_peft(adapter, saved[1])


def test_wrong_hidden_size(cfg: ModelConfig, tmp_path: Path) -> None:
    import transformers

    other = transformers.LlamaConfig(vocab_size=320, hidden_size=96, intermediate_size=128, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2)
    pm = get_peft_model(transformers.LlamaForCausalLM(other),
                        LoraConfig(r=8, target_modules=ATTN, init_lora_weights=False))
    pm.save_pretrained(str(tmp_path / "ad"))
    expect_error(str(tmp_path / "ad"), cfg, "lora_A of layers.0.self_attn.q_proj has shape [8, 96], "
                                            "base expects [8, 64]")
    # and with matching A but a bad B
    small = dataclasses.replace(cfg, hidden_size=96, num_attention_heads=4, head_dim=24, num_key_value_heads=2,
                                intermediate_size=128)
    edit_tensors(str(tmp_path / "ad"), lambda sd: {k: (v[:40] if "o_proj.lora_B" in k else v) for k, v in sd.items()})
    expect_error(str(tmp_path / "ad"), small, "lora_B of layers.0.self_attn.o_proj has shape [40, 8]",
                 "base expects [96, 8]")


def test_dora(ckpts: dict[str, str], cfg: ModelConfig, tmp_path: Path) -> None:
    torch.manual_seed(0)
    pm = get_peft_model(hf_model(ckpts["llama"]), LoraConfig(r=4, target_modules=ATTN, use_dora=True))
    pm.save_pretrained(str(tmp_path / "ad"))
    msg = expect_error(str(tmp_path / "ad"), cfg, "use_dora", "DoRA")
    assert str(tmp_path / "ad") in msg
    edit_config(str(tmp_path / "ad"), use_dora=False)
    expect_error(str(tmp_path / "ad"), cfg, "lora_magnitude_vector")


@pytest.mark.parametrize(("field", "value"), [
    ("modules_to_save", ["lm_head"]), ("bias", "all"), ("bias", "lora_only"), ("lora_bias", True),
    ("use_qalora", True), ("layer_replication", [[0, 2]]), ("target_parameters", ["mlp.experts.down_proj"]),
    ("trainable_token_indices", [1, 2]), ("alora_invocation_tokens", [5, 6]), ("init_lora_weights", "pissa"),
    ("init_lora_weights", "olora"), ("arrow_config", {"top_k": 2}), ("peft_type", "IA3"),
])
def test_refused_config_fields(field: str, value: Any, ad: str, cfg: ModelConfig) -> None:
    edit_config(ad, **{field: value})
    msg = expect_error(ad, cfg, field)
    assert repr(ad) in msg


@pytest.mark.parametrize(("targets", "needle"), [
    (["q_proj", "lm_head"], "lm_head"), (["embed_tokens", "v_proj"], "embed_tokens"),
    (["self_attn"], "self_attn"), (r".*(q_proj|lm_head)", "lm_head"), (r"model\.embed_tokens|.*v_proj", "embed_tokens"),
])
def test_refused_targets(targets: Any, needle: str, ad: str, cfg: ModelConfig) -> None:
    edit_config(ad, target_modules=targets)
    expect_error(ad, cfg, "target_modules", needle)


def test_init_only_options_are_fine(ad: str, cfg: ModelConfig, saved: tuple[str, Any]) -> None:
    edit_config(ad, init_lora_weights="eva", eva_config={"rho": 2.0}, loftq_config={}, lora_dropout=0.1,
                lora_ga_config=None, megatron_config=None, velora_config=None, exclude_modules=None)
    load_peft_adapter(ad, cfg)


def test_peft_type_missing(ad: str, cfg: ModelConfig) -> None:
    edit_config(ad, peft_type=...)
    assert len(load_peft_adapter(ad, cfg)) == 8  # has r: accepted
    edit_config(ad, r=...)
    expect_error(ad, cfg, "peft_type")


def test_pickle_needs_opt_in(ckpts: dict[str, str], cfg: ModelConfig, tmp_path: Path,
                             monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(0)
    pm = get_peft_model(hf_model(ckpts["llama"]), LoraConfig(r=4, target_modules=ATTN, init_lora_weights=False))
    pm.save_pretrained(str(tmp_path / "ad"), safe_serialization=False)
    assert os.listdir(tmp_path / "ad") and not (tmp_path / "ad" / ST).exists()
    expect_error(str(tmp_path / "ad"), cfg, "allow_pickle", "--allow-pickle-adapters", "adapter_model.bin")
    calls: list[dict] = []
    real = torch.load

    def spy(*a: Any, **kw: Any) -> Any:
        calls.append(kw)
        return real(*a, **kw)

    monkeypatch.setattr(torch, "load", spy)
    assert_matches_peft(load_peft_adapter(str(tmp_path / "ad"), cfg, allow_pickle=True), pm)
    assert calls and calls[0]["weights_only"] is True and calls[0]["map_location"] == "cpu"


def test_extra_keys(ad: str, cfg: ModelConfig) -> None:
    edit_tensors(ad, lambda sd: {**sd, key(0, "q_proj", "lora_C"): torch.zeros(2, 2),
                                 "base_model.model.lm_head.weight": torch.zeros(2, 2)})
    expect_error(ad, cfg, "extra keys", "lora_C", "base_model.model.lm_head.weight")


def test_wrong_block_is_extra(ad: str, cfg: ModelConfig) -> None:
    edit_tensors(ad, lambda sd: {k.replace("self_attn.q_proj", "mlp.q_proj"): v for k, v in sd.items()})
    expect_error(ad, cfg, "extra keys", "mlp.q_proj")


def test_embedding_lora_keys(ad: str, cfg: ModelConfig) -> None:
    edit_tensors(ad, lambda sd: {**sd, "base_model.model.model.embed_tokens.lora_embedding_A": torch.zeros(4, 320)})
    expect_error(ad, cfg, "lora_embedding")


def test_missing_partner(ad: str, cfg: ModelConfig) -> None:
    edit_tensors(ad, lambda sd: {k: v for k, v in sd.items() if k != key(1, "v_proj", "lora_B")})
    expect_error(ad, cfg, "missing", "layers.1.self_attn.v_proj has lora_A but no lora_B")


def test_layer_out_of_range(ad: str, cfg: ModelConfig) -> None:
    edit_tensors(ad, lambda sd: {k.replace("layers.1.", "layers.5."): v for k, v in sd.items()})
    expect_error(ad, cfg, "layer(s) [5]", "2 layers")


def test_untargeted_module_weights(ad: str, cfg: ModelConfig) -> None:
    edit_config(ad, target_modules=["q_proj", "v_proj"])
    expect_error(ad, cfg, "does not target", "k_proj")


def test_rank_disagrees_with_config(ad: str, cfg: ModelConfig) -> None:
    edit_config(ad, r=8)
    expect_error(ad, cfg, "rank 4", "r=8")


def test_non_float_and_non_finite(ad: str, cfg: ModelConfig) -> None:
    k = key(0, "k_proj", "lora_A")
    edit_tensors(ad, lambda sd: {**sd, k: sd[k].to(torch.int32)})
    expect_error(ad, cfg, "dtype", "int32", "layers.0.self_attn.k_proj")
    edit_tensors(ad, lambda sd: {**sd, k: torch.full((4, 64), float("nan"))})
    expect_error(ad, cfg, "NaN")
    one_inf = torch.zeros(4, 64)
    one_inf[2, 7] = float("-inf")
    edit_tensors(ad, lambda sd: {**sd, k: one_inf})
    expect_error(ad, cfg, "NaN or Inf", "layers.0.self_attn.k_proj")
    # huge but finite values overflow a float32 sum (the fast check) and must still be accepted
    edit_tensors(ad, lambda sd: {**sd, k: torch.full((4, 64), 3e38)})
    assert load_peft_adapter(ad, cfg).weights[0, "k_proj"].A.max().item() == pytest.approx(3e38)


def test_half_precision_is_converted(ad: str, cfg: ModelConfig, saved: tuple[str, Any]) -> None:
    edit_tensors(ad, lambda sd: {k: v.to(torch.bfloat16 if "lora_A" in k else torch.float16) for k, v in sd.items()})
    a = load_peft_adapter(ad, cfg)
    for k, (A, B, _) in saved[1].items():
        assert a.weights[k].A.dtype == torch.float32
        assert torch.equal(a.weights[k].A, A.to(torch.bfloat16).float())
        assert torch.equal(a.weights[k].B, B.half().float())


def test_missing_things(cfg: ModelConfig, ad: str, tmp_path: Path) -> None:
    expect_error(str(tmp_path / "nope"), cfg, "nope", cls=AdapterNotFoundError)
    os.remove(os.path.join(ad, ST))
    expect_error(ad, cfg, repr(ad), "neither")
    os.remove(os.path.join(ad, "adapter_config.json"))
    expect_error(ad, cfg, "adapter_config.json")


def test_base_mismatch_warns(ad: str, cfg: ModelConfig, ckpts: dict[str, str]) -> None:
    with pytest.warns(UserWarning, match="other-model"):
        a = load_peft_adapter(ad, cfg, expected_base="/models/other-model")
    assert len(a) == 8
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_peft_adapter(ad, cfg, expected_base=ckpts["llama"])
        load_peft_adapter(ad, cfg, expected_base="hub-org/" + os.path.basename(ckpts["llama"]))


def test_fan_in_fan_out(ad: str, cfg: ModelConfig, saved: tuple[str, Any]) -> None:
    edit_config(ad, fan_in_fan_out=True)  # PEFT's own layout: flag is about the base layer, tensors unchanged
    a = load_peft_adapter(ad, cfg)
    edit_tensors(ad, lambda sd: {k: v.t().contiguous() for k, v in sd.items()})  # stored transposed
    b = load_peft_adapter(ad, cfg)
    for k, (A, B, scale) in saved[1].items():
        for x in (a, b):
            assert torch.equal(x.weights[k].A, A) and torch.equal(x.weights[k].B, B) and x.weights[k].scale == scale
            assert x.weights[k].A.is_contiguous()
    edit_config(ad, fan_in_fan_out=False)
    expect_error(ad, cfg, "has shape")


def test_adapter_name_infix(ad: str, cfg: ModelConfig, saved: tuple[str, Any]) -> None:
    edit_tensors(ad, lambda sd: {re.sub(r"\.(lora_[AB])\.weight$", r".\1.default.weight", k): v
                                 for k, v in sd.items()})
    a = load_peft_adapter(ad, cfg)
    assert all(torch.equal(a.weights[k].A, A) for k, (A, _, _) in saved[1].items())


# ---------------------------------------------------------------- writing and synthetic adapters


def test_random_adapter_round_trip(cfg: ModelConfig, tmp_path: Path) -> None:
    a = random_adapter(cfg, 3, ["down_proj", "q_proj"], seed=7, alpha=0.3, layers=[1])
    b = random_adapter(cfg, 3, ["down_proj", "q_proj"], seed=7, alpha=0.3, layers=[1])
    assert_same(a, b)
    assert a.target_modules == ("down_proj", "q_proj") and a.layers() == (1,) and a.max_rank == 3
    assert a.weights[1, "down_proj"].A.shape == (3, 128) and a.weights[1, "down_proj"].B.shape == (64, 3)
    assert a.nbytes == 4 * 3 * (64 + 64 + 128 + 64)
    for rslora in (False, True):
        save_peft_adapter(a, str(tmp_path / "out"), use_rslora=rslora)
        assert_same(load_peft_adapter(str(tmp_path / "out"), cfg), a)
    raw = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert raw["peft_type"] == "LORA" and raw["task_type"] == "CAUSAL_LM" and raw["layers_to_transform"] == [1]
    assert sorted(os.listdir(tmp_path)) == ["out"]  # temp and old dirs are gone


def test_mixed_adapter_saves_patterns(cfg: ModelConfig, tmp_path: Path, ckpts: dict[str, str]) -> None:
    parts = [random_adapter(cfg, r, [p], seed=r, alpha=alpha) for r, p, alpha in
             [(4, "q_proj", 8), (8, "v_proj", 8), (16, "down_proj", 5.5)]]
    weights = {k: w for p in parts for k, w in p.weights.items()}
    weights[0, "q_proj"] = LoraWeights(torch.randn(2, 64), torch.randn(64, 2), 0.1)
    mixed = LoraAdapter(weights=weights, target_modules=("down_proj", "q_proj", "v_proj"))
    save_peft_adapter(mixed, str(tmp_path / "out"), r=8, lora_alpha=16, extra_config={"revision": "x"})
    raw = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert raw["r"] == 8 and raw["lora_alpha"] == 16 and raw["rank_pattern"] and raw["alpha_pattern"]
    assert raw["revision"] == "x"
    assert_same(load_peft_adapter(str(tmp_path / "out"), cfg), mixed)
    assert_matches_peft(mixed, PeftModel.from_pretrained(hf_model(ckpts["llama"]), str(tmp_path / "out")))
    with pytest.raises(ValueError, match="rank_pattern"):
        save_peft_adapter(mixed, str(tmp_path / "x"), extra_config={"rank_pattern": {}})


def test_ragged_layers_save_exact_targets(cfg: ModelConfig, tmp_path: Path, ckpts: dict[str, str]) -> None:
    q = random_adapter(cfg, 4, ["q_proj"], seed=1, layers=[0])
    mlp = random_adapter(cfg, 8, ["down_proj", "up_proj"], seed=2, layers=[1], alpha=4)
    ragged = LoraAdapter(weights={**q.weights, **mlp.weights}, target_modules=("down_proj", "q_proj", "up_proj"))
    save_peft_adapter(ragged, str(tmp_path / "out"))
    raw = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert isinstance(raw["target_modules"], str) and raw["layers_to_transform"] is None
    assert_same(load_peft_adapter(str(tmp_path / "out"), cfg), ragged)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*missing adapter keys.*")
        pm = PeftModel.from_pretrained(hf_model(ckpts["llama"]), str(tmp_path / "out"))
    assert_matches_peft(ragged, pm)  # PEFT adapts exactly these modules, no zero-initialised extras


def test_save_replaces_existing_dir(cfg: ModelConfig, tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "stale.txt").write_text("old")
    a = random_adapter(cfg, 4, ATTN, seed=1)
    save_peft_adapter(a, str(out))
    assert sorted(os.listdir(out)) == ["adapter_config.json", ST]
    assert sorted(os.listdir(tmp_path)) == ["out"]
    assert_same(load_peft_adapter(str(out), cfg), a)


def test_random_adapter_rejects_bad_args(cfg: ModelConfig) -> None:
    with pytest.raises(ValueError):
        random_adapter(cfg, 4, ["lm_head"], seed=0)
    with pytest.raises(ValueError):
        random_adapter(cfg, 4, ATTN, seed=0, layers=[2])
