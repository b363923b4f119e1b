"""Read LoRA adapters in the Hugging Face PEFT format, validated against our base model (writing them:
:mod:`aspen.lora.peft.writer`).

An adapter directory holds ``adapter_config.json`` (parsed by :mod:`aspen.lora.peft.config`) and
``adapter_model.safetensors`` (or, only on request, the legacy pickled ``adapter_model.bin``).

Key mapping. PEFT saves one pair of tensors per adapted projection::

    base_model.model.model.layers.{i}.self_attn.{q,k,v,o}_proj.lora_A.weight   [r, in_features]
    base_model.model.model.layers.{i}.mlp.{gate,up,down}_proj.lora_B.weight    [out_features, r]

We map each key to ``(layer i, projection, A|B)``. The ``base_model.model.`` and ``model.`` prefixes are
optional, and an adapter-name infix (``lora_A.default.weight``) is accepted. Keys of DoRA
(``lora_magnitude_vector``), embedding LoRA (``lora_embedding_A/B``), ``lora_B`` biases, ``modules_to_save`` and
trainable tokens are refused; any other key we cannot map is refused as an extra key. The delta a module adds is
``scale * B @ A`` applied to the input, i.e. ``y += scale * (x @ A.T) @ B.T``.

``fan_in_fan_out`` only describes the *base* layer's layout in PEFT (its LoRA tensors keep the shapes above, and
PEFT resets the flag to false for ``nn.Linear``). With the flag set we therefore take tensors of the standard
shapes as they are, and transpose tensors stored the other way round ([in, r] / [r, out]) back.
"""
from __future__ import annotations

import math
import os
import re
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from types import MappingProxyType

import torch

from aspen.errors import AdapterError
from aspen.kernels.adapter_kernels import all_finite
from aspen.lora.peft.config import (
    CONFIG_NAME,
    module_name,
    parse_lora_config,
    read_adapter_config,
)
from aspen.lora.tensor_file import TensorFileError, read_tensor_file
from aspen.model.config import LORA_TARGETS, ModelConfig

SAFETENSORS_NAME = "adapter_model.safetensors"
PICKLE_NAME = "adapter_model.bin"
# config fields save_peft_adapter computes itself; extra_config may not override them
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)

_KEY = re.compile(r"^(?:base_model\.model\.)?(?:model\.)?layers\.(\d+)\.(self_attn|mlp)\.([a-z_]+)"
                  r"\.(lora_A|lora_B)(?:\.([^.]+))?\.weight$")
_UNSUPPORTED_KEYS = (  # (pattern searched in the key, what it is)
    (re.compile(r"lora_magnitude_vector"), "DoRA magnitude vectors (lora_magnitude_vector)"),
    (re.compile(r"lora_embedding_"), "embedding LoRA (lora_embedding_A/B)"),
    (re.compile(r"\.lora_B(\.[^.]+)?\.bias$"), "lora_B biases (lora_bias)"),
    (re.compile(r"modules_to_save|original_module"), "modules_to_save weights"),
    (re.compile(r"trainable_tokens"), "trainable token weights"),
)


def _order(key: tuple[int, str]) -> tuple[int, int]:
    """Sort key of a (layer, projection) pair: by layer, then in the model's projection order."""
    return key[0], LORA_TARGETS.index(key[1])


@dataclass(frozen=True, eq=False)
class LoraWeights:
    """One adapted projection: ``delta(x) = scale * (x @ A.T) @ B.T``."""

    A: torch.Tensor  # [r, in_features] float32, contiguous (PEFT's lora_A.weight)
    B: torch.Tensor  # [out_features, r] float32, contiguous (PEFT's lora_B.weight)
    scale: float  # alpha / r, or alpha / sqrt(r) with use_rslora

    def __post_init__(self) -> None:
        if self.A.dim() != 2 or self.B.dim() != 2 or self.A.shape[0] != self.B.shape[1] or self.A.shape[0] == 0:
            raise ValueError(f"LoraWeights needs A [r, in] and B [out, r] with r > 0, got A "
                             f"{list(self.A.shape)} and B {list(self.B.shape)}")
        if not math.isfinite(self.scale):
            raise ValueError(f"LoraWeights scale must be finite, got {self.scale}")

    @property
    def rank(self) -> int:
        return int(self.A.shape[0])

    @property
    def nbytes(self) -> int:
        return self.A.numel() * self.A.element_size() + self.B.numel() * self.B.element_size()


