"""A GGUF file as a model source: its header, checked against what we run, and its conversion to a Hugging Face
checkpoint directory.

The header is read with the ``gguf`` package's reader; the conversion is transformers' GGUF support
(``from_pretrained(directory, gguf_file=...)`` for the config, the tokenizer with its chat template, and the
weights, which the ``gguf`` package dequantizes). Nothing here parses the format by hand. Where the converted
copies are kept is :mod:`aspen.model.gguf_cache`.
"""
from __future__ import annotations

import functools
import logging
import os
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from aspen.errors import CheckpointError

if TYPE_CHECKING:
    import torch

log = logging.getLogger("aspen.model")

MAGIC = b"GGUF"
#: ``general.architecture`` values we convert and run (llama.cpp writes Mistral models as "llama", or "mistral").
SUPPORTED_ARCHITECTURES = ("llama", "mistral", "qwen2", "qwen3")
#: What the conversion writes besides the tokenizer's files.
CONFIG_FILE, WEIGHTS_FILE = "config.json", "model.safetensors"


def is_gguf_file(path: str) -> bool:
    """True when ``path`` is a regular file that starts with the GGUF magic bytes."""
    if not os.path.isfile(path):
        return False
    with open(path, "rb") as f:
        return f.read(len(MAGIC)) == MAGIC


@functools.cache
def dequantizable_types() -> tuple[str, ...]:
    """The GGML tensor types the installed ``gguf`` package dequantizes (found by asking it to dequantize one
    block of each type)."""
    import numpy as np
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, dequantize

    names = []
    for qtype in GGMLQuantizationType:
        if qtype not in GGML_QUANT_SIZES:
            continue
        _, type_size = GGML_QUANT_SIZES[qtype]
        try:
            dequantize(np.zeros((1, type_size), dtype=np.uint8), qtype)
        except NotImplementedError:
            continue
        names.append(qtype.name)
    return tuple(names)


@dataclass(frozen=True)
class GGUFHeader:
    """What the header of a GGUF file says that decides whether we can run it."""

    path: str
    architecture: str
    name: str
    tensor_types: dict[str, list[str]]  # GGML type name -> names of the tensors stored in it
    expert_count: int
    rope_scaling: str  # the ``<arch>.rope.scaling.type`` value; "" where the file has none

    @property
    def num_tensors(self) -> int:
        return sum(len(names) for names in self.tensor_types.values())

    def describe(self) -> str:
        """e.g. ``llama, 272 tensors: 210 Q4_1, 61 F32, 1 Q8_0``"""
        counts = sorted(((len(v), k) for k, v in self.tensor_types.items()), reverse=True)
        return f"{self.architecture}, {self.num_tensors} tensors: " + ", ".join(f"{n} {k}" for n, k in counts)

    @classmethod
    def read(cls, path: str) -> GGUFHeader:
        from gguf import GGUFReader

        try:
            reader = GGUFReader(path, "r")
        except Exception as e:  # noqa: BLE001 -- the reader raises ValueError, OSError, struct and numpy errors
            raise CheckpointError(f"{path}: not a readable GGUF file ({type(e).__name__}: {e})") from None
        arch = _field(reader, "general.architecture")
        if not isinstance(arch, str):
            raise CheckpointError(f"{path}: GGUF file has no general.architecture")
        types: dict[str, list[str]] = {}
        for tensor in reader.tensors:
            types.setdefault(tensor.tensor_type.name, []).append(tensor.name)
        header = cls(path=path, architecture=arch, name=str(_field(reader, "general.name") or ""),
                     tensor_types=types, expert_count=int(_field(reader, f"{arch}.expert_count") or 0),
                     rope_scaling=str(_field(reader, f"{arch}.rope.scaling.type") or ""))
        del reader  # closes the memory map
        return header

    def check_supported(self) -> None:
        """Raise :class:`CheckpointError` naming what this file has that we do not run: its architecture, tensor
        types that cannot be dequantized, mixture-of-experts layers, or rope scaling the conversion drops."""
        where = f"GGUF file {self.path!r}"
        if self.architecture not in SUPPORTED_ARCHITECTURES:
            raise CheckpointError(
                f"{where} has architecture {self.architecture!r}; supported GGUF architectures: "
                f"{', '.join(SUPPORTED_ARCHITECTURES)} (the Llama, Mistral, Qwen2 and Qwen3 families)")
        supported = dequantizable_types()
        bad = {t: names for t, names in self.tensor_types.items() if t not in supported}
        if bad:
            listed = "; ".join(f"{t} ({len(names)} tensors, e.g. {names[0]!r})" for t, names in sorted(bad.items()))
            raise CheckpointError(
                f"{where} stores tensors in types the gguf package cannot dequantize: {listed}; supported tensor "
                f"types: {', '.join(supported)}")
        if self.expert_count > 0:
            raise CheckpointError(
                f"{where} is a mixture-of-experts model ({self.architecture}.expert_count={self.expert_count}); "
                "supported: dense Llama, Mistral, Qwen2 and Qwen3 models")
        freqs = [n for names in self.tensor_types.values() for n in names if n.startswith("rope_freqs")]
        if freqs or self.rope_scaling not in ("", "none"):
            what = f"rope scaling type {self.rope_scaling!r}" if self.rope_scaling not in ("", "none") else \
                f"rope frequency factors ({freqs[0]!r}, Llama 3.1-style rope scaling)"
            raise CheckpointError(
                f"{where} uses {what}, which the GGUF conversion does not carry over; supported: GGUF files "
                "without rope scaling (convert the original Hugging Face checkpoint instead)")


def _field(reader, key: str):
    """A scalar or string metadata value of the file; None where absent or an array."""
    from gguf import GGUFValueType

    field = reader.fields.get(key)
    if field is None or not field.types or field.types[0] == GGUFValueType.ARRAY:
        return None
    part = field.parts[field.data[0]]
    if field.types[0] == GGUFValueType.STRING:
        return bytes(part).decode("utf-8", errors="replace")
    return part[0].item()


def convert(header: GGUFHeader, out_dir: str, dtype: torch.dtype, progress: bool = True) -> dict:
    """Write the checkpoint directory of a supported GGUF file into the existing, empty ``out_dir``: config.json,
    model.safetensors (weights dequantized to ``dtype``; a tied LM head is not stored) and the tokenizer's files
    (with the chat template the file carries). Returns a record of what was converted, and how."""
    import transformers
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    directory, name = os.path.split(header.path)
    bars = hf_logging.is_progress_bar_enabled()
    if not progress:
        hf_logging.disable_progress_bar()
    start = time.monotonic()
    try:
        tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=name)  # a local directory: no download
        model = AutoModelForCausalLM.from_pretrained(directory, gguf_file=name, dtype=dtype)
    except Exception as e:  # noqa: BLE001 -- transformers raises many types here; name the file and the cause
        raise CheckpointError(
            f"GGUF file {header.path!r} could not be converted by transformers ({type(e).__name__}: {e})") from None
    finally:
        if bars and not progress:
            hf_logging.enable_progress_bar()
    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # the saved weights are plain tensors, not GGUF blocks
    config.architectures = [type(model).__name__]
    config.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    if config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    save_file(state, os.path.join(out_dir, WEIGHTS_FILE), metadata={"format": "pt"})
    return {"source": header.path, "architecture": header.architecture, "name": header.name,
            "tensor_types": {t: len(v) for t, v in header.tensor_types.items()}, "dtype": str(dtype).rsplit(".", 1)[-1],
            "transformers": transformers.__version__, "seconds": round(time.monotonic() - start, 1)}
