"""Write LoRA adapters in the Hugging Face PEFT format (``adapter_config.json`` + ``adapter_model.safetensors``),
the inverse of :func:`aspen.lora.peft.reader.load_peft_adapter`: adapters we save load in PEFT and give the same logits.
Also makes synthetic adapters (random A and B) for benchmarks and load tests.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence

import torch

from aspen.errors import AdapterError
from aspen.lora.peft.config import ATTN_PROJS, CONFIG_NAME, PeftLoraConfig, module_name
from aspen.lora.peft.reader import SAFETENSORS_NAME, LoraAdapter, LoraWeights
from aspen.model.config import LORA_TARGETS, ModelConfig

# config fields that decide the math: extra_config may not set them
_MATH_FIELDS = frozenset({"peft_type", "r", "lora_alpha", "use_rslora", "target_modules", "exclude_modules",
                          "rank_pattern", "alpha_pattern", "layers_to_transform", "layers_pattern", "fan_in_fan_out",
                          "bias", "use_dora", "lora_bias", "modules_to_save"})


def _alpha_for(scale: float, rank: int, use_rslora: bool) -> float | int:
    """An alpha with alpha / r (or alpha / sqrt(r)) == scale exactly, preferring integers."""
    denom = math.sqrt(rank) if use_rslora else rank
    guess = scale * denom
    cands: list[float | int] = [round(guess), guess]
    lo = hi = guess
    for _ in range(64):
        lo, hi = math.nextafter(lo, -math.inf), math.nextafter(hi, math.inf)
        cands += [lo, hi]
    for a in cands:
        if a / denom == scale:
            return a
    raise AdapterError(f"cannot express scale {scale!r} at rank {rank} as an alpha that round-trips exactly")


def _patterns(values: Mapping[tuple[int, str], float], default: float) -> dict[str, float | int]:
    """Per-module exceptions to `default`: projection-wide keys, preceded by full-name keys (first match wins)."""
    by_proj: dict[str, float] = {}
    for proj in LORA_TARGETS:
        vals = [v for (_, p), v in values.items() if p == proj]
        if vals:
            by_proj[proj] = Counter(vals).most_common(1)[0][0]
    specific = {module_name(*k): v for k, v in sorted(values.items()) if v != by_proj[k[1]]}
    wide = {p: v for p, v in by_proj.items() if v != default}
    return {**specific, **wide}


def _most_common(values: Iterable[float | int]) -> float | int:
    counts = Counter(values)
    return min(counts, key=lambda v: (-counts[v], v))


def _targets(adapter: LoraAdapter) -> tuple[list[str] | str, list[int] | None]:
    """target_modules and layers_to_transform that make PEFT adapt exactly the modules present.

    When every projection covers the same layers: the projection list plus those layers; otherwise a regex
    naming each module (so PEFT creates no zero-initialised modules for the gaps).
    """
    layers = {p: sorted(layer for layer, q in adapter.weights if q == p) for p in adapter.target_modules}
    sets = list(layers.values())
    if all(s == sets[0] for s in sets):
        return list(adapter.target_modules), sets[0]
    alts = []
    for p, ls in layers.items():
        block = "self_attn" if p in ATTN_PROJS else "mlp"
        alts.append(rf"model\.layers\.(?:{'|'.join(map(str, ls))})\.{block}\.{p}")
    return "|".join(alts), None


def peft_config_dict(adapter: LoraAdapter, *, base_model_name_or_path: str | None = None, r: int | None = None,
                     lora_alpha: float | None = None, use_rslora: bool = False) -> dict:
    """The adapter_config.json PEFT would write for `adapter`, with patterns so every scale round-trips."""
    if not adapter.weights:
        raise AdapterError("cannot save an adapter without weights")
    if r is not None and (not isinstance(r, int) or r <= 0):
        raise ValueError(f"r must be a positive integer, got {r!r}")
    ranks = adapter.ranks()
    alphas = {k: _alpha_for(w.scale, w.rank, use_rslora) for k, w in adapter.weights.items()}
    r = r if r is not None else _most_common(ranks.values())
    lora_alpha = lora_alpha if lora_alpha is not None else _most_common(alphas.values())
    targets, transform = _targets(adapter)
    cfg = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "auto_mapping": None,
        "base_model_name_or_path": base_model_name_or_path or adapter.base_model_name_or_path,
        "r": r, "lora_alpha": lora_alpha, "use_rslora": use_rslora,
        "target_modules": targets,
        "rank_pattern": _patterns(ranks, r), "alpha_pattern": _patterns(alphas, lora_alpha),
        "layers_to_transform": transform, "layers_pattern": None,
        "lora_dropout": 0.0, "bias": "none", "fan_in_fan_out": False, "modules_to_save": None,
        "init_lora_weights": True, "use_dora": False, "lora_bias": False, "inference_mode": True,
    }
    check = PeftLoraConfig(r=r, lora_alpha=lora_alpha, use_rslora=use_rslora, rank_pattern=cfg["rank_pattern"],
                           alpha_pattern=cfg["alpha_pattern"],
                           target_modules=targets if isinstance(targets, str) else tuple(targets),
                           layers_to_transform=None if transform is None else tuple(transform))
    for (layer, proj), w in adapter.weights.items():
        name = module_name(layer, proj)
        if not check.targets(name) or check.rank_for(name) != w.rank or check.scale_for(name, w.rank) != w.scale:
            raise AdapterError(f"internal error: {name} would not round-trip through the saved config")
    return cfg


def save_peft_adapter(adapter: LoraAdapter, out_dir: str, *, base_model_name_or_path: str | None = None,
                      r: int | None = None, lora_alpha: float | None = None, use_rslora: bool = False,
                      extra_config: dict | None = None) -> None:
    """Write `adapter` to `out_dir` in PEFT's format, atomically (an existing out_dir is replaced when complete)."""
    from safetensors.torch import save_file

    cfg = peft_config_dict(adapter, base_model_name_or_path=base_model_name_or_path, r=r, lora_alpha=lora_alpha,
                           use_rslora=use_rslora)
    clash = sorted(set(extra_config or {}) & _MATH_FIELDS)
    if clash:
        raise ValueError(f"extra_config may not override {clash}")
    cfg.update(extra_config or {})
    tensors: dict[str, torch.Tensor] = {}
    for (layer, proj), w in adapter.weights.items():
        prefix = f"base_model.model.{module_name(layer, proj)}"
        tensors[f"{prefix}.lora_A.weight"] = w.A.detach().to("cpu", torch.float32).contiguous()
        tensors[f"{prefix}.lora_B.weight"] = w.B.detach().to("cpu", torch.float32).contiguous()

    out_dir = os.path.abspath(out_dir)
    parent, name = os.path.split(out_dir)
    os.makedirs(parent, exist_ok=True)
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise AdapterError(f"cannot save adapter to {out_dir!r}: it exists and is not a directory")
    tmp = tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=parent)
    try:
        save_file(tensors, os.path.join(tmp, SAFETENSORS_NAME), metadata={"format": "pt"})
        with open(os.path.join(tmp, CONFIG_NAME), "w", encoding="utf-8") as f:
            json.dump(cfg, f, indent=2)
            f.write("\n")
        if os.path.isdir(out_dir):
            old = tempfile.mkdtemp(prefix=f".{name}.old-", dir=parent)
            os.rename(out_dir, os.path.join(old, name))
            os.rename(tmp, out_dir)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def random_adapter(config: ModelConfig, rank: int, targets: Sequence[str], seed: int, alpha: float | None = None,
                   layers: Iterable[int] | None = None) -> LoraAdapter:
    """A synthetic adapter with random A and B (N(0, 1/in) and N(0, 0.01/r)); scale alpha / rank (alpha: 2 * rank)."""
    targets = (targets,) if isinstance(targets, str) else tuple(targets)
    bad = [t for t in targets if t not in LORA_TARGETS]
    if bad or not targets or rank <= 0:
        raise ValueError(f"random_adapter needs rank > 0 and targets among {LORA_TARGETS}; got {rank}, {targets}")
    layer_list = sorted(set(range(config.num_hidden_layers) if layers is None else layers))
    if any(not 0 <= i < config.num_hidden_layers for i in layer_list) or not layer_list:
        raise ValueError(f"layers must be within 0..{config.num_hidden_layers - 1}, got {layer_list}")
    scale = (2.0 * rank if alpha is None else alpha) / rank
    gen = torch.Generator().manual_seed(seed)
    weights = {}
    for layer in layer_list:
        for proj in (p for p in LORA_TARGETS if p in targets):
            in_f, out_f = config.module_shape(proj)
            A = torch.randn(rank, in_f, generator=gen) / math.sqrt(in_f)
            B = torch.randn(out_f, rank, generator=gen) * (0.1 / math.sqrt(rank))
            weights[layer, proj] = LoraWeights(A, B, scale)
    return LoraAdapter(weights=weights, target_modules=tuple(sorted(set(targets))))
