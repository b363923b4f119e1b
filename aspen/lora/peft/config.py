"""Parse and validate a PEFT ``adapter_config.json`` for a plain LoRA adapter on one of our base models.

The semantics follow peft 0.21 exactly:

* ``target_modules`` as a string is a regex matched with ``re.fullmatch`` against the module's full name
  (``model.layers.3.self_attn.q_proj``); as a list, a module is targeted when its name equals an entry or ends
  with ``"." + entry``; ``"all-linear"`` means every linear layer but the output head (here: the seven
  projections). ``layers_to_transform`` / ``layers_pattern`` only apply to list targets. ``exclude_modules``
  (regex or list) removes modules again.
* ``rank_pattern`` / ``alpha_pattern`` keys are regexes; the first key (in file order) for which
  ``re.match(rf"(.*\\.)?({key})$", name)`` succeeds gives that module's rank / alpha (``peft.utils.other.
  get_pattern_key``); otherwise ``r`` / ``lora_alpha`` apply. The scale is ``alpha / r``, or
  ``alpha / sqrt(r)`` with ``use_rslora``.

Options that change the adapter's math (DoRA, biases, extra trainable modules, LoRA variants, initialisations
that rewrite the base weights when PEFT loads the adapter) are refused, naming the field and the adapter path.
"""
from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from aspen.errors import AdapterError, AdapterNotFoundError
from aspen.model.config import LORA_TARGETS, ModelConfig

CONFIG_NAME = "adapter_config.json"
ATTN_PROJS = ("q_proj", "k_proj", "v_proj", "o_proj")
ALL_LINEAR = "all-linear"

# field -> what it is; any truthy value is refused (the defaults are all falsy)
REFUSED_FIELDS = {
    "use_dora": "DoRA (weight-decomposed LoRA)",
    "lora_bias": "a trainable bias on lora_B",
    "modules_to_save": "fully trained extra modules",
    "trainable_token_indices": "trainable embedding tokens",
    "layer_replication": "layer replication",
    "target_parameters": "LoRA on bare parameters",
    "use_qalora": "QA-LoRA input pooling",
    "alora_invocation_tokens": "activated LoRA (aLoRA)",
    "use_bdlora": "block-diagonal LoRA (BD-LoRA)",
    "arrow_config": "Arrow routing",
    "kasa_config": "KaSA",
    "monteclora_config": "MonteCLoRA",
}
# init_lora_weights values for which PEFT rewrites the base weights when it loads the adapter
BASE_REWRITING_INITS = ("pissa", "olora", "corda", "loftq")


def module_name(layer: int, proj: str) -> str:
    """The module's name inside a Hugging Face *ForCausalLM, as PEFT matches it."""
    block = "self_attn" if proj in ATTN_PROJS else "mlp"
    return f"model.layers.{layer}.{block}.{proj}"


def other_module_names(num_layers: int) -> list[str]:
    """Names of the modules a target regex must not reach (everything that is not one of the projections)."""
    names = ["model", "model.embed_tokens", "model.layers", "model.norm", "model.rotary_emb", "lm_head"]
    for i in range(num_layers):
        p = f"model.layers.{i}"
        names += [p, f"{p}.self_attn", f"{p}.mlp", f"{p}.input_layernorm", f"{p}.post_attention_layernorm",
                  f"{p}.mlp.act_fn", f"{p}.self_attn.q_norm", f"{p}.self_attn.k_norm"]
    return names


def pattern_key(keys: list[str], name: str) -> str | None:
    """peft's get_pattern_key: the first key matching the end of `name` at a dot boundary, or None."""
    for key in keys:
        if re.match(rf"(.*\.)?({key})$", name):
            return key
    return None


