"""Training data: JSON / JSONL records turned into token ids with a label mask.

Record kinds (one file may mix them):

* alpaca style ``{"instruction", "input" (optional), "output"}``, rendered with a prompt template: the built-in
  ``alpaca`` template or a template file in the ASPEN format (``{"prompt": "...{instruction}...{input}...
  {output}...", "prompt_no_input": "..."}``). Everything before ``{output}`` is the prompt, the rest the response;
* ``{"prompt", "completion"}``;
* ``{"text"}``: every token is trained on.

The prompt is tokenized with the tokenizer's special tokens (BOS, as the server tokenizes a prompt), the response
without, and EOS is appended. With ``train_on_inputs`` false only the response tokens (and EOS) are targets: a
sequence's first ``n_prompt`` tokens are never predicted. Sequences longer than ``cutoff_len`` are truncated;
those left with no target are dropped (and counted in the log). There is no padding anywhere: batches are flat.
"""
from __future__ import annotations

import json
import logging
import os
import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from aspen.train.config import AdapterConfig, TrainConfigError

log = logging.getLogger(__name__)

IGNORE = -100  # target of a position whose next token is not trained on


@dataclass(frozen=True)
class PromptTemplate:
    """ASPEN's template format: ``prompt`` (with input) and ``prompt_no_input``, both containing ``{output}``."""

    prompt: str
    prompt_no_input: str
    source: str = "alpaca"

    def __post_init__(self) -> None:
        for name in ("prompt", "prompt_no_input"):
            text = getattr(self, name)
            if not isinstance(text, str) or text.count("{output}") != 1:
                raise TrainConfigError(f"template {self.source!r}: {name} must be a string containing "
                                       f"'{{output}}' exactly once, got {text!r}")

    def render(self, rec: dict[str, Any], where: str) -> tuple[str, str]:
        """(prompt, response) of an alpaca-style record."""
        text = self.prompt if rec.get("input") else self.prompt_no_input
        head, tail = text.split("{output}")
        fields = {k: "" if v is None else str(v) for k, v in rec.items()}
        fields.setdefault("input", "")
        try:
            return head.format_map(fields), str(rec["output"]) + tail.format_map(fields)
        except (KeyError, IndexError, ValueError) as e:
            raise TrainConfigError(f"{where}: template {self.source!r} needs field {e} the record lacks") from None


ALPACA = PromptTemplate(
    prompt="Below is an instruction that describes a task, paired with an input that provides further context. "
           "Write a response that appropriately completes the request.\n\n### Instruction:\n{instruction}\n\n"
           "### Input:\n{input}\n\n### Response:\n{output}",
    prompt_no_input="Below is an instruction that describes a task. Write a response that appropriately "
                    "completes the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n{output}")


def load_template(spec: str) -> PromptTemplate:
    """``"alpaca"`` or the path of a template JSON file."""
    if spec == "alpaca":
        return ALPACA
    try:
        with open(spec, encoding="utf-8") as f:
            raw = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise TrainConfigError(f"prompt template {spec!r}: cannot read ({e})") from None
    if not isinstance(raw, dict) or "prompt" not in raw:
        raise TrainConfigError(f"prompt template {spec!r}: expected an object with 'prompt' and 'prompt_no_input'")
    return PromptTemplate(raw["prompt"], raw.get("prompt_no_input", raw["prompt"]), source=spec)


@dataclass(frozen=True)
class Example:
    """A tokenized training sequence; tokens ``ids[n_prompt:]`` are the targets (``n_prompt >= 1``)."""

    ids: tuple[int, ...]
    n_prompt: int

    @property
    def num_targets(self) -> int:
        return len(self.ids) - self.n_prompt

    def targets(self) -> list[int]:
        """Per position, the token it is trained to predict (the next one) or :data:`IGNORE`."""
        return [IGNORE] * (self.n_prompt - 1) + list(self.ids[self.n_prompt:]) + [IGNORE]


def load_records(path: str) -> list[dict[str, Any]]:
    """A JSON list of objects, or JSONL (one object per line)."""
    if not os.path.isfile(path):
        raise TrainConfigError(f"data file {path!r} does not exist (only local JSON/JSONL files are supported)")
    with open(path, encoding="utf-8") as f:
        text = f.read()
    try:
        records = json.loads(text)
    except json.JSONDecodeError:
        records = []
        for n, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise TrainConfigError(f"{path}:{n}: not JSON ({e.msg})") from None
    if not isinstance(records, list) or not all(isinstance(r, dict) for r in records):
        raise TrainConfigError(f"data file {path!r}: expected a JSON list of objects or JSONL")
    return records


