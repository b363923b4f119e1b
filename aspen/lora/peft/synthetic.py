"""Synthetic LoRA adapters on disk for load tests: random PEFT-format adapters for a given base checkpoint.

    aspen loadtest make-adapters --model PATH --out DIR --num 1000 --rank 16 --targets all

writes ``DIR/adapter-0000`` ... ``DIR/adapter-0999``, each a PEFT directory (``adapter_config.json`` +
``adapter_model.safetensors``) made by :func:`aspen.lora.peft.writer.random_adapter` (seed = base seed + index, so adapter
``i`` is the same every time) and written by :func:`aspen.lora.peft.writer.save_peft_adapter`. The shapes come from the
model's ``config.json``; no weights of the base are read. Existing complete adapters are kept (resumable) unless
``overwrite`` is set. Ids are ``f"{prefix}{i:04d}"`` (:func:`adapter_name`): the ids the load tester
(``aspen loadtest run --num-adapters``) sends, by the same naming on its side. The command line:
:mod:`aspen.lora.peft.make_adapters_command`.
"""
from __future__ import annotations

import os
from collections.abc import Sequence

DEFAULT_PREFIX = "adapter-"
TARGET_SETS = {
    "all": ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
    "attn": ("q_proj", "k_proj", "v_proj", "o_proj"),
    "mlp": ("gate_proj", "up_proj", "down_proj"),
    "qv": ("q_proj", "v_proj"),
}


def adapter_name(index: int, prefix: str = DEFAULT_PREFIX) -> str:
    """The id (and directory name) of synthetic adapter ``index``."""
    return f"{prefix}{index:04d}"


def parse_targets(spec: str | Sequence[str]) -> tuple[str, ...]:
    """``all`` | ``attn`` | ``mlp`` | ``qv`` or a comma-separated list of projection names."""
    from aspen.model.config import LORA_TARGETS

    if isinstance(spec, str):
        if spec in TARGET_SETS:
            return TARGET_SETS[spec]
        spec = [s.strip() for s in spec.split(",") if s.strip()]
    targets = tuple(dict.fromkeys(spec))
    bad = [t for t in targets if t not in LORA_TARGETS]
    if bad or not targets:
        raise ValueError(f"unknown LoRA target(s) {bad or spec!r}; expected {sorted(TARGET_SETS)} or names among "
                         f"{LORA_TARGETS}")
    return targets


def parse_ranks(spec: str | int | Sequence[int]) -> tuple[int, ...]:
    """One rank (``16``) or a comma-separated cycle (``8,16,32``: adapter i gets ranks[i % len(ranks)])."""
    if isinstance(spec, int):
        ranks: tuple[int, ...] = (spec,)
    elif isinstance(spec, str):
        ranks = tuple(int(s) for s in spec.split(",") if s.strip())
    else:
        ranks = tuple(int(r) for r in spec)
    if not ranks or any(r <= 0 for r in ranks):
        raise ValueError(f"ranks must be positive integers, got {spec!r}")
    return ranks


def _complete(path: str) -> bool:
    from aspen.lora.peft.config import CONFIG_NAME
    from aspen.lora.peft.reader import SAFETENSORS_NAME

    return all(os.path.isfile(os.path.join(path, f)) for f in (CONFIG_NAME, SAFETENSORS_NAME))


def make_adapters(model: str, out_dir: str, num: int, rank: str | int | Sequence[int] = 16,
                  targets: str | Sequence[str] = "all", seed: int = 0, prefix: str = DEFAULT_PREFIX,
                  overwrite: bool = False, progress: bool = True, workers: int | None = None) -> list[str]:
    """Write ``num`` random adapters for the checkpoint ``model`` under ``out_dir``; returns their ids in order.

    ``workers`` threads generate and write in parallel (torch's RNG and safetensors' writer release the GIL);
    default: the number of CPUs, at most 4."""
    from concurrent.futures import ThreadPoolExecutor

    from tqdm import tqdm

    from aspen.lora.peft.writer import random_adapter, save_peft_adapter
    from aspen.model.config import ModelConfig

    if num <= 0:
        raise ValueError(f"num must be > 0, got {num}")
    config = ModelConfig.from_dir(model)
    ranks, target_list = parse_ranks(rank), parse_targets(targets)
    base_name = os.path.abspath(model)
    os.makedirs(out_dir, exist_ok=True)
    ids = [adapter_name(i, prefix) for i in range(num)]

    def write(i: int) -> None:
        path = os.path.join(out_dir, ids[i])
        if not overwrite and _complete(path):
            return
        adapter = random_adapter(config, ranks[i % len(ranks)], target_list, seed=seed + i)
        save_peft_adapter(adapter, path, base_model_name_or_path=base_name)

    workers = workers or min(4, os.cpu_count() or 1)
    with tqdm(total=num, desc="writing adapters", unit="adapter", disable=not progress) as bar, \
            ThreadPoolExecutor(workers) as pool:
        for _ in pool.map(write, range(num)):
            bar.update(1)
    return ids


def adapter_bytes(config, rank: int, targets: Sequence[str]) -> int:
    """fp32 bytes of one adapter of ``rank`` on ``targets`` for ``config`` (an :class:`aspen.model.config.ModelConfig`)."""
    per_layer = sum(rank * sum(config.module_shape(t)) for t in targets)
    return 4 * per_layer * config.num_hidden_layers
