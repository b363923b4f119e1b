"""The training configuration: our schema (YAML or JSON) and the mapping of the original ASPEN JSON format.

Our schema (relative paths are relative to the config file's directory)::

    base_model: path/to/checkpoint        # or --base-model
    quantize: none                        # none | int8 | nf4 | fp4
    output_dir: out                       # adapters are saved to output_dir/<name>
    max_concurrent: null                  # at most this many adapters per fused batch (the rest queue)
    adapters:
      - name: upper
        data: upper.jsonl                 # JSON or JSONL records, see aspen.train.data
        val_split: 0.1                    # or val_data: file (a fraction < 1, or a number of examples)
        r: 8                              # a list here (or in lr, alpha, ...) makes a hyperparameter search
        alpha: 16
        lr: [1e-4, 3e-4, 1e-3]
        early_stopping: {patience: 3, min_delta: 0.0, eval_every_steps: 20}
        search: {eta: 2}

Every dataclass is frozen and validated on construction; errors name the adapter and the field. Lists in a
searchable field (:data:`SEARCHABLE`) expand into the cartesian product of candidates
(:class:`AdapterSpec.candidates`), trained side by side and pruned by :mod:`aspen.train.search`.
"""
from __future__ import annotations

import dataclasses
import itertools
import json
import logging
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from aspen.errors import AspenError
from aspen.model.config import LORA_TARGETS
from aspen.model.quantize import QUANT_MODES

log = logging.getLogger(__name__)

OPTIMIZERS = ("adamw", "sgd")
SCHEDULES = ("constant", "linear", "cosine")
BUILTIN_TEMPLATES = ("alpaca",)
# fields an adapter entry may give as a list of values to search over
SEARCHABLE = ("lr", "r", "alpha", "dropout", "weight_decay", "momentum", "warmup_steps", "lr_schedule",
              "optimizer", "use_rslora")
# the original LLaMA projection names used by ASPEN configs
ASPEN_MODULES = {"w1_proj": "gate_proj", "w2_proj": "down_proj", "w3_proj": "up_proj"}
DEFAULT_PATIENCE = 3


class TrainConfigError(AspenError):
    """A training configuration is malformed; the message names the adapter and field."""


def _check(ok: bool, where: str, fld: str, want: str, got: Any) -> None:
    if not ok:
        raise TrainConfigError(f"{where}: {fld} must be {want}, got {got!r}")


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


@dataclass(frozen=True)
class EarlyStopping:
    """Stop an adapter once its validation loss has not improved by ``min_delta`` for ``patience`` evals."""

    patience: int = DEFAULT_PATIENCE
    min_delta: float = 0.0
    eval_every_steps: int = 50

    def __post_init__(self) -> None:
        _check(_is_int(self.patience) and self.patience >= 1, "early_stopping", "patience", "an int >= 1",
               self.patience)
        _check(_is_num(self.min_delta) and self.min_delta >= 0, "early_stopping", "min_delta", "a number >= 0",
               self.min_delta)
        _check(_is_int(self.eval_every_steps) and self.eval_every_steps >= 1, "early_stopping",
               "eval_every_steps", "an int >= 1", self.eval_every_steps)


@dataclass(frozen=True)
class SearchConfig:
    """Successive halving: at every ``rung_every_evals``-th eval keep the best ceil(n / eta) candidates."""

    eta: int = 2
    rung_every_evals: int = 1

    def __post_init__(self) -> None:
        _check(_is_int(self.eta) and self.eta >= 2, "search", "eta", "an int >= 2", self.eta)
        _check(_is_int(self.rung_every_evals) and self.rung_every_evals >= 1, "search", "rung_every_evals",
               "an int >= 1", self.rung_every_evals)


