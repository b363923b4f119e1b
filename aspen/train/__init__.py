"""Training mode: fine-tune several LoRA adapters at once on one shared (optionally quantized) base model.

The micro-batches of every active adapter are packed into one flat batch, the frozen base runs once over it, and
each token gets its own adapter's delta from the same LoRA op the server uses (:mod:`aspen.lora.op`); the loss,
optimizer, schedule, gradient accumulation, early stopping and hyperparameter search are per adapter.

    from aspen.train import load_config, Trainer
    config, unsupported = load_config("train.yaml")
    Trainer(aspen.load_model(config.base_model), config).train()

Modules: :mod:`~aspen.train.config` (schema, ASPEN-format mapping), :mod:`~aspen.train.data` (records, templates,
label masking), :mod:`~aspen.train.adapter` (trainable weights), :mod:`~aspen.train.trainer` (the fused loop),
:mod:`~aspen.train.search` (successive halving), :mod:`~aspen.train.command` (``aspen train``).
"""
from __future__ import annotations

from typing import Any

__all__ = ["AdapterConfig", "AdapterSpec", "EarlyStopping", "SearchConfig", "TrainConfig", "TrainConfigError",
           "Trainer", "load_config", "parse_config"]


def __getattr__(name: str) -> Any:  # lazy, so that ``import aspen.train`` stays cheap
    if name == "Trainer":
        from aspen.train.trainer import Trainer

        return Trainer
    if name in __all__:
        from aspen.train import config

        return getattr(config, name)
    raise AttributeError(name)