def record_text(rec: dict[str, Any], template: PromptTemplate, where: str) -> tuple[str, str]:
    """(prompt, response) of any record kind."""
    if "instruction" in rec and "output" in rec:
        return template.render(rec, where)
    if "prompt" in rec and "completion" in rec:
        return str(rec["prompt"]), str(rec["completion"])
    if "text" in rec:
        return "", str(rec["text"])
    raise TrainConfigError(f"{where}: expected {{instruction, input, output}}, {{prompt, completion}} or {{text}}, "
                           f"got keys {sorted(rec)}")


def tokenize(records: Sequence[dict[str, Any]], tokenizer, template: PromptTemplate, cutoff_len: int,
             train_on_inputs: bool, source: str = "data") -> list[Example]:
    """Records -> examples, truncated to ``cutoff_len`` tokens; examples with no target left are dropped."""
    pairs = [record_text(r, template, f"{source} record {i}") for i, r in enumerate(records)]
    prompts = tokenizer([p for p, _ in pairs], add_special_tokens=True)["input_ids"] if pairs else []
    responses = tokenizer([r for _, r in pairs], add_special_tokens=False)["input_ids"] if pairs else []
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    out, dropped = [], 0
    for p, r in zip(prompts, responses):
        ids = (list(p) + list(r) + eos)[:cutoff_len]
        n_prompt = 1 if train_on_inputs else max(1, len(p))
        if len(ids) - n_prompt <= 0:
            dropped += 1
            continue
        out.append(Example(tuple(ids), n_prompt))
    if dropped:
        log.warning("%s: %d of %d examples have no target token within cutoff_len=%d and were dropped", source,
                    dropped, len(pairs), cutoff_len)
    return out


def dataset_key(cfg: AdapterConfig) -> tuple:
    """What the datasets of :func:`load_dataset` depend on (candidates of one search share them)."""
    return (cfg.data, cfg.val_data, cfg.val_split, cfg.seed, cfg.prompt_template, cfg.cutoff_len,
            cfg.train_on_inputs)


def load_dataset(cfg: AdapterConfig, tokenizer) -> tuple[list[Example], list[Example]]:
    """(train, validation) examples of an adapter; a ``val_split`` is drawn with ``random.Random(seed)``."""
    template = load_template(cfg.prompt_template)
    records = load_records(cfg.data)
    val_records: list[dict[str, Any]] = []
    if cfg.val_data:
        val_records = load_records(cfg.val_data)
    elif cfg.val_split:
        n = len(records)
        k = int(cfg.val_split) if cfg.val_split >= 1 else max(1, round(n * cfg.val_split))
        if k >= n:
            raise TrainConfigError(f"adapter {cfg.name!r}: val_split={cfg.val_split} leaves no training data "
                                   f"({n} records)")
        held = set(random.Random(cfg.seed).sample(range(n), k))
        val_records = [r for i, r in enumerate(records) if i in held]
        records = [r for i, r in enumerate(records) if i not in held]
    train = tokenize(records, tokenizer, template, cfg.cutoff_len, cfg.train_on_inputs, cfg.data)
    val = tokenize(val_records, tokenizer, template, cfg.cutoff_len, cfg.train_on_inputs,
                   cfg.val_data or f"{cfg.data} (val split)")
    if not train:
        raise TrainConfigError(f"adapter {cfg.name!r}: no usable training examples in {cfg.data!r}")
    if cfg.has_validation and not val:
        raise TrainConfigError(f"adapter {cfg.name!r}: the validation set is empty")
    return train, val


class DataStream:
    """The data order of one adapter: per epoch a shuffled permutation (a pure function of seed and epoch),
    cut into batches of ``batch_size`` and those into micro-batches of ``micro_batch_size``; an epoch's last batch
    may be smaller. Its position is all a checkpoint needs to continue the same order."""

    def __init__(self, num_examples: int, batch_size: int, micro_batch_size: int, seed: int) -> None:
        self.n, self.batch_size, self.micro_batch_size, self.seed = num_examples, batch_size, micro_batch_size, seed
        self.epoch, self.pos = 0, 0
        self._perm: tuple[int, list[int]] | None = None

    @property
    def steps_per_epoch(self) -> int:
        return -(-self.n // self.batch_size)

    def order(self, epoch: int) -> list[int]:
        if self._perm is None or self._perm[0] != epoch:
            import torch

            gen = torch.Generator().manual_seed((self.seed * 1_000_003 + epoch) % (2 ** 63))
            self._perm = (epoch, torch.randperm(self.n, generator=gen).tolist())
        return self._perm[1]

    def next_batch(self) -> list[list[int]]:
        """The micro-batches (example indices) of the next optimizer step."""
        if self.pos >= self.n:
            self.epoch, self.pos = self.epoch + 1, 0
        idx = self.order(self.epoch)[self.pos:self.pos + self.batch_size]
        self.pos += len(idx)
        return [idx[i:i + self.micro_batch_size] for i in range(0, len(idx), self.micro_batch_size)]

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "pos": self.pos}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.pos = int(state["epoch"]), int(state["pos"])