@dataclass(frozen=True)
class AdapterConfig:
    """One concrete adapter (or search candidate) to train. Steps are optimizer steps."""

    name: str
    data: str
    r: int = 8
    alpha: float = 16
    dropout: float = 0.05
    target_modules: tuple[str, ...] = ("q_proj", "v_proj")
    use_rslora: bool = False
    optimizer: str = "adamw"
    momentum: float = 0.0  # sgd only
    lr: float = 3e-4
    lr_schedule: str = "constant"
    warmup_steps: int = 0
    weight_decay: float = 0.0
    batch_size: int = 16
    micro_batch_size: int = 4
    num_epochs: int = 3
    max_steps: int | None = None  # overrides num_epochs when set
    cutoff_len: int = 256
    val_data: str | None = None
    val_split: float = 0.0  # a fraction in (0, 1) or a number of examples (>= 1) held out from data
    eval_batch_size: int = 16
    eval_every_steps: int | None = None  # without early stopping: evaluate this often (None: only at the end)
    prompt_template: str = "alpaca"  # "alpaca" or a template JSON file (ASPEN format)
    train_on_inputs: bool = False  # False: the loss counts only response tokens
    early_stopping: EarlyStopping | None = None
    keep_best: bool = True  # save the weights of the best validation loss (when there is validation)
    save_every_steps: int | None = None
    seed: int = 42
    output: str | None = None  # save directory, relative to output_dir (default: name)

    def __post_init__(self) -> None:
        w = f"adapter {self.name!r}"
        _check(isinstance(self.name, str) and bool(self.name) and "/" not in self.name, "adapter", "name",
               "a non-empty string without '/'", self.name)
        _check(isinstance(self.data, str) and bool(self.data), w, "data", "a file path", self.data)
        _check(_is_int(self.r) and self.r >= 1, w, "r", "an int >= 1", self.r)
        _check(_is_num(self.alpha) and self.alpha > 0, w, "alpha", "a number > 0", self.alpha)
        _check(_is_num(self.dropout) and 0 <= self.dropout < 1, w, "dropout", "in [0, 1)", self.dropout)
        mods = self.target_modules
        _check(isinstance(mods, tuple) and bool(mods) and all(m in LORA_TARGETS for m in mods)
               and len(set(mods)) == len(mods), w, "target_modules", f"distinct names among {LORA_TARGETS}", mods)
        _check(isinstance(self.use_rslora, bool), w, "use_rslora", "a bool", self.use_rslora)
        _check(self.optimizer in OPTIMIZERS, w, "optimizer", f"one of {OPTIMIZERS}", self.optimizer)
        _check(_is_num(self.momentum) and 0 <= self.momentum < 1, w, "momentum", "in [0, 1)", self.momentum)
        _check(_is_num(self.lr) and self.lr > 0, w, "lr", "a number > 0", self.lr)
        _check(self.lr_schedule in SCHEDULES, w, "lr_schedule", f"one of {SCHEDULES}", self.lr_schedule)
        for name in ("warmup_steps",):
            _check(_is_int(getattr(self, name)) and getattr(self, name) >= 0, w, name, "an int >= 0",
                   getattr(self, name))
        _check(_is_num(self.weight_decay) and self.weight_decay >= 0, w, "weight_decay", "a number >= 0",
               self.weight_decay)
        for name in ("batch_size", "micro_batch_size", "num_epochs", "cutoff_len", "eval_batch_size"):
            _check(_is_int(getattr(self, name)) and getattr(self, name) >= 1, w, name, "an int >= 1",
                   getattr(self, name))
        _check(self.batch_size % self.micro_batch_size == 0, w, "batch_size",
               f"a multiple of micro_batch_size ({self.micro_batch_size})", self.batch_size)
        for name in ("max_steps", "eval_every_steps", "save_every_steps"):
            v = getattr(self, name)
            _check(v is None or (_is_int(v) and v >= 1), w, name, "null or an int >= 1", v)
        _check(self.val_data is None or (isinstance(self.val_data, str) and bool(self.val_data)), w, "val_data",
               "null or a file path", self.val_data)
        vs = self.val_split
        _check(_is_num(vs) and vs >= 0 and (vs < 1 or float(vs).is_integer()), w, "val_split",
               "a fraction in [0, 1) or a whole number of examples", vs)
        _check(not (self.val_data and vs), w, "val_split", "0 when val_data is given", vs)
        _check(isinstance(self.prompt_template, str) and bool(self.prompt_template), w, "prompt_template",
               f"one of {BUILTIN_TEMPLATES} or a template file", self.prompt_template)
        _check(isinstance(self.train_on_inputs, bool), w, "train_on_inputs", "a bool", self.train_on_inputs)
        _check(isinstance(self.keep_best, bool), w, "keep_best", "a bool", self.keep_best)
        _check(self.early_stopping is None or self.has_validation, w, "early_stopping",
               "used with val_data or val_split (it needs a validation set)", self.early_stopping)
        _check(_is_int(self.seed), w, "seed", "an int", self.seed)
        _check(self.output is None or (isinstance(self.output, str) and bool(self.output)), w, "output",
               "null or a directory", self.output)

    @property
    def has_validation(self) -> bool:
        return bool(self.val_data) or self.val_split > 0

    @property
    def eval_interval(self) -> int | None:
        """Optimizer steps between evaluations (early stopping's interval wins), None = only at the end."""
        return self.early_stopping.eval_every_steps if self.early_stopping else self.eval_every_steps

    @property
    def scale(self) -> float:
        """The LoRA scale, computed exactly as PEFT does (alpha / r, or alpha / sqrt(r) with rsLoRA)."""
        return self.alpha / math.sqrt(self.r) if self.use_rslora else self.alpha / self.r