@dataclass(frozen=True)
class PeftLoraConfig:
    """The math-relevant part of an adapter_config.json, validated."""

    r: int = 8
    lora_alpha: float = 8
    use_rslora: bool = False
    rank_pattern: Mapping[str, int] = field(default_factory=dict)
    alpha_pattern: Mapping[str, float] = field(default_factory=dict)
    target_modules: str | tuple[str, ...] = ("q_proj", "v_proj")
    exclude_modules: str | tuple[str, ...] | None = None
    layers_to_transform: tuple[int, ...] | None = None
    layers_pattern: tuple[str, ...] | None = None
    fan_in_fan_out: bool = False
    base_model_name_or_path: str | None = None

    def targets(self, name: str) -> bool:
        """peft's check_target_module_exists for one module name."""
        ex = self.exclude_modules
        if ex and (re.fullmatch(ex, name) if isinstance(ex, str)
                   else name in ex or any(name.endswith(f".{e}") for e in ex)):
            return False
        tm = self.target_modules
        if isinstance(tm, str):
            return re.fullmatch(tm, name) is not None
        if name in tm:
            return True
        if not any(name.endswith(f".{t}") for t in tm):
            return False
        if self.layers_to_transform is None:
            return True
        if not self.layers_pattern:
            m = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", name)
        else:
            m = None
            for pat in self.layers_pattern:
                m = re.match(rf"(?:^|.*?\.){pat}\.(?P<idx>\d+)\.", name)
                if m:
                    break
        return m is not None and int(m.group("idx")) in self.layers_to_transform

    def rank_for(self, name: str) -> int:
        key = pattern_key(list(self.rank_pattern), name)
        return self.r if key is None else self.rank_pattern[key]

    def alpha_for(self, name: str) -> float:
        key = pattern_key(list(self.alpha_pattern), name)
        return self.lora_alpha if key is None else self.alpha_pattern[key]

    def scale_for(self, name: str, rank: int) -> float:
        alpha = self.alpha_for(name)
        return alpha / math.sqrt(rank) if self.use_rslora else alpha / rank

    def targeted(self, config: ModelConfig) -> set[tuple[int, str]]:
        """(layer, projection) pairs of the base model this config adapts."""
        return {(i, p) for i in range(config.num_hidden_layers) for p in LORA_TARGETS
                if self.targets(module_name(i, p))}


def read_adapter_config(path: str) -> dict[str, Any]:
    """Load adapter_config.json from the adapter directory `path` as a dict."""
    if not os.path.isdir(path):
        raise AdapterNotFoundError(f"adapter directory {path!r} does not exist or is not a directory")
    file = os.path.join(path, CONFIG_NAME)
    if not os.path.isfile(file):
        raise AdapterNotFoundError(f"adapter {path!r} has no {CONFIG_NAME} ({file} not found)")
    try:
        with open(file, encoding="utf-8") as f:
            raw = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise AdapterError(f"{file}: invalid JSON ({e})") from None
    except OSError as e:
        raise AdapterError(f"{file}: cannot read ({e})") from None
    if not isinstance(raw, dict):
        raise AdapterError(f"{file}: expected a JSON object, got {type(raw).__name__}")
    return raw


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v: Any) -> bool:
    return (_is_int(v) or isinstance(v, float)) and math.isfinite(v)


def _str_or_list(v: Any, what: str, err) -> str | tuple[str, ...] | None:
    if v is None or isinstance(v, str):
        return v
    if isinstance(v, list) and all(isinstance(x, str) for x in v):
        return tuple(v)
    raise err(f"{what} must be a string or a list of strings, got {v!r}")


def _check_regex(pattern: str, what: str, err) -> None:
    try:
        re.compile(pattern)
    except re.error as e:
        raise err(f"{what} {pattern!r} is not a valid regular expression ({e})") from None


