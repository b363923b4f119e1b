"""The safetensors reader behind adapter loading: same tensors as the safetensors library, checked headers, and
tensors that do not depend on the file once it has been read."""
from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

from aspen.lora import tensor_file
from aspen.lora.tensor_file import TensorFileError, read_tensor_file

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int64, torch.int32, torch.int16,
          torch.int8, torch.uint8, torch.bool]


def random_tensor(dtype: torch.dtype, shape: list[int], seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if dtype == torch.bool:
        return torch.randint(0, 2, shape, generator=g).bool()
    if dtype.is_floating_point:
        return torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)
    info = torch.iinfo(dtype)
    return torch.randint(max(info.min, -1000), min(info.max, 1000), shape, generator=g, dtype=torch.int64).to(dtype)


def raw_file(path: Path, header: dict, data: bytes, pad_to: int = 8) -> None:
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % pad_to)
    path.write_bytes(struct.pack("<Q", len(text)) + text + data)


tensor_specs = st.lists(st.tuples(st.sampled_from(DTYPES), st.lists(st.integers(0, 5), max_size=3)),
                        min_size=1, max_size=6)


@settings(max_examples=40, deadline=None)
@given(specs=tensor_specs, seed=st.integers(0, 2**16))
def test_same_tensors_as_the_safetensors_library(specs, seed: int, tmp_path_factory) -> None:
    path = tmp_path_factory.mktemp("st") / "t.safetensors"
    save_file({f"t{i}": random_tensor(d, s, seed + i) for i, (d, s) in enumerate(specs)}, str(path),
              metadata={"format": "pt"})
    ours, ref = read_tensor_file(str(path)), load_file(str(path))
    assert ours.keys() == ref.keys()
    for k in ref:
        assert ours[k].dtype == ref[k].dtype and ours[k].shape == ref[k].shape, k
        assert torch.equal(ours[k], ref[k]), k


def test_a_large_file_read_in_two_halves_is_the_same_file(tmp_path: Path) -> None:
    path = tmp_path / "big.safetensors"
    g = torch.Generator().manual_seed(0)
    tensors = {"a": torch.randn(3, 1000, generator=g), "b": torch.randn(1100, 1001, generator=g),
               "c": torch.randn(5, generator=g).half()}
    save_file(tensors, str(path))
    assert path.stat().st_size >= tensor_file.SPLIT_BYTES  # "b" spans the point where the halves meet
    ours = read_tensor_file(str(path))
    assert all(torch.equal(ours[k], tensors[k]) for k in tensors)


def test_tensors_stay_valid_when_the_file_is_rewritten_or_truncated(tmp_path: Path) -> None:
    path = tmp_path / "a.safetensors"
    orig = {"a": torch.randn(64, 32), "b": torch.randn(7)}
    save_file(orig, str(path))
    ours = read_tensor_file(str(path))
    with open(path, "r+b") as f:  # rewritten in place: same inode, same pages
        (n,) = struct.unpack("<Q", f.read(8))
        f.seek(8 + n)
        f.write(bytes(path.stat().st_size - 8 - n))
    assert all(torch.equal(ours[k], orig[k]) for k in orig)
    os.truncate(path, 0)  # a mapping of the file would fault (SIGBUS) on the next read
    assert all(torch.equal(ours[k], orig[k]) for k in orig)


@pytest.mark.parametrize("pad_to", [1, 8])  # 1: the data section itself starts unaligned
def test_unaligned_tensor_is_copied_to_aligned_memory(tmp_path: Path, pad_to: int) -> None:
    path = tmp_path / "u.safetensors"
    x = torch.arange(6, dtype=torch.float32)
    raw_file(path, {"bytes": {"dtype": "U8", "shape": [3], "data_offsets": [0, 3]},
                    "x": {"dtype": "F32", "shape": [2, 3], "data_offsets": [3, 27]}},
             bytes([1, 2, 3]) + x.numpy().tobytes(), pad_to=pad_to)
    got = read_tensor_file(str(path))
    assert torch.equal(got["bytes"], torch.tensor([1, 2, 3], dtype=torch.uint8))
    assert torch.equal(got["x"], x.view(2, 3))


F32_2 = {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}


@pytest.mark.parametrize("header, data, needle", [
    ("[1, 2]", b"", "expected an object"),
    ("{not json", b"", "not valid JSON"),
    ({"x": {"dtype": "F32", "shape": [2]}}, b"\0" * 8, "exactly dtype, shape and data_offsets"),
    ({"x": {"dtype": "Q4", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 8, "dtype 'Q4'"),
    ({"x": {"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]}}, b"\0" * 8, "shape [-2]"),
    ({"x": {"dtype": "F32", "shape": [2], "data_offsets": [8, 0]}}, b"\0" * 8, "data_offsets [8, 0]"),
    ({"x": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, b"\0" * 8, "need 12"),
    ({"x": F32_2, "y": F32_2}, b"\0" * 8, "overlaps"),
    ({"x": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}, b"\0" * 12, "leaves a gap"),
    ({"x": F32_2}, b"\0" * 5, "truncated"),
    ({"x": F32_2}, b"\0" * 9, "trailing"),
    ({"x": F32_2, "__metadata__": {"a": 1}}, b"\0" * 8, "__metadata__"),
])
def test_malformed_files_are_refused_with_the_problem_named(tmp_path: Path, header, data: bytes,
                                                            needle: str) -> None:
    path = tmp_path / "bad.safetensors"
    if isinstance(header, str):
        text = header.encode()
        path.write_bytes(struct.pack("<Q", len(text)) + text + data)
    else:
        raw_file(path, header, data)
    with pytest.raises(TensorFileError) as ei:
        read_tensor_file(str(path))
    assert needle in str(ei.value) and str(path) in str(ei.value)


@pytest.mark.parametrize("content, needle", [
    (b"\x01\x02", "shorter than the 8-byte header length"),
    (struct.pack("<Q", 1 << 40) + b"{}", "does not fit the file"),
    (struct.pack("<Q", 64) + b"{}", "does not fit the file"),
])
def test_bad_header_length(tmp_path: Path, content: bytes, needle: str) -> None:
    path = tmp_path / "bad.safetensors"
    path.write_bytes(content)
    with pytest.raises(TensorFileError, match=needle):
        read_tensor_file(str(path))


def test_empty_file_of_tensors(tmp_path: Path) -> None:
    path = tmp_path / "e.safetensors"
    save_file({}, str(path))
    assert read_tensor_file(str(path)) == {}
