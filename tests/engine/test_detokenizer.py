"""IncrementalDetokenizer: streamed deltas add up to the full decode, never split characters, and cut stop strings.

Both tokenizers are trained here on a few local lines: a GPT-2 style byte-level BPE and a Llama style sentencepiece
lookalike (Metaspace pre-tokenizer, BPE with byte fallback, Replace/ByteFallback/Fuse/Strip decoder).
"""
from __future__ import annotations

import functools
import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as hst
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from engine.detokenizer import IncrementalDetokenizer

LINES = [
    "The quick brown fox jumps over the lazy dog.",
    "naïve café résumé, déjà vu",
    "Hello world, the END is near.",
    "streaming text token by token",
    "a b c d e f g 0 1 2 3",
] * 3
SAMPLE = "naïve café — 日本語 🙂 Hello world, the END is near."


@functools.cache
def byte_level() -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(LINES, trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>",
                                   clean_up_tokenization_spaces=False)


@functools.cache
def sentencepiece_like() -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    tok.train_from_iterator(LINES, trainers.BpeTrainer(vocab_size=200, special_tokens=["<unk>", "<s>", "</s>"]))
    spec = json.loads(tok.to_str())
    vocab = spec["model"]["vocab"]
    next_id = max(vocab.values()) + 1
    for b in range(256):  # the <0xXX> byte tokens that byte fallback needs
        if f"<0x{b:02X}>" not in vocab:
            vocab[f"<0x{b:02X}>"] = next_id
            next_id += 1
    spec["model"]["byte_fallback"] = True
    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(json.dumps(spec)), unk_token="<unk>",
                                   bos_token="<s>", eos_token="</s>", clean_up_tokenization_spaces=False)


TOKENIZERS = {"byte_level": byte_level, "sentencepiece": sentencepiece_like}


@pytest.fixture(params=sorted(TOKENIZERS))
def tok(request: pytest.FixtureRequest) -> PreTrainedTokenizerFast:
    return TOKENIZERS[request.param]()


def encode(tok: PreTrainedTokenizerFast, text: str) -> list[int]:
    return tok.encode(text, add_special_tokens=False)


def stream(det: IncrementalDetokenizer, ids: list[int]) -> list[str]:
    deltas = [det.add(t) for t in ids]
    deltas.append(det.finish())
    return deltas


def cut_at_stop(text: str, stops: list[str]) -> str:
    """Reference: text before the stop string that is completed first when reading left to right."""
    hits = [(text.find(s) + len(s), text.find(s)) for s in stops if s and s in text]
    return text[:min(hits)[1]] if hits else text


def test_sample_uses_byte_tokens(tok: PreTrainedTokenizerFast) -> None:
    ids = encode(tok, SAMPLE)
    assert tok.decode(ids) == SAMPLE
    # Some single token decodes to an incomplete character: the case the detokenizer must hold back.
    assert any("\ufffd" in tok.decode([t]) for t in ids)


@pytest.mark.parametrize("skip", [True, False])
def test_stream_equals_decode(tok: PreTrainedTokenizerFast, skip: bool) -> None:
    ids = encode(tok, SAMPLE) + [tok.eos_token_id] + encode(tok, " more")
    det = IncrementalDetokenizer(tok, prompt_token_ids=encode(tok, "prompt"), skip_special_tokens=skip)
    deltas = stream(det, ids)
    expected = tok.decode(ids, skip_special_tokens=skip)
    assert "".join(deltas) == expected == det.text
    assert det.output_token_ids == ids
    assert all("\ufffd" not in d for d in deltas)
    assert (tok.eos_token in expected) is not skip
    assert det.finish() == ""  # idempotent


def test_sentencepiece_word_spaces_survive_streaming() -> None:
    tok = sentencepiece_like()
    ids = encode(tok, "Hello world the lazy dog")
    assert len(ids) > 3
    deltas = stream(IncrementalDetokenizer(tok, []), ids)
    assert "".join(deltas) == "Hello world the lazy dog"
    # A later word-initial token decoded alone would lose its space; the window keeps it.
    assert any(d.startswith(" ") for d in deltas)


def test_continuation_mode_keeps_prompt_context(tok: PreTrainedTokenizerFast) -> None:
    full = encode(tok, "the quick brown fox jumps")
    prompt, output = full[:3], full[3:]
    det = IncrementalDetokenizer(tok, prompt, continuation=True)
    text = "".join(stream(det, output))
    assert text == tok.decode(full)[len(tok.decode(prompt)):]
    assert det.output_token_ids == output