def parse_lora_config(raw: dict[str, Any], path: str, config: ModelConfig) -> PeftLoraConfig:
    """Validate `raw` (adapter_config.json of the adapter at `path`) against `config`; refuse what we can't run."""

    def err(msg: str) -> AdapterError:
        return AdapterError(f"adapter {path!r}: {CONFIG_NAME}: {msg}")

    peft_type = raw.get("peft_type")
    if peft_type is None and "r" not in raw:
        raise err("no peft_type and no r: not a PEFT LoRA adapter config")
    if peft_type is not None and peft_type != "LORA":
        raise err(f"peft_type {peft_type!r} is not supported; only 'LORA' adapters can be served")
    for name, what in REFUSED_FIELDS.items():
        if raw.get(name):
            raise err(f"{name}={json.dumps(raw[name])} ({what}) is not supported; only plain LoRA is")
    bias = raw.get("bias", "none")
    if bias != "none":
        raise err(f"bias={bias!r} is not supported; only bias='none' (no trained biases)")
    init = raw.get("init_lora_weights", True)
    if isinstance(init, str) and init.lower().startswith(BASE_REWRITING_INITS):
        raise err(f"init_lora_weights={init!r} rewrites the base weights when the adapter is loaded; convert it to "
                  "a plain LoRA adapter first (save_pretrained(path_initial_model_for_weight_conversion=...))")

    r = raw.get("r", 8)
    if not _is_int(r) or r <= 0:
        raise err(f"r must be a positive integer, got {r!r}")
    alpha = raw.get("lora_alpha", 8)
    if not _is_num(alpha):
        raise err(f"lora_alpha must be a finite number, got {alpha!r}")
    rslora = raw.get("use_rslora", False)
    fan = raw.get("fan_in_fan_out", False)
    for name, v in (("use_rslora", rslora), ("fan_in_fan_out", fan)):
        if not isinstance(v, bool):
            raise err(f"{name} must be true or false, got {v!r}")

    patterns: dict[str, dict] = {}
    for name, valid, what in (("rank_pattern", lambda v: _is_int(v) and v > 0, "positive integers"),
                              ("alpha_pattern", _is_num, "finite numbers")):
        pat = raw.get(name) or {}
        if not isinstance(pat, dict):
            raise err(f"{name} must be an object, got {pat!r}")
        for k, v in pat.items():
            _check_regex(rf"(.*\.)?({k})$", f"{name} key", err)
            if not valid(v):
                raise err(f"{name}[{k!r}] must be {what}, got {v!r}")
        patterns[name] = dict(pat)

    targets = _str_or_list(raw.get("target_modules"), "target_modules", err)
    if targets is None:
        targets = ("q_proj", "v_proj")  # PEFT's default for the llama / mistral / qwen2 / qwen3 families
    elif isinstance(targets, str) and targets.lower() == ALL_LINEAR:
        targets = LORA_TARGETS
    elif isinstance(targets, str):
        _check_regex(targets, "target_modules", err)
    exclude = _str_or_list(raw.get("exclude_modules"), "exclude_modules", err)
    if isinstance(exclude, str):
        _check_regex(exclude, "exclude_modules", err)

    layers = raw.get("layers_to_transform")
    if _is_int(layers):
        layers = (layers,)
    elif isinstance(layers, list) and all(_is_int(x) for x in layers):
        layers = tuple(layers) or None  # PEFT treats [] like None
    elif layers is not None:
        raise err(f"layers_to_transform must be an integer or a list of integers, got {layers!r}")
    lp = _str_or_list(raw.get("layers_pattern"), "layers_pattern", err)
    lp = (lp,) if isinstance(lp, str) else lp

    base = raw.get("base_model_name_or_path")
    if base is not None and not isinstance(base, str):
        raise err(f"base_model_name_or_path must be a string, got {base!r}")

    cfg = PeftLoraConfig(r=r, lora_alpha=alpha, use_rslora=rslora, rank_pattern=patterns["rank_pattern"],
                         alpha_pattern=patterns["alpha_pattern"], target_modules=targets, exclude_modules=exclude,
                         layers_to_transform=layers, layers_pattern=lp or None, fan_in_fan_out=fan,
                         base_model_name_or_path=base)
    _check_targets(cfg, config, err)
    return cfg


def _check_targets(cfg: PeftLoraConfig, config: ModelConfig, err) -> None:
    """Refuse targets other than the seven projections (embed_tokens, lm_head, norms, whole blocks ...)."""
    tm = cfg.target_modules
    if isinstance(tm, str):
        hits = [n for n in other_module_names(config.num_hidden_layers) if cfg.targets(n)]
        if hits:
            raise err(f"target_modules regex {tm!r} matches {hits[0]!r}, which is not one of the projections "
                      f"{LORA_TARGETS}; only those can carry LoRA here")
    else:
        bad = [t for t in tm if t.rsplit(".", 1)[-1] not in LORA_TARGETS]
        if bad:
            raise err(f"target_modules includes {bad}, which {'is' if len(bad) == 1 else 'are'} not among the "
                      f"projections {LORA_TARGETS}; only those can carry LoRA here")