@dataclass(frozen=True)
class AdapterSpec:
    """One adapter entry of the config: its candidates (one unless some field lists several values)."""

    name: str
    candidates: tuple[AdapterConfig, ...]
    searched: tuple[str, ...] = ()  # the fields that were given as lists
    search: SearchConfig = field(default_factory=SearchConfig)

    def __post_init__(self) -> None:
        _check(bool(self.candidates), f"adapter {self.name!r}", "candidates", "at least one", self.candidates)
        if len(self.candidates) > 1:
            _check(self.candidates[0].has_validation, f"adapter {self.name!r}", "val_data",
                   "given (or val_split > 0): a hyperparameter search ranks candidates by validation loss",
                   self.candidates[0].val_data)

    @property
    def output(self) -> str:
        return self.candidates[0].output or self.name

    def label(self, i: int) -> str:
        """A short name of candidate i, e.g. ``upper[lr=0.001,r=8]``."""
        if len(self.candidates) == 1:
            return self.name
        c = self.candidates[i]
        return f"{self.name}[{','.join(f'{k}={getattr(c, k)}' for k in self.searched)}]"


@dataclass(frozen=True)
class TrainConfig:
    adapters: tuple[AdapterSpec, ...]
    base_model: str | None = None
    quantize: str = "none"
    output_dir: str = "adapters"
    max_concurrent: int | None = None

    def __post_init__(self) -> None:
        _check(bool(self.adapters), "config", "adapters", "a non-empty list", self.adapters)
        outs = [s.output for s in self.adapters]
        dup = sorted({o for o in outs if outs.count(o) > 1})
        _check(not dup, "config", "adapters", "entries with distinct names/outputs", dup)
        _check(self.quantize in QUANT_MODES, "config", "quantize", f"one of {QUANT_MODES}", self.quantize)
        _check(self.base_model is None or isinstance(self.base_model, str), "config", "base_model", "a path",
               self.base_model)
        _check(self.max_concurrent is None or (_is_int(self.max_concurrent) and self.max_concurrent >= 1),
               "config", "max_concurrent", "null or an int >= 1", self.max_concurrent)


def _resolve(path: str | None, base_dir: str) -> str | None:
    """A config path: absolute as is; else relative to the config's directory (or the cwd if only there)."""
    if not path or os.path.isabs(path):
        return path
    here = os.path.join(base_dir, path)
    return os.path.abspath(path) if not os.path.exists(here) and os.path.exists(path) else os.path.abspath(here)


_ADAPTER_FIELDS = {f.name for f in dataclasses.fields(AdapterConfig)}


