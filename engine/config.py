"""Engine configuration: one frozen dataclass, validated on construction."""
from __future__ import annotations

from dataclasses import dataclass

MiB = 1 << 20
ADAPTER_DTYPES = ("auto", "float32", "float16", "bfloat16")


@dataclass(frozen=True)
class EngineConfig:
    block_size: int = 16  # tokens per KV block
    kv_cache_bytes: int = 256 * MiB  # KV pool size, used when num_kv_blocks is None
    num_kv_blocks: int | None = None
    max_num_seqs: int = 64  # sequences per step
    max_num_batched_tokens: int = 2048  # tokens per step (prefill chunks + decodes)
    max_model_len: int | None = None  # None: the model's max_position_embeddings
    enable_prefix_caching: bool = True
    chunked_prefill: bool = True
    lora_pool_bytes: int = 256 * MiB  # device pool for resident adapters, used when lora_pool_pages is None
    lora_pool_pages: int | None = None
    host_adapter_bytes: int = 2048 * MiB  # host-memory tier of the adapter cache (resident: private copies)
    max_waiting: int = 0  # waiting-queue cap (0 = unbounded); beyond it add_request raises QueueFullError
    max_head_skips: int = 32  # fairness: how often later requests may pass a waiting head request
    allow_pickle_adapters: bool = False  # legacy adapter_model.bin (read with weights_only=True)
    # storage dtype of the device adapter pool: "auto" = the model's; float16/bfloat16 halve what a decode step
    # with many distinct adapters reads (the LoRA math stays in the model's dtype; the weights are rounded)
    adapter_dtype: str = "auto"
    seed: int | None = None  # seed of the sampler's shared generator (unseeded requests)
    # float32 on the CPU: hold the weights in a packed GEMM layout (aspen.model.packed_linear: our AVX-512 panels where
    # built, else MKL's), ~25% faster projections at decode batch sizes, same memory; no effect on other devices
    # or dtypes (quantized models: the float32 LM head only)
    packed_gemm: bool = True

    def __post_init__(self) -> None:
        positive = ["block_size", "kv_cache_bytes", "max_num_seqs", "max_num_batched_tokens", "lora_pool_bytes",
                    "host_adapter_bytes", "max_head_skips"]
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"EngineConfig.{name} must be a positive int, got {value!r}")
        for name in ("num_kv_blocks", "max_model_len", "lora_pool_pages"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value <= 0):
                raise ValueError(f"EngineConfig.{name} must be None or a positive int, got {value!r}")
        if self.adapter_dtype not in ADAPTER_DTYPES:
            raise ValueError(f"EngineConfig.adapter_dtype must be one of {', '.join(ADAPTER_DTYPES)}, "
                             f"got {self.adapter_dtype!r}")
        if not isinstance(self.packed_gemm, bool):
            raise TypeError(f"EngineConfig.packed_gemm must be a bool, got {self.packed_gemm!r}")
        if not isinstance(self.max_waiting, int) or self.max_waiting < 0:
            raise ValueError(f"EngineConfig.max_waiting must be an int >= 0, got {self.max_waiting!r}")

    def scheduler_config(self, max_model_len: int):
        """The scheduler's view of this config (an ``engine.scheduling.types.SchedulerConfig``): every field the
        two share, by name, plus ``max_model_len``, the context the engine settled on (this config's cap or the
        model's)."""
        from dataclasses import fields

        from engine.scheduling.types import SchedulerConfig

        shared = {f.name: getattr(self, f.name) for f in fields(SchedulerConfig) if f.name != "max_model_len"}
        return SchedulerConfig(**shared, max_model_len=max_model_len)
