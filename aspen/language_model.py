"""A loaded base model with its tokenizer: what :func:`aspen.load_model` returns."""
from __future__ import annotations

import os
from collections.abc import Sequence

import torch

from aspen.errors import CheckpointError
from aspen.kernels.builder import build_now, start_build
from aspen.kernels.catalog import extensions_for
from aspen.lora.op import LoraBatch
from aspen.lora.peft.reader import LoraAdapter, load_peft_adapter
from aspen.lora.pool import LoraPool, PooledAdapter, pages_needed
from aspen.model.batch import LOGITS_ALL, FlatBatch, SeqChunk
from aspen.model.config import ModelConfig
from aspen.model.decoder import DecoderModel, LoraHook
from aspen.model.gguf import is_gguf_file
from aspen.model.gguf_cache import GGUFCheckpoint
from aspen.model.kv_cache import KVCache
from aspen.model.loader import build_model
from aspen.model.quantize import check_mode, quantize_model

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def parse_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        if dtype not in DTYPES.values():
            raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype}")
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    return DTYPES[dtype]


def load_tokenizer(path: str):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path, local_files_only=True)
    except Exception as e:  # noqa: BLE001 -- transformers raises many types here; name the directory
        raise CheckpointError(f"checkpoint {path!r}: tokenizer could not be loaded ({e})") from None


