"""Engine configuration: one frozen dataclass whose fields carry their own contract.

Each field's metadata holds a :class:`Setting`: help text, command-line flag, unit on the command line, lower
bound, allowed values. :func:`check_settings` validates any dataclass made of such fields by that one contract,
and :mod:`engine.server.flags` turns the same metadata into ``aspen serve`` flags, so a field, its check and its
flag cannot drift apart.
"""
from __future__ import annotations

import dataclasses
import functools
import types
import typing
from dataclasses import dataclass

from engine.scheduling.types import SchedulerConfig

MiB = 1 << 20
#: Units a flag may take instead of the field's own (``unit="MiB"``: the flag is in MiB, the field in bytes).
UNITS = {"MiB": MiB}
ADAPTER_DTYPES = ("auto", "float32", "float16", "bfloat16")


@dataclass(frozen=True)
class Setting:
    """The contract of one configuration field, kept in the field's ``metadata["setting"]``.

    ``flag``: the command-line flag; None derives it from the field name (``max_num_seqs`` -> ``--max-num-seqs``;
    a bool that defaults to True gets ``--no-...``). ``unit``: a key of :data:`UNITS` the flag is given in.
    ``minimum``: the lowest value a number may take. ``choices``: the values a string may take. ``group``: the
    ``--help`` section (None: the section of the enclosing field). ``cli``: False for fields set by code only.
    """

    help: str
    flag: str | None = None
    unit: str | None = None
    minimum: int | float | None = None
    choices: tuple[str, ...] = ()
    group: str | None = None
    cli: bool = True


def setting(default, *, help: str, repr: bool = True, **contract) -> typing.Any:
    """A dataclass field with an immutable default and its :class:`Setting` (``contract``: the Setting's other
    fields)."""
    return dataclasses.field(default=default, repr=repr, metadata={"setting": Setting(help=help, **contract)})


def setting_of(f: dataclasses.Field) -> Setting:
    """The :class:`Setting` of a field (an empty one for a field declared without :func:`setting`)."""
    return f.metadata.get("setting") or Setting(help="")


@functools.cache
def field_types(cls: type) -> dict[str, tuple[type, bool]]:
    """Per field of the dataclass ``cls``: (its type without None, whether None is allowed)."""
    out = {}
    for name, hint in typing.get_type_hints(cls).items():
        args = typing.get_args(hint) if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union \
            else (hint,)
        kinds = [a for a in args if a is not type(None)]
        if len(kinds) != 1:
            raise TypeError(f"{cls.__name__}.{name}: a setting has one type (optionally | None), got {hint}")
        out[name] = (kinds[0], len(kinds) < len(args))
    return out


def check_settings(obj) -> None:
    """Validate every field of the dataclass ``obj`` against its type and :class:`Setting`.

    Raises TypeError for a value of the wrong type and ValueError for one out of range or not among the
    choices; the message names the field, what was expected and the value given."""
    kinds = field_types(type(obj))
    for f in dataclasses.fields(obj):
        kind, optional = kinds[f.name]
        value, s = getattr(obj, f.name), setting_of(f)
        if value is None and optional:
            continue
        name = f"{type(obj).__name__}.{f.name}"
        expected = _expected(kind, s)
        if optional:
            expected = f"None or {expected}"
        if not _has_type(value, kind):
            raise TypeError(f"{name} must be {expected}, got {value!r}")
        if s.minimum is not None and value < s.minimum or s.choices and value not in s.choices:
            raise ValueError(f"{name} must be {expected}, got {value!r}")


def _has_type(value, kind: type) -> bool:
    if kind is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, kind)


def _expected(kind: type, s: Setting) -> str:
    if s.choices:
        return f"one of {', '.join(s.choices)}"
    noun = {bool: "a bool", int: "an int", float: "a number", str: "a string"}.get(kind, f"a {kind.__name__}")
    return noun if s.minimum is None else f"{noun} >= {s.minimum}"