def test_stop_string_split_across_tokens(tok: PreTrainedTokenizerFast) -> None:
    stop = "d, the E"
    ids = encode(tok, SAMPLE)
    pieces = [tok.decode(ids[:i + 1]) for i in range(len(ids))]
    assert not any(stop in tok.decode([t]) for t in ids)  # no single token holds it
    det = IncrementalDetokenizer(tok, [], stop=["never", stop])
    expected = SAMPLE[:SAMPLE.index(stop)]
    emitted = ""
    for i, t in enumerate(ids):
        delta = det.add(t)
        assert stop not in delta
        emitted += delta
        assert expected.startswith(emitted)
        if det.stopped:
            assert stop in pieces[i] and stop not in pieces[i - 1]
            break
    assert det.stopped and det.stop_reason == stop
    assert emitted == expected == det.text
    n = len(det.output_token_ids)
    assert det.add(ids[-1]) == "" and det.finish() == "" and len(det.output_token_ids) == n


def test_stop_prefix_is_held_then_released(tok: PreTrainedTokenizerFast) -> None:
    ids = encode(tok, "Hello world, the END is near.")
    det = IncrementalDetokenizer(tok, [], stop="END!")
    for t in ids:
        det.add(t)
        assert not det.emitted_text.endswith(("E", "EN", "END"))  # a possible start of "END!" is never out
    assert not det.stopped
    assert det.emitted_text + det.finish() == "Hello world, the END is near."


def test_first_completed_stop_wins() -> None:
    tok = sentencepiece_like()
    det = IncrementalDetokenizer(tok, [], stop=["the END is", "END"])
    text = "".join(stream(det, encode(tok, "Hello world, the END is near.")))
    assert text == "Hello world, the " and det.stop_reason == "END"


def test_stop_with_multibyte_characters(tok: PreTrainedTokenizerFast) -> None:
    det = IncrementalDetokenizer(tok, [], stop=["本語"])
    deltas = stream(det, encode(tok, SAMPLE))
    assert "".join(deltas) == "naïve café — 日" and det.stopped
    assert all("\ufffd" not in d and "本" not in d for d in deltas)


def test_raw_tokenizers_object_is_accepted() -> None:
    raw = sentencepiece_like().backend_tokenizer
    ids = raw.encode(SAMPLE, add_special_tokens=False).ids
    assert "".join(stream(IncrementalDetokenizer(raw, []), ids)) == raw.decode(ids)


_HYP = settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@_HYP
@given(text=hst.text(max_size=40), which=hst.sampled_from(sorted(TOKENIZERS)))
def test_random_unicode_streams_to_decode(text: str, which: str) -> None:
    tok = TOKENIZERS[which]()
    ids = encode(tok, text)
    deltas = stream(IncrementalDetokenizer(tok, []), ids)
    expected = tok.decode(ids)
    assert "".join(deltas) == expected
    if "\ufffd" not in expected:
        assert all("\ufffd" not in d for d in deltas)


@_HYP
@given(ids=hst.lists(hst.integers(0, 399), max_size=30))
def test_random_byte_level_ids_stream_to_decode(ids: list[int]) -> None:
    """Even invalid UTF-8 from arbitrary byte-level tokens adds up to the full (lossy) decode."""
    tok = byte_level()
    ids = [i % len(tok) for i in ids]
    assert "".join(stream(IncrementalDetokenizer(tok, [], skip_special_tokens=False), ids)) == tok.decode(ids)


@_HYP
@given(text=hst.text(alphabet="ab é日🙂,.", max_size=40), data=hst.data(), which=hst.sampled_from(sorted(TOKENIZERS)))
def test_random_stop_strings(text: str, data: hst.DataObject, which: str) -> None:
    tok = TOKENIZERS[which]()
    ids = encode(tok, text)
    decoded = tok.decode(ids)
    stops = data.draw(hst.lists(hst.text(alphabet="ab é日🙂,.", min_size=1, max_size=4), max_size=3))
    det = IncrementalDetokenizer(tok, [], stop=stops)
    expected = cut_at_stop(decoded, stops)
    emitted = ""
    for t in ids:
        emitted += det.add(t)
        assert expected.startswith(emitted)
    emitted += det.finish()
    assert emitted == expected
    assert det.stopped == (expected != decoded or any(s in decoded for s in stops))
    if det.stopped:
        assert det.stop_reason is not None and decoded[len(expected):].startswith(det.stop_reason)