def parse_adapter(raw: Mapping[str, Any], base_dir: str) -> AdapterSpec:
    """One adapter entry of our schema; list values of :data:`SEARCHABLE` fields make search candidates."""
    if not isinstance(raw, Mapping):
        raise TrainConfigError(f"adapters: each entry must be a mapping, got {raw!r}")
    where = f"adapter {raw.get('name')!r}"
    unknown = sorted(set(raw) - _ADAPTER_FIELDS - {"search"})
    if unknown:
        raise TrainConfigError(f"{where}: unknown field(s) {unknown}; known: {sorted(_ADAPTER_FIELDS)}")
    kw = dict(raw)
    search = kw.pop("search", None) or {}
    try:
        search_cfg = SearchConfig(**search)
        if kw.get("early_stopping") is not None:
            kw["early_stopping"] = EarlyStopping(**kw["early_stopping"])
    except (TypeError, TrainConfigError) as e:
        raise TrainConfigError(f"{where}: {e}") from None
    if isinstance(kw.get("target_modules"), (list, tuple)):
        kw["target_modules"] = tuple(kw["target_modules"])
    for key in ("data", "val_data"):
        kw[key] = _resolve(kw.get(key), base_dir)
    tpl = kw.get("prompt_template")
    if isinstance(tpl, str) and tpl not in BUILTIN_TEMPLATES:
        kw["prompt_template"] = _resolve(tpl, base_dir)
    bad = sorted(k for k, v in kw.items() if isinstance(v, list) and k not in SEARCHABLE)
    if bad:
        raise TrainConfigError(f"{where}: {bad} may not be lists; only {SEARCHABLE} can be searched")
    searched = tuple(k for k in SEARCHABLE if isinstance(kw.get(k), list))
    for k in searched:
        _check(len(kw[k]) >= 1 and len(set(map(repr, kw[k]))) == len(kw[k]), where, k,
               "a non-empty list of distinct values", kw[k])
    combos = itertools.product(*(kw[k] for k in searched))
    candidates = tuple(AdapterConfig(**{**kw, **dict(zip(searched, combo))}) for combo in combos)
    return AdapterSpec(name=candidates[0].name, candidates=candidates, searched=searched, search=search_cfg)


def parse_config(raw: Mapping[str, Any], base_dir: str = ".") -> TrainConfig:
    """Our schema, as a parsed YAML/JSON mapping."""
    if not isinstance(raw, Mapping):
        raise TrainConfigError(f"config must be a mapping, got {type(raw).__name__}")
    known = {"base_model", "quantize", "output_dir", "max_concurrent", "adapters"}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise TrainConfigError(f"config: unknown field(s) {unknown}; known: {sorted(known)}")
    entries = raw.get("adapters")
    if not isinstance(entries, list) or not entries:
        raise TrainConfigError(f"config: adapters must be a non-empty list, got {entries!r}")
    return TrainConfig(
        adapters=tuple(parse_adapter(e, base_dir) for e in entries),
        base_model=_resolve(raw.get("base_model"), base_dir), quantize=raw.get("quantize") or "none",
        output_dir=_resolve(raw.get("output_dir"), base_dir) or os.path.abspath(os.path.join(base_dir, "adapters")),
        max_concurrent=raw.get("max_concurrent"))


# ASPEN field -> (our field, how to convert); None = reported as not honoured
_ASPEN_LORA = {
    "name": "name", "output": "output", "optim": "optimizer", "lr": "lr", "momentum": "momentum",
    "batch_size": "batch_size", "micro_batch_size": "micro_batch_size", "test_batch_size": "eval_batch_size",
    "num_epochs": "num_epochs", "r": "r", "alpha": "alpha", "dropout": "dropout", "data": "data",
    "test_data": "val_data", "prompt": "prompt_template", "target_modules": "target_modules",
}
_NO_PADDING = "has no effect: batches are packed flat, without padding"
_ASPEN_NOT_HONOURED = {
    "group_by_length": "length grouping is not implemented (flat batches have no padding to save)",
    "expand_side": _NO_PADDING, "expand_right": _NO_PADDING, "pad_token_id": _NO_PADDING,
    "train_lora_candidate_num": "no equivalent: give a list of values (e.g. lr: [...]) for a hyperparameter search",
    "train_strategy": "not supported: all adapters train together in fused batches",
}


