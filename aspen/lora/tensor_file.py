"""Read a safetensors file into private memory: one read of the file, every tensor a view of that copy.

The layout (Hugging Face's safetensors): an 8-byte little-endian header length ``N``, ``N`` bytes of a JSON
object ``{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {str: str}}``, then the data
section, which the tensors' byte ranges (relative to its start) tile exactly, with no gap and no overlap.

Why not ``safetensors.torch.load_file``: it maps the file, and its tensors stay views of the mapping. An adapter
held in the cache's host tier would then read the file again whenever it is moved to the device; if the file is
rewritten in place meanwhile, the server would use weights it never validated, and if it is truncated, the first
read past the new end kills the process with SIGBUS. ``safetensors.torch.load(bytes)`` copies, but tensor by
tensor, several times slower than the one copy here (most of which is the copy out of the page cache, which a
large file does on two cores: :func:`_read_all`). The copy costs more the first time a process touches that
much memory (page faults of fresh memory); freed buffers are reused by the allocator, so an adapter cache whose
host tier is full, and evicts, does not pay it again. Every number in the header is checked before it is used;
a file that fails a check raises :class:`TensorFileError` naming the file and the problem.
"""
from __future__ import annotations

import json
import math
import os
import struct
import threading
from concurrent.futures import ThreadPoolExecutor

import torch

MAX_HEADER_BYTES = 100 << 20  # the limit safetensors itself applies