@dataclass(frozen=True)
class EngineConfig:
    """What one :class:`~engine.llm_engine.LLMEngine` is configured with; each field's contract is its
    :class:`Setting`, checked on construction."""

    block_size: int = setting(16, help="tokens per KV block", minimum=1)
    # 0.5 of the memory left after loading the model: on a 24 GiB CPU machine the 125M Llama shape then gets
    # 64 rank-16 all-projection adapters in the device pool and over 100k tokens of KV at a 2048-token context;
    # the other half stays for activations, the tokenizer, the page cache and other processes
    memory_utilization: float = setting(0.5, help="share of the memory available once the model is loaded (free "
                                                  "GPU memory on CUDA) that the KV pool, the device adapter pool "
                                                  "and the host adapter tier may take together; explicit sizes "
                                                  "win (split rule: engine.capacity)", minimum=0.0001)
    kv_cache_bytes: int | None = setting(None, help="KV cache size (default: derived from "
                                                    "--memory-utilization; used unless num_kv_blocks is set)",
                                         flag="--kv-cache-mb", unit="MiB", minimum=1)
    num_kv_blocks: int | None = setting(None, help="KV cache size in blocks (overrides --kv-cache-mb)", minimum=1)
    max_num_seqs: int = setting(64, help="sequences per step", minimum=1)
    max_num_batched_tokens: int = setting(2048, help="tokens per step (prefill chunks + decodes)", minimum=1)
    max_model_len: int | None = setting(None, help="context length cap (default: the model's "
                                                   "max_position_embeddings)", minimum=1)
    enable_prefix_caching: bool = setting(True, help="prefix caching (requests share the KV blocks of a common "
                                                     "prompt prefix)", flag="--no-prefix-caching")
    chunked_prefill: bool = setting(True, help="chunked prefill (a long prompt is prefilled over several steps, "
                                               "batched with decodes)")
    lora_pool_bytes: int | None = setting(None, help="device pool for resident adapters (default: derived from "
                                                     "--memory-utilization; used unless lora_pool_pages is set)",
                                          flag="--lora-pool-mb", unit="MiB", minimum=1)
    lora_pool_pages: int | None = setting(None, help="device adapter pool in pages (overrides --lora-pool-mb)",
                                          minimum=1)
    host_adapter_bytes: int | None = setting(None, help="host-memory tier of the adapter cache (default: "
                                                        "derived from --memory-utilization; resident memory: "
                                                        "adapters are read into private buffers, not mapped)",
                                             flag="--host-adapter-mb", unit="MiB", minimum=1)
    max_waiting: int = setting(0, help="waiting-queue cap; beyond it a request is refused (QueueFullError; the "
                                       "server answers RESOURCE_EXHAUSTED); 0 = unbounded", flag="--max-queue",
                               minimum=0)
    max_head_skips: int = setting(32, help="fairness: how often later requests may pass a waiting head request "
                                             "(0: strict first come, first served)", minimum=0)
    allow_pickle_adapters: bool = setting(False, help="reading legacy pickled adapter_model.bin files (with "
                                                      "torch.load(weights_only=True)); otherwise only safetensors "
                                                      "adapters are read")
    # float16/bfloat16 halve what a decode step with many distinct adapters reads; the LoRA math stays in the
    # model's dtype, only the stored weights are rounded
    adapter_dtype: str = setting("auto", help="storage dtype of the device adapter pool (auto: the model's; 16 "
                                              "bits halve the memory traffic of many-adapter decode steps, "
                                              "rounding the adapter weights)", choices=ADAPTER_DTYPES)
    seed: int | None = setting(None, help="seed of the sampler's shared generator (for unseeded requests)")
    # float32 on the CPU: the weights are held in a packed GEMM layout (aspen.model.packed_linear: AVX-512 panels
    # where built, else MKL's): faster projections at decode batch sizes, same memory; no effect on other devices
    # or dtypes (quantized models: the float32 LM head only)
    packed_gemm: bool = setting(True, help="packed GEMM layout of float32 CPU weights (AVX-512 panels or MKL's "
                                           "packed GEMM: faster decode steps, same memory)")

    grammar_compile_timeout_s: float = setting(5.0, help="seconds a request's response_format may take to compile; "
                                                         "a slower one is refused (INVALID_ARGUMENT)",
                                               flag="--grammar-compile-timeout", minimum=0.01)
    grammar_cache_size: int = setting(256, help="compiled response formats kept (LRU, by content)", minimum=1)

    def __post_init__(self) -> None:
        check_settings(self)
        if self.memory_utilization > 1:
            raise ValueError(f"EngineConfig.memory_utilization must be a number in (0, 1], got "
                             f"{self.memory_utilization!r}")

    def scheduler_config(self, max_model_len: int) -> SchedulerConfig:
        """The scheduler's view of this config: every field the two share, by name, plus ``max_model_len``, the
        context the engine settled on (this config's cap or the model's)."""
        shared = {f.name: getattr(self, f.name) for f in dataclasses.fields(SchedulerConfig)
                  if f.name != "max_model_len"}
        return SchedulerConfig(**shared, max_model_len=max_model_len)