def from_aspen(raw: Mapping[str, Any], base_dir: str = ".") -> tuple[TrainConfig, list[str]]:
    """Map an original ASPEN JSON config onto ours; returns the config and the fields we cannot honour."""
    unsupported: list[str] = []
    loras = raw.get("lora")
    if not isinstance(loras, list) or not loras:
        raise TrainConfigError(f"ASPEN config: lora must be a non-empty list, got {loras!r}")
    top_known = {"lora", "cutoff_len", "save_step", "early_stop_test_step", "train_lora_simultaneously_num"}
    for k in raw:
        if k in _ASPEN_NOT_HONOURED:
            unsupported.append(f"{k}: {_ASPEN_NOT_HONOURED[k]}")
        elif k not in top_known:
            unsupported.append(f"{k}: unknown ASPEN field, ignored")
    specs = []
    for i, lora in enumerate(loras):
        if not isinstance(lora, Mapping):
            raise TrainConfigError(f"ASPEN config: lora[{i}] must be a mapping")
        name = lora.get("name", f"lora_{i}")
        ours: dict[str, Any] = {"name": name}
        if "cutoff_len" in raw:
            ours["cutoff_len"] = raw["cutoff_len"]
        if raw.get("save_step"):
            ours["save_every_steps"] = raw["save_step"]
        for k, v in lora.items():
            if k in _ASPEN_LORA:
                ours[_ASPEN_LORA[k]] = v
            elif k in _ASPEN_NOT_HONOURED:
                if not (k == "group_by_length" and not v):
                    unsupported.append(f"lora {name!r} {k}: {_ASPEN_NOT_HONOURED[k]}")
            else:
                unsupported.append(f"lora {name!r} {k}: unknown ASPEN field, ignored")
        tm = ours.get("target_modules")
        if isinstance(tm, Mapping):
            ours["target_modules"] = [ASPEN_MODULES.get(m, m) for m, on in tm.items() if on]
        if isinstance(ours.get("optimizer"), str):
            ours["optimizer"] = ours["optimizer"].lower()
        if raw.get("early_stop_test_step"):
            if ours.get("val_data"):
                ours["early_stopping"] = {"eval_every_steps": raw["early_stop_test_step"]}
                log.info("lora %r: early_stop_test_step=%s -> early stopping with patience %d (default)", name,
                         raw["early_stop_test_step"], DEFAULT_PATIENCE)
            else:
                unsupported.append(f"lora {name!r}: early_stop_test_step needs test_data; no early stopping")
        specs.append(ours)
    cfg = parse_config({"adapters": specs, "max_concurrent": raw.get("train_lora_simultaneously_num")}, base_dir)
    return cfg, unsupported


def load_config(path: str) -> tuple[TrainConfig, list[str]]:
    """Read a YAML or JSON config (ours, or the ASPEN format with a top-level ``lora`` list).

    Returns the config and the fields that cannot be honoured (also logged as one warning).
    """
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as e:
        raise TrainConfigError(f"config {path!r}: cannot read ({e.strerror})") from None
    try:
        if path.endswith((".yaml", ".yml")):
            import yaml

            raw = yaml.safe_load(text)
        else:
            raw = json.loads(text)
    except Exception as e:  # noqa: BLE001 -- yaml and json raise different types; name the file
        raise TrainConfigError(f"config {path!r}: cannot parse ({e})") from None
    base_dir = os.path.dirname(os.path.abspath(path))
    if isinstance(raw, Mapping) and "lora" in raw and "adapters" not in raw:
        cfg, unsupported = from_aspen(raw, base_dir)
        if unsupported:
            log.warning("ASPEN config %s: fields not honoured:\n  %s", path, "\n  ".join(unsupported))
        return cfg, unsupported
    return parse_config(raw, base_dir), []
