"""Build a :class:`~aspen.model.decoder.DecoderModel` from a local Hugging Face checkpoint directory (a GGUF file
is converted to one first: :mod:`aspen.model.gguf_cache`).

The model is constructed on the meta device, given uninitialised storage once (``to_empty``), and every tensor
streams from the safetensors shards straight into its place (its slice, for packed projections): nothing is
materialised twice. Every parameter must be written exactly once; a missing or unexpected tensor is an error
that names it.
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
from collections.abc import Iterator

import torch
from safetensors import SafetensorError, safe_open
from tqdm import tqdm

from aspen.errors import CheckpointError
from aspen.model.config import ModelConfig
from aspen.model.decoder import PACKED_MODULES, DecoderModel, group_sizes
from aspen.model.layers import rope_inv_freq

_LAYER_KEY = re.compile(r"^model\.layers\.(\d+)\.(self_attn|mlp)\.(\w+)\.(weight|bias)$")


def checkpoint_shards(path: str) -> list[str]:
    """The safetensors files of a checkpoint: the index's shards, or the single model.safetensors."""
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.isfile(index):
        try:
            with open(index, encoding="utf-8") as f:
                weight_map = json.load(f)["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise CheckpointError(f"{index}: not a valid safetensors index ({e})") from None
        shards = sorted(set(weight_map.values()))
        missing = [s for s in shards if not os.path.isfile(os.path.join(path, s))]
        if missing:
            raise CheckpointError(f"checkpoint {path!r}: shards listed in the index are missing: {missing}")
        return [os.path.join(path, s) for s in shards]
    single = os.path.join(path, "model.safetensors")
    if os.path.isfile(single):
        return [single]
    if any(f.endswith((".bin", ".pt", ".pth")) for f in os.listdir(path)):
        raise CheckpointError(
            f"checkpoint {path!r} has only pickle weights (.bin); convert it to safetensors — pickle files "
            "can run code when loaded and are not read")
    raise CheckpointError(f"checkpoint {path!r} has no model.safetensors or model.safetensors.index.json")


def iter_checkpoint(path: str, progress: bool = True) -> Iterator[tuple[str, torch.Tensor]]:
    shards = checkpoint_shards(path)
    for shard in tqdm(shards, desc="loading shards", unit="shard", disable=not progress or len(shards) < 2):
        try:
            with safe_open(shard, framework="pt", device="cpu") as f:
                for name in f.keys():  # noqa: SIM118 -- safe_open has no __iter__
                    yield name, f.get_tensor(name)
        except SafetensorError as e:
            raise CheckpointError(f"{shard}: unreadable safetensors file ({e}); is it truncated?") from None


def _target(model: DecoderModel, name: str) -> tuple[torch.Tensor, int, int] | None:
    """Where a checkpoint tensor goes: (parameter, row offset, row count); None = to skip."""
    cfg = model.config
    if name == "lm_head.weight" and cfg.tie_word_embeddings:
        return None
    if name.endswith("rotary_emb.inv_freq"):
        return None
    m = _LAYER_KEY.match(name)
    if m and m.group(3) in PACKED_MODULES:
        layer, block, proj, kind = int(m.group(1)), m.group(2), m.group(3), m.group(4)
        packed, part = PACKED_MODULES[proj]
        sizes = group_sizes(cfg, packed)
        module = getattr(getattr(model.model.layers[layer], block), packed)
        param = getattr(module, kind)
        if param is None:
            raise CheckpointError(f"unexpected tensor {name!r}: this config has no {kind} on {proj}")
        return param, sum(sizes[:part]), sizes[part]
    params = dict(model.named_parameters(remove_duplicate=False))
    if name not in params:
        raise CheckpointError(f"unexpected tensor {name!r} in checkpoint (not part of a {cfg.family} model)")
    p = params[name]
    return p, 0, p.shape[0]


def load_weights(model: DecoderModel, path: str, progress: bool = True) -> None:
    """Copy every checkpoint tensor into the (already allocated) model; verifies full coverage."""
    written: dict[int, int] = {}  # id(param) -> rows written
    for name, tensor in iter_checkpoint(path, progress):
        target = _target(model, name)
        if target is None:
            continue
        param, row0, rows = target
        expected = (rows,) + tuple(param.shape[1:])
        if tuple(tensor.shape) != expected:
            raise CheckpointError(
                f"tensor {name!r} has shape {list(tensor.shape)}, the config expects {list(expected)}")
        with torch.no_grad():
            param.data[row0:row0 + rows].copy_(tensor)
        written[id(param)] = written.get(id(param), 0) + rows
    missing = [n for n, p in model.named_parameters() if written.get(id(p), 0) != p.shape[0]]
    if missing:
        raise CheckpointError(f"checkpoint {path!r} lacks tensors for: {missing[:8]}"
                              + (f" (+{len(missing) - 8} more)" if len(missing) > 8 else ""))


def build_model(path: str, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu",
                progress: bool = True, name_or_path: str | None = None) -> DecoderModel:
    """The model of the checkpoint directory ``path``; ``name_or_path`` (default: the config's) is the base model
    name adapters are checked against."""
    config = ModelConfig.from_dir(path)
    if name_or_path:
        config = dataclasses.replace(config, name_or_path=name_or_path)
    with torch.device("meta"):
        model = DecoderModel(config)
    model = model.to(dtype).to_empty(device=device)  # one allocation, in the target dtype
    if config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    load_weights(model, path, progress)
    model.rotary.inv_freq = rope_inv_freq(config).to(device)
    model.requires_grad_(False)
    return model.eval()