class LanguageModel:
    """The frozen base model, its tokenizer and config; runs steps over a paged KV cache.

    A step is: the flat batch of the step's sequence chunks (:meth:`flat_batch`), the LoRA batch of the pooled
    adapters its chunks use (``aspen.lora.op.LoraBatch.for_step``), then the model (:meth:`step`). The serving
    engine's runner and :meth:`score` both take that path. Adapters are held by the caller (the engine's adapter
    cache, or the pool :meth:`pool_adapters` returns); the model keeps no registry of them."""

    def __init__(self, model: DecoderModel, tokenizer, path: str, dtype: torch.dtype, quantize: str,
                 device: torch.device) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.path = path
        self.dtype = dtype
        self.quantize = quantize
        self.device = device
        self.packed = False  # weights in a packed GEMM layout (inference only; see pack_for_inference)

    @property
    def config(self) -> ModelConfig:
        return self.model.config

    def pack_for_inference(self, backend: str = "auto") -> int:
        """Hold the float32 CPU projections and LM head in a packed GEMM layout (``aspen.model.packed_linear``; backend
        "auto", "mkl" or "panels"): faster decode steps, same memory; irreversible — the model can no longer be
        trained. Returns how many layers were packed (0 on other devices or dtypes, or without a backend; a
        quantized model's LM head only)."""
        if self.device.type != "cpu" or self.dtype != torch.float32:
            return 0
        from aspen.model.packed_linear import pack_model

        n = pack_model(self.model, backend)
        self.packed = self.packed or n > 0
        return n

    def build_kernels(self, packed_gemm: bool = True) -> dict[str, bool]:
        """Wait for the C++ extensions this model's paths use — the builds :func:`load_model` started, and any it
        did not (built or loaded from the build cache now, in parallel) — so that no request or training step pays
        for them. ``packed_gemm``: float32 CPU weights will be packed (:meth:`pack_for_inference`). Returns
        {extension: available}. On other devices only the adapter-loading kernels apply (adapters are validated
        on the host)."""
        return build_now(extensions_for(self.device.type, packed_gemm and self.dtype == torch.float32))

    def new_kv_cache(self, num_blocks: int, block_size: int) -> KVCache:
        return KVCache(self.config, num_blocks, block_size, dtype=self.dtype, device=self.device)

    def flat_batch(self, chunks: Sequence[SeqChunk], block_size: int) -> FlatBatch:
        """The flat batch of one step's sequence chunks, on this model's device (its sliding window applied)."""
        return FlatBatch.build(chunks, block_size, self.device, self.config.sliding_window)

    @torch.inference_mode()
    def step(self, batch: FlatBatch, kv: KVCache, lora: LoraHook | None = None) -> torch.Tensor:
        """Run one flat step; returns float32 logits for the tokens the batch's chunks asked for. ``lora``: the
        step's LoRA batch (None: base model only)."""
        return self.model(batch, kv, lora)

    def read_adapter(self, path: str, allow_pickle: bool = False) -> LoraAdapter:
        """Read and validate a PEFT adapter directory against this base."""
        return load_peft_adapter(path, self.config, allow_pickle=allow_pickle,
                                 expected_base=self.config.name_or_path)

    def pool_adapters(self, adapters: Sequence[LoraAdapter], dtype: str | torch.dtype | None = None
                      ) -> tuple[LoraPool, list[PooledAdapter]]:
        """A pool just big enough for ``adapters`` (LoraAdapter objects), each written to its own pages; the pool
        stores ``dtype`` (default: the model's)."""
        sizes = [pages_needed(a) for a in adapters]
        pool_dtype = self.dtype if dtype is None else parse_dtype(dtype)
        pool = LoraPool(self.config, max(1, sum(sizes)), dtype=pool_dtype, device=self.device)
        pooled, start = [], 0
        for a, n in zip(adapters, sizes):
            pooled.append(pool.write(a, list(range(start, start + n))))
            start += n
        return pool, pooled

    def score(self, token_ids: Sequence[int], adapter: LoraAdapter | str | None = None,
              block_size: int = 16) -> torch.Tensor:
        """Logits ``[len(token_ids), vocab]`` of one sequence, computed through the paged-KV path.

        ``adapter``: None (base), a LoraAdapter, or a PEFT adapter directory (read and validated here).
        The first half of the tokens is prefilled in two chunks, the rest decoded one token at a time; the
        block table is deliberately non-contiguous (reversed) so paging is exercised.
        """
        if isinstance(adapter, str):
            if not os.path.isdir(adapter):
                raise FileNotFoundError(f"adapter {adapter!r} is not a PEFT adapter directory")
            adapter = self.read_adapter(adapter)
        pool, pooled = self.pool_adapters([adapter]) if adapter is not None else (None, [])
        adapter_slot = 0 if pooled else -1

        ids = [int(t) for t in token_ids]
        n = len(ids)
        if n == 0:
            raise ValueError("score needs at least one token")
        if n > self.config.max_position_embeddings:
            raise ValueError(f"{n} tokens exceed max_position_embeddings={self.config.max_position_embeddings}")
        num_blocks = -(-n // block_size)
        kv = self.new_kv_cache(num_blocks, block_size)
        table = list(reversed(range(num_blocks)))
        prompt = max(1, (n + 1) // 2)
        cut = max(1, prompt // 2)
        spans = [(0, cut)] + ([(cut, prompt)] if prompt > cut else [])
        spans += [(i, i + 1) for i in range(prompt, n)]
        out = []
        for a, b in spans:
            batch = self.flat_batch([SeqChunk(ids[a:b], a, table, adapter_slot=adapter_slot, logits=LOGITS_ALL)],
                                    block_size)
            lora = LoraBatch.for_step(batch, pooled, pool, self.dtype) if pooled else None
            out.append(self.step(batch, kv, lora))
        return torch.cat(out, dim=0)


def load_model(path: str, dtype: str | torch.dtype = "float32", quantize: str | None = None,
               device: str | torch.device = "cpu", progress: bool = True) -> LanguageModel:
    """Load a local Hugging Face checkpoint directory (config.json, safetensors, tokenizer) or a GGUF file.

    A GGUF file of a supported family is converted once into a checkpoint directory under ``$ASPEN_HOME/gguf``
    (weights dequantized to ``dtype``; config and tokenizer, chat template included, from its metadata) and
    loaded from there; ``LanguageModel.path`` stays the file, which is also the base model name adapters are
    checked against. Once the source has been checked (a directory's config, a GGUF file's header), the C++
    extensions the model will use start building (or loading from the build cache) on background threads, beside
    the conversion and the weight load; :meth:`LanguageModel.build_kernels` waits for them."""
    torch_dtype = parse_dtype(dtype)
    mode = check_mode(quantize)
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' was requested but torch sees no CUDA device")
    path = os.path.abspath(os.path.expanduser(path))
    gguf = GGUFCheckpoint(path, torch_dtype, progress) if is_gguf_file(path) else None
    if gguf is not None:
        gguf.check()  # an unsupported file fails here, before any build starts
    else:
        ModelConfig.from_dir(path)  # a wrong directory fails here, before any build starts
    start_build(extensions_for(dev.type, packed_gemm=torch_dtype == torch.float32))
    checkpoint = gguf.materialize() if gguf is not None else path
    model = build_model(checkpoint, dtype=torch_dtype, device=dev, progress=progress,
                        name_or_path=path if gguf is not None else None)
    model = quantize_model(model, mode)
    tokenizer = load_tokenizer(checkpoint)
    return LanguageModel(model, tokenizer, path, torch_dtype, mode, dev)
