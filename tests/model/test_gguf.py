"""GGUF files as a model source, on tiny GGUF files the tests write (``tests.helpers.gguf_files``): converted once
into ``$ASPEN_HOME/gguf``, loaded like the checkpoint they were written from, and refused with a message naming
what is unsupported."""
from __future__ import annotations

import os
import shutil
import threading

import pytest
import torch

import aspen
import aspen.language_model
from aspen.errors import CheckpointError
from aspen.model import gguf_cache
from aspen.model.gguf_cache import RECORD_FILE, GGUFCheckpoint
from tests.helpers.gguf_files import CHAT_TEMPLATE, write_gguf
from tests.helpers.tiny_models import TEXT, hf_model, make_checkpoint

IDS = list(range(5, 50))


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("gguf")
    checkpoint = make_checkpoint(str(root / "checkpoint"), "llama", tie_word_embeddings=True)
    return {"checkpoint": checkpoint,
            "f32": write_gguf(str(root / "tiny-f32.gguf"), checkpoint),
            "q8": write_gguf(str(root / "tiny-q8_0.gguf"), checkpoint, qtype="Q8_0")}


@pytest.fixture(autouse=True)
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("ASPEN_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


def _reference(path: str, **kwargs) -> torch.Tensor:
    with torch.inference_mode():
        return hf_model(path, **kwargs)(torch.tensor([IDS])).logits[0]


def test_gguf_loads_like_the_checkpoint_it_was_written_from(files, home):
    lm = aspen.load_model(files["f32"], progress=False)
    assert (lm.score(IDS, block_size=8) - _reference(files["checkpoint"])).abs().max().item() < 1e-4
    assert lm.path == lm.config.name_or_path == files["f32"]  # adapters name the file as their base
    assert lm.config.tie_word_embeddings and lm.config.family == "llama"
    assert lm.tokenizer.chat_template == CHAT_TEMPLATE
    original = aspen.load_model(files["checkpoint"], progress=False).tokenizer
    assert lm.tokenizer(TEXT[:400])["input_ids"] == original(TEXT[:400])["input_ids"]
    [converted] = [d for d in os.listdir(home / "gguf") if d.endswith("-float32")]
    names = set(os.listdir(home / "gguf" / converted))
    assert {"config.json", "model.safetensors", "tokenizer.json", RECORD_FILE} <= names


def test_quantized_gguf_is_dequantized_like_transformers_does(files):
    lm = aspen.load_model(files["q8"], progress=False)
    ours = lm.score(IDS, block_size=8)
    directory, name = os.path.split(files["q8"])
    assert (ours - _reference(directory, gguf_file=name)).abs().max().item() < 1e-4
    assert (ours - _reference(files["checkpoint"])).abs().max().item() > 1e-3  # Q8_0 blocks, not a float copy


def test_the_conversion_is_cached_by_content_and_dtype(files, tmp_path, monkeypatch):
    aspen.load_model(files["f32"], progress=False)

    def no_conversion(*args, **kwargs):
        raise AssertionError("converted again")

    monkeypatch.setattr(gguf_cache, "convert", no_conversion)
    copy = shutil.copy(files["f32"], tmp_path / "renamed copy.gguf")
    for path in (files["f32"], str(copy)):
        assert aspen.load_model(path, progress=False).config.name_or_path == path
    with pytest.raises(AssertionError, match="converted again"):  # another dtype is another conversion
        aspen.load_model(files["f32"], dtype="bfloat16", progress=False)


def test_an_interrupted_conversion_leaves_nothing_behind(files, home, monkeypatch):
    real = gguf_cache.convert

    def interrupted(header, out_dir, dtype, progress=True):
        real(header, out_dir, dtype, progress)
        raise KeyboardInterrupt

    monkeypatch.setattr(gguf_cache, "convert", interrupted)
    with pytest.raises(KeyboardInterrupt):
        aspen.load_model(files["f32"], progress=False)
    assert [n for n in os.listdir(home / "gguf") if not n.endswith(".lock")] == ["digests"]
    monkeypatch.setattr(gguf_cache, "convert", real)
    assert aspen.load_model(files["f32"], progress=False).config.family == "llama"


def test_concurrent_starts_convert_once(files, monkeypatch):
    real, calls, converting = gguf_cache.convert, [], threading.Event()

    def slow(header, out_dir, dtype, progress=True):
        calls.append(out_dir)
        converting.set()
        threading.Event().wait(0.5)  # the other start reaches the lock meanwhile
        return real(header, out_dir, dtype, progress)

    monkeypatch.setattr(gguf_cache, "convert", slow)
    results = []

    def start():
        results.append(GGUFCheckpoint(files["f32"], torch.float32, progress=False).materialize())

    first = threading.Thread(target=start)
    first.start()
    assert converting.wait(60)
    start()
    first.join()
    assert len(calls) == 1 and len(set(results)) == 1 and os.path.isfile(os.path.join(results[0], RECORD_FILE))


@pytest.mark.parametrize("kind, options, message", [
    ("architecture", {"arch": "gpt2"}, r"architecture 'gpt2'; supported GGUF architectures: llama, mistral, qwen2"),
    ("tensor type", {"qtype": "Q8_1"}, r"cannot dequantize: Q8_1 \(\d+ tensors, e\.g\. '.*'\); supported tensor types"),
    ("experts", {"extra": {"expert_count": 8}}, r"mixture-of-experts model \(llama\.expert_count=8\)"),
    ("rope factors", {"extra": {"rope_freqs": True}}, r"rope frequency factors \('rope_freqs\.weight'"),
])
def test_unsupported_files_are_refused_before_any_work(files, tmp_path, home, monkeypatch, kind, options,
                                                         message):
    path = write_gguf(str(tmp_path / "unsupported.gguf"), files["checkpoint"], **options)

    def no_build(*args):
        raise AssertionError("kernel builds started for a file that is refused")

    monkeypatch.setattr(aspen.language_model, "start_build", no_build)
    with pytest.raises(CheckpointError, match=message):
        aspen.load_model(path, progress=False)
    assert not [n for n in os.listdir(home / "gguf") if n.endswith("-float32")]


def test_files_that_are_not_gguf_are_refused(tmp_path):
    other = tmp_path / "weights.bin"
    other.write_bytes(b"not a model")
    with pytest.raises(CheckpointError, match="is not a directory but a file that is not a GGUF file either"):
        aspen.load_model(str(other), progress=False)
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(b"GGUF\x03\x00")
    with pytest.raises(CheckpointError, match="truncated.gguf'?: not a readable GGUF file"):
        aspen.load_model(str(truncated), progress=False)


def test_the_engine_serves_a_gguf_file_like_its_checkpoint(files):
    from engine.llm_engine import LLMEngine
    from engine.scheduling.sampling_params import SamplingParams

    greedy = SamplingParams(max_new_tokens=8, temperature=0.0, ignore_eos=True)
    outputs = [LLMEngine(model=m, progress=False, num_kv_blocks=64, block_size=4).generate(
        "The quick brown fox", greedy)[0].token_ids for m in (files["f32"], files["checkpoint"])]
    assert outputs[0] == outputs[1] and len(outputs[0]) == 8