DTYPES = {
    "BOOL": torch.bool, "U8": torch.uint8, "I8": torch.int8, "I16": torch.int16, "U16": torch.uint16,
    "I32": torch.int32, "U32": torch.uint32, "I64": torch.int64, "U64": torch.uint64,
    "F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32, "F64": torch.float64,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}


class TensorFileError(ValueError):
    """A safetensors file that cannot be read: truncated, malformed header, inconsistent byte ranges."""


def _entries(header: dict, path: str) -> list[tuple[int, int, str, torch.dtype, list[int]]]:
    """(begin, end, name, dtype, shape) of every tensor, checked against its own dtype and shape."""
    out = []
    for name, spec in header.items():
        if name == "__metadata__":
            if not isinstance(spec, dict) or not all(isinstance(v, str) for v in spec.values()):
                raise TensorFileError(f"{path}: __metadata__ must map strings to strings")
            continue
        if not isinstance(spec, dict) or set(spec) != {"dtype", "shape", "data_offsets"}:
            raise TensorFileError(f"{path}: tensor {name!r} must have exactly dtype, shape and data_offsets; got "
                                  f"{sorted(spec) if isinstance(spec, dict) else type(spec).__name__}")
        dtype = DTYPES.get(spec["dtype"]) if isinstance(spec["dtype"], str) else None
        if dtype is None:
            raise TensorFileError(f"{path}: tensor {name!r} has dtype {spec['dtype']!r}; expected one of "
                                  f"{', '.join(DTYPES)}")
        shape, offsets = spec["shape"], spec["data_offsets"]
        if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
            raise TensorFileError(f"{path}: tensor {name!r} has shape {shape!r}; expected a list of sizes >= 0")
        if (not isinstance(offsets, list) or len(offsets) != 2 or not all(type(o) is int for o in offsets)
                or not 0 <= offsets[0] <= offsets[1]):
            raise TensorFileError(f"{path}: tensor {name!r} has data_offsets {offsets!r}; expected [begin, end] "
                                  "with 0 <= begin <= end")
        nbytes = math.prod(shape) * dtype.itemsize
        if offsets[1] - offsets[0] != nbytes:
            raise TensorFileError(f"{path}: tensor {name!r} spans {offsets[1] - offsets[0]} bytes, but dtype "
                                  f"{spec['dtype']} and shape {shape} need {nbytes}")
        out.append((offsets[0], offsets[1], name, dtype, shape))
    return sorted(out, key=lambda e: (e[0], e[1]))


def _views(buf: torch.Tensor, base: int, entries: list[tuple[int, int, str, torch.dtype, list[int]]]
           ) -> dict[str, torch.Tensor]:
    """Tensor views of ``buf``, whose data section starts at byte ``base``."""
    dtypes = {dtype for *_, dtype, _ in entries}
    if len(dtypes) == 1 and entries and base % (size := next(iter(dtypes)).itemsize) == 0:
        # one dtype, aligned (an adapter): the data section split into every tensor by one call, then shaped
        (dtype,) = dtypes
        flat = buf[base:base + entries[-1][1]].view(dtype)
        pieces = flat.split([(end - begin) // size for begin, end, *_ in entries])
        return {name: piece.view(shape) for piece, (_, _, name, _, shape) in zip(pieces, entries)}
    typed: dict[torch.dtype, torch.Tensor] = {}  # the whole buffer seen as each dtype: two torch calls per tensor
    out = {}
    for begin, end, name, dtype, shape in entries:
        begin, end, size = begin + base, end + base, dtype.itemsize
        if begin % size:  # a writer that does not align: copy this one tensor to aligned memory
            out[name] = buf[begin:end].clone().view(dtype).view(shape)
            continue
        if dtype not in typed:
            typed[dtype] = buf[:buf.numel() - buf.numel() % size].view(dtype)
        out[name] = typed[dtype][begin // size:end // size].view(shape)
    return out


SPLIT_BYTES = 4 << 20  # files at least this large are read as two halves at once
_helper: ThreadPoolExecutor | None = None
_helper_lock = threading.Lock()


def _read_range(fd: int, view: memoryview, begin: int, end: int, path: str) -> None:
    """Bytes ``[begin, end)`` of the file into ``view[begin:end]`` (``preadv`` may return short counts)."""
    done = begin
    while done < end:
        got = os.preadv(fd, [view[done:end]], done)
        if not got:
            raise TensorFileError(f"{path}: the file ended after {done} of {len(view)} bytes while reading it")
        done += got


def _read_all(path: str) -> torch.Tensor:
    """The whole file, read from its start: reading the header first and the rest after it would make the
    kernel's read-ahead ramp up from its small-read window, slowing a cold read by about half.

    A large file is read as two halves at once, the second on a helper thread (``preadv`` releases the GIL): the
    copy out of the page cache, and the page faults of a fresh buffer, then run on two cores."""
    global _helper
    fd = os.open(path, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        buf = torch.empty(size, dtype=torch.uint8)
        view = memoryview(buf.numpy())
        if size < SPLIT_BYTES:
            _read_range(fd, view, 0, size, path)
        else:
            with _helper_lock:
                if _helper is None:
                    _helper = ThreadPoolExecutor(max_workers=1, thread_name_prefix="aspen-read")
            half = size // 2 & ~4095
            second = _helper.submit(_read_range, fd, view, half, size, path)
            try:
                _read_range(fd, view, 0, half, path)
            finally:
                second.result()  # wait for it even when the first half failed: fd and buf are still in use
    finally:
        os.close(fd)
    return buf


def read_tensor_file(path: str) -> dict[str, torch.Tensor]:
    """Every tensor of the safetensors file at ``path``, as CPU tensors that share one private buffer.

    Raises :class:`TensorFileError` for a truncated or malformed file, ``OSError`` when it cannot be opened.
    """
    buf = _read_all(path)
    size = buf.numel()
    raw = memoryview(buf.numpy())
    if size < 8:
        raise TensorFileError(f"{path}: {size} bytes, shorter than the 8-byte header length")
    (n,) = struct.unpack("<Q", raw[:8])
    if n > min(MAX_HEADER_BYTES, size - 8):
        raise TensorFileError(f"{path}: header length {n} does not fit the file ({size} bytes; at most "
                              f"{MAX_HEADER_BYTES} allowed)")
    try:
        header = json.loads(raw[8:8 + n].tobytes())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise TensorFileError(f"{path}: header is not valid JSON ({e})") from None
    if not isinstance(header, dict):
        raise TensorFileError(f"{path}: header is a JSON {type(header).__name__}; expected an object")
    entries = _entries(header, path)
    expected = 0
    for begin, end, name, _, _ in entries:
        if begin != expected:
            what = "overlaps the tensor before it" if begin < expected else "leaves a gap before it"
            raise TensorFileError(f"{path}: tensor {name!r} starts at byte {begin} and {what} (which ends at "
                                  f"{expected})")
        expected = end
    if size - 8 - n != expected:
        raise TensorFileError(f"{path}: the data section holds {size - 8 - n} bytes but the header describes "
                              f"{expected}; truncated or trailing bytes")
    return _views(buf, 8 + n, entries)