@dataclass(frozen=True, eq=False)
class LoraAdapter:
    """A validated LoRA adapter: weights per (layer index, projection name)."""

    weights: Mapping[tuple[int, str], LoraWeights]
    target_modules: tuple[str, ...]  # sorted subset of LORA_TARGETS actually present
    base_model_name_or_path: str | None = None
    source: str = ""  # directory it was read from ("" if built in memory)

    def __post_init__(self) -> None:
        for layer, proj in self.weights:
            if proj not in LORA_TARGETS or layer < 0:
                raise ValueError(f"bad adapter module ({layer}, {proj!r}); projections are {LORA_TARGETS}")
        present = tuple(sorted({p for _, p in self.weights}))
        if tuple(self.target_modules) != present:
            raise ValueError(f"target_modules {self.target_modules} != projections present {present}")
        object.__setattr__(self, "weights", MappingProxyType(
            dict(sorted(self.weights.items(), key=lambda kv: _order(kv[0])))))

    @property
    def max_rank(self) -> int:
        return max((w.rank for w in self.weights.values()), default=0)

    @property
    def nbytes(self) -> int:
        return sum(w.nbytes for w in self.weights.values())

    def layers(self) -> tuple[int, ...]:
        return tuple(sorted({layer for layer, _ in self.weights}))

    def ranks(self) -> dict[tuple[int, str], int]:
        return {k: w.rank for k, w in self.weights.items()}

    def scales(self) -> dict[tuple[int, str], float]:
        return {k: w.scale for k, w in self.weights.items()}

    def get(self, layer: int, proj: str) -> LoraWeights | None:
        return self.weights.get((layer, proj))

    def __len__(self) -> int:
        return len(self.weights)


def _list_keys(keys: Iterable[str], limit: int = 6) -> str:
    keys = sorted(keys)
    more = f" ... ({len(keys) - limit} more)" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


