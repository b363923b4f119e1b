"""A broken checkpoint gives one clear line naming the problem, never a traceback from deep inside."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

import aspen
from aspen.errors import CheckpointError
from tests.helpers.tiny_models import make_checkpoint


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    return make_checkpoint(str(tmp_path_factory.mktemp("good")), "llama")


def _copy(good: str, tmp_path) -> str:
    dst = str(tmp_path / "ckpt")
    shutil.copytree(good, dst)
    return dst


def _error(path: str, **kwargs) -> str:
    with pytest.raises(CheckpointError) as info:
        aspen.load_model(path, progress=False, **kwargs)
    msg = str(info.value)
    assert "\n" not in msg
    return msg


def test_missing_config(good, tmp_path):
    path = _copy(good, tmp_path)
    os.remove(os.path.join(path, "config.json"))
    assert "no config.json" in _error(path)


def test_not_a_directory(tmp_path):
    assert "is not a directory" in _error(str(tmp_path / "nowhere"))


def test_truncated_safetensors(good, tmp_path):
    path = _copy(good, tmp_path)
    weights = os.path.join(path, "model.safetensors")
    size = os.path.getsize(weights)
    with open(weights, "r+b") as f:
        f.truncate(size // 2)
    msg = _error(path)
    assert "model.safetensors" in msg and "truncated" in msg


def test_unsupported_architecture(good, tmp_path):
    path = _copy(good, tmp_path)
    cfg_path = os.path.join(path, "config.json")
    cfg = json.loads(Path(cfg_path).read_text())
    cfg["architectures"] = ["GPT2LMHeadModel"]
    Path(cfg_path).write_text(json.dumps(cfg))
    msg = _error(path)
    assert "GPT2LMHeadModel" in msg and "LlamaForCausalLM" in msg


def test_unsupported_rope_scaling(good, tmp_path):
    path = _copy(good, tmp_path)
    cfg_path = os.path.join(path, "config.json")
    cfg = json.loads(Path(cfg_path).read_text())
    cfg["rope_scaling"] = {"rope_type": "yarn", "factor": 4.0}
    cfg.pop("rope_parameters", None)
    Path(cfg_path).write_text(json.dumps(cfg))
    assert "yarn" in _error(path)


def test_wrong_tensor_shape(good, tmp_path):
    path = _copy(good, tmp_path)
    cfg_path = os.path.join(path, "config.json")
    cfg = json.loads(Path(cfg_path).read_text())
    cfg["intermediate_size"] = 96
    Path(cfg_path).write_text(json.dumps(cfg))
    msg = _error(path)
    assert "shape" in msg and "mlp" in msg


def test_missing_weights_file(good, tmp_path):
    path = _copy(good, tmp_path)
    os.remove(os.path.join(path, "model.safetensors"))
    assert "no model.safetensors" in _error(path)


def test_bad_dtype_and_quantize_values(good):
    with pytest.raises(ValueError, match="dtype"):
        aspen.load_model(good, dtype="float64", progress=False)
    with pytest.raises(ValueError, match="quantize"):
        aspen.load_model(good, quantize="int3", progress=False)


def test_sharded_checkpoint_loads(tmp_path):
    import torch

    path = make_checkpoint(str(tmp_path / "sharded"), "llama", max_shard_size="50KB")
    shards = [f for f in os.listdir(path) if f.endswith(".safetensors")]
    assert len(shards) > 2 and os.path.isfile(os.path.join(path, "model.safetensors.index.json"))
    from tests.helpers.tiny_models import hf_model

    ids = list(range(5, 40))
    ours = aspen.load_model(path, progress=False).score(ids)
    with torch.inference_mode():
        ref = hf_model(path)(torch.tensor([ids])).logits[0]
    assert (ours - ref).abs().max().item() < 1e-4