def _read_tensors(path: str, allow_pickle: bool) -> dict[str, torch.Tensor]:
    st_file, bin_file = os.path.join(path, SAFETENSORS_NAME), os.path.join(path, PICKLE_NAME)
    if os.path.isfile(st_file):
        try:
            return read_tensor_file(st_file)  # private memory: the file may change or shrink once it is read
        except (TensorFileError, OSError) as e:  # truncated / corrupt / unreadable file
            raise AdapterError(f"cannot read safetensors file: {e}") from None
    if os.path.isfile(bin_file):
        if not allow_pickle:
            raise AdapterError(f"adapter {path!r} only has a pickled {PICKLE_NAME}; pickle adapters are refused "
                               "unless allowed (allow_pickle=True / --allow-pickle-adapters); prefer converting "
                               f"it to {SAFETENSORS_NAME}")
        try:
            with open(bin_file, "rb") as f:
                sd = torch.load(f, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 -- unpickling raises many types; name the file
            raise AdapterError(f"{bin_file}: cannot load ({type(e).__name__}: {e})") from None
        if not isinstance(sd, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                               for k, v in sd.items()):
            raise AdapterError(f"{bin_file}: expected a dict of name -> tensor")
        return sd
    raise AdapterError(f"adapter directory {path!r} has neither {SAFETENSORS_NAME} nor {PICKLE_NAME}")


def _same_base(a: str, b: str) -> bool:
    def base(s: str) -> str:
        return os.path.basename(s.rstrip("/\\"))

    return a == b or base(a) == base(b)


def _module_tensors(tensors: Mapping[str, torch.Tensor], where: str, num_layers: int
                    ) -> dict[tuple[int, str], dict[str, torch.Tensor]]:
    """Group keys into {(layer, proj): {"lora_A": t, "lora_B": t}}; refuse anything else."""
    parts: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    seen: dict[tuple[int, str, str], str] = {}
    extra: list[str] = []
    for key, t in tensors.items():
        m = _KEY.match(key)
        if m is None or m.group(3) not in LORA_TARGETS or (m.group(2) == "self_attn") != (
                m.group(3) in LORA_TARGETS[:4]):
            for pat, what in _UNSUPPORTED_KEYS:  # only keys that are not LoRA A/B weights can be these
                if pat.search(key):
                    bad = [k for k in tensors if pat.search(k)]
                    raise AdapterError(f"{where}: contains {what}, which is not supported: {_list_keys(bad)}")
            extra.append(key)
            continue
        layer, proj, kind = int(m.group(1)), m.group(3), m.group(4)
        if (layer, proj, kind) in seen:
            raise AdapterError(f"{where}: two tensors for {kind} of layers.{layer} {proj}: "
                               f"{seen[layer, proj, kind]} and {key}")
        seen[layer, proj, kind] = key
        parts.setdefault((layer, proj), {})[kind] = t
    if extra:
        raise AdapterError(f"{where}: extra keys that are not LoRA A/B weights of the projections "
                           f"{LORA_TARGETS}: {_list_keys(extra)}")
    out_of_range = sorted({layer for layer, _ in parts if layer >= num_layers})
    if out_of_range:
        raise AdapterError(f"{where}: weights for layer(s) {out_of_range}, but the base model has {num_layers} "
                           f"layers (0..{num_layers - 1})")
    lonely = [f"{module_name(*k)} has {next(iter(d))} but no {'lora_B' if 'lora_A' in d else 'lora_A'}"
              for k, d in sorted(parts.items(), key=lambda kv: _order(kv[0])) if len(d) != 2]
    if lonely:
        raise AdapterError(f"{where}: missing partner tensor: {'; '.join(lonely[:6])}")
    return parts


def _check_module(A: torch.Tensor, B: torch.Tensor, name: str, where: str, shape: tuple[int, int],
                  fan_in_fan_out: bool) -> tuple[torch.Tensor, torch.Tensor]:
    in_f, out_f = shape
    short = name.removeprefix("model.")
    for kind, t in (("lora_A", A), ("lora_B", B)):
        if t.dtype not in FLOAT_DTYPES:
            raise AdapterError(f"{where}: {kind} of {short} has dtype {t.dtype}; expected a floating-point "
                               "tensor (float32, float16 or bfloat16)")
        if t.dim() != 2:
            raise AdapterError(f"{where}: {kind} of {short} has shape {list(t.shape)}; expected a matrix")
    standard = A.shape[1] == in_f and B.shape[0] == out_f and A.shape[0] == B.shape[1]
    if not standard and fan_in_fan_out and A.shape[0] == in_f and B.shape[1] == out_f and A.shape[1] == B.shape[0]:
        A, B = A.t(), B.t()  # stored as [in, r] / [r, out]
    elif A.shape[1] != in_f:
        raise AdapterError(f"{where}: lora_A of {short} has shape {list(A.shape)}, base expects "
                           f"[{A.shape[0]}, {in_f}]")
    elif B.shape[0] != out_f:
        raise AdapterError(f"{where}: lora_B of {short} has shape {list(B.shape)}, base expects "
                           f"[{out_f}, {B.shape[1]}]")
    elif A.shape[0] != B.shape[1] or A.shape[0] == 0:
        raise AdapterError(f"{where}: lora_A of {short} has rank {A.shape[0]} but lora_B has rank {B.shape[1]}")
    return A.to(torch.float32).contiguous(), B.to(torch.float32).contiguous()


def _check_finite(weights: Mapping[tuple[int, str], LoraWeights], where: str) -> None:
    """Refuse NaN/Inf anywhere: one check over all tensors, then, only on failure, the search for the culprit."""
    if all_finite([t for w in weights.values() for t in (w.A, w.B)]):
        return
    for (layer, proj), w in sorted(weights.items(), key=lambda kv: _order(kv[0])):
        for kind, t in (("lora_A", w.A), ("lora_B", w.B)):
            if not all_finite([t]):
                raise AdapterError(f"{where}: {kind} of {module_name(layer, proj).removeprefix('model.')} contains "
                                   "NaN or Inf values")


def load_peft_adapter(path: str, config: ModelConfig, *, allow_pickle: bool = False,
                      expected_base: str | None = None) -> LoraAdapter:
    """Read and fully validate the PEFT LoRA adapter in directory `path` for the base model `config`.

    Raises AdapterNotFoundError when `path` or its adapter_config.json is missing, AdapterError for anything
    malformed, unsupported or not fitting `config`; warns (UserWarning) when `expected_base` differs from the
    base model the adapter names.
    """
    path = os.fspath(path)
    raw = read_adapter_config(path)
    cfg = parse_lora_config(raw, path, config)
    where = f"adapter {path!r}"
    base = cfg.base_model_name_or_path
    if expected_base and base and not _same_base(base, expected_base):
        warnings.warn(f"{where} was trained on base model {base!r} but is being loaded on {expected_base!r}",
                      UserWarning, stacklevel=2)
    tensors = _read_tensors(path, allow_pickle)
    parts = _module_tensors(tensors, where, config.num_hidden_layers)
    if not parts:
        raise AdapterError(f"{where}: contains no LoRA weights")
    targeted = cfg.targeted(config)
    untargeted = [module_name(*k) for k in sorted(parts, key=_order) if k not in targeted]
    if untargeted:
        raise AdapterError(f"{where}: has weights for modules that {CONFIG_NAME} does not target (target_modules="
                           f"{cfg.target_modules!r}, layers_to_transform={cfg.layers_to_transform}): "
                           f"{_list_keys(untargeted)}")
    weights: dict[tuple[int, str], LoraWeights] = {}
    for (layer, proj), d in sorted(parts.items(), key=lambda kv: _order(kv[0])):
        name = module_name(layer, proj)
        A, B = _check_module(d["lora_A"], d["lora_B"], name, where, config.module_shape(proj), cfg.fan_in_fan_out)
        rank = A.shape[0]
        if rank != cfg.rank_for(name):
            raise AdapterError(f"{where}: {name.removeprefix('model.')} has rank {rank} but {CONFIG_NAME} gives "
                               f"it r={cfg.rank_for(name)} (r / rank_pattern)")
        weights[layer, proj] = LoraWeights(A, B, cfg.scale_for(name, rank))
    _check_finite(weights, where)
    return LoraAdapter(weights=weights, target_modules=tuple(sorted({p for _, p in weights})),
                       base_model_name_or_path=base, source=path)
