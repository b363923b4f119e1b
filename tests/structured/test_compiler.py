"""GrammarCompiler on the test tokenizer: what each kind of format accepts, the content cache (hits, LRU, refusals
cached too, one compile for concurrent requests of a format), the tokenizer built once, and GrammarMatcher's
bookkeeping (lazy consumption, rollback, errors)."""
from __future__ import annotations

import threading
import time

import pytest
import torch

from engine import ResponseFormat
from engine.scheduling.response_format import ResponseFormatError
from engine.structured import compiler as compiler_module
from engine.structured.bitmask import words_for
from engine.structured.compiler import GrammarCompiler
from tests.helpers.tiny_models import make_tokenizer

VOCAB = 320


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return make_tokenizer(str(tmp_path_factory.mktemp("tok")))


def compiler(tokenizer, **kw) -> GrammarCompiler:
    return GrammarCompiler(tokenizer, VOCAB, [2], **kw)


def ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False).input_ids


def accepts(comp: GrammarCompiler, fmt: ResponseFormat, tokenizer, text: str) -> bool:
    """Whether ``text`` is a complete output of ``fmt``."""
    m = comp.matcher(fmt)
    try:
        m.sync(ids(tokenizer, text))
        m.sync(ids(tokenizer, text) + [2])  # EOS: accepted only where the format may end
    except ResponseFormatError:
        return False
    return m.is_complete


def allowed(m, tokens) -> set[int]:
    row = torch.empty(words_for(m.vocab_size), dtype=torch.int32)
    assert m.fill_bitmask(row, tokens)
    return {t for t in range(m.vocab_size) if (int(row[t // 32]) >> (t % 32)) & 1}


@pytest.mark.parametrize(("fmt", "good", "bad"), [
    (ResponseFormat.json_object(), ['{"a":[1,2],"b":{"c":null}}', "{}"], ["[1]", '{"a":1', '{"a": 1}', "1"]),
    (ResponseFormat.json_schema({"type": "object", "properties": {"n": {"type": "integer", "maximum": 5}},
                                 "required": ["n"], "additionalProperties": False}), ['{"n":5}', '{"n":-3}'],
     ['{"n":6}', '{"m":1}', "{}"]),
    (ResponseFormat.json_schema({"type": "object", "properties": {"n": {"type": "integer"}},
                                 "x-guidance": {"whitespace_flexible": True}}), ['{ "n" : 1 }'], ["[]"]),
    (ResponseFormat.regex(r"[a-z]{2}-[0-9]"), ["ab-1"], ["ab-12", "a-1", "AB-1"]),
    (ResponseFormat.grammar('start: "(" NUM ")"\nNUM: /[0-9]+/'), ["(12)"], ["()", "(1"]),
    (ResponseFormat.choice(["yes", "no", 'quote "x"\\']), ["yes", "no", 'quote "x"\\'], ["ye", "yess", "maybe"]),
])
def test_kinds_accept_exactly_their_language(tokenizer, fmt, good, bad):
    comp = compiler(tokenizer)
    for text in good:
        assert accepts(comp, fmt, tokenizer, text), text
    for text in bad:
        assert not accepts(comp, fmt, tokenizer, text), text


def test_unsupported_keywords_are_refused_by_name(tokenizer):
    comp = compiler(tokenizer)
    for schema, keyword in [({"not": {"type": "string"}}, "not"), ({"type": "array", "uniqueItems": True},
                                                                    "uniqueItems"),
                            ({"if": {"type": "integer"}, "then": {"minimum": 1}}, "if"),
                            ({"type": "object", "dependentRequired": {"a": ["b"]}}, "dependentRequired")]:
        with pytest.raises(ResponseFormatError, match=keyword) as info:
            comp.matcher(ResponseFormat.json_schema(schema))
        assert info.value.field == "response_format.json_schema"


def test_cache_by_content_lru_and_cached_refusals(tokenizer):
    comp = compiler(tokenizer, cache_size=2)
    a, b, c = (ResponseFormat.regex(r) for r in ("a+", "b+", "c+"))
    for fmt in (a, a, ResponseFormat.regex("a+"), b):
        comp.matcher(fmt)
    assert comp.stats().compiled == 2 and comp.stats().hits == 2
    comp.matcher(c)  # evicts a (least recently used)
    comp.matcher(b)
    assert comp.stats().hits == 3
    comp.matcher(a)
    assert comp.stats().compiled == 4 and comp.stats().cached == 2
    bad = ResponseFormat.regex("(unclosed")
    for _ in range(3):
        with pytest.raises(ResponseFormatError, match="unclosed"):
            comp.matcher(bad)
    assert comp.stats().compiled == 5 and comp.stats().refused == 3
    m1, m2 = comp.matcher(a), comp.matcher(a)  # copies: one request's progress is not another's
    m1.sync(ids(tokenizer, "aaa"))
    assert m2.num_consumed == 0 and allowed(m2, []) != allowed(m1, ids(tokenizer, "aaa"))


def test_concurrent_requests_for_one_format_share_one_compile(tokenizer, monkeypatch):
    comp = compiler(tokenizer)
    real, builds = comp._build, []

    def slow(fmt):
        builds.append(fmt)
        time.sleep(0.3)
        return real(fmt)

    monkeypatch.setattr(comp, "_build", slow)
    fmt = ResponseFormat.json_schema({"type": "integer"})
    threads = [threading.Thread(target=comp.matcher, args=(fmt,)) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert len(builds) == 1 and comp.stats().compiled == 1


def test_tokenizer_view_built_once(tokenizer, monkeypatch):
    calls = []
    real = compiler_module._make_tokenizer_info

    def counting(*a):
        calls.append(a)
        return real(*a)

    monkeypatch.setattr(compiler_module, "_make_tokenizer_info", counting)
    comp = compiler(tokenizer)
    for r in ("x", "y+", "z{2}"):
        comp.matcher(ResponseFormat.regex(r))
    assert len(calls) == 1


def test_unusable_tokenizer_is_a_clear_refusal():
    comp = GrammarCompiler(object(), VOCAB, [2])
    with pytest.raises(ResponseFormatError, match="tokenizer cannot be used for structured output"):
        comp.matcher(ResponseFormat.regex("a"))


def test_vocabulary_wider_than_the_tokenizer(tokenizer):
    """Logit rows past the tokenizer's tokens (padding of the embedding matrix) are never allowed."""
    comp = GrammarCompiler(tokenizer, 400, [2])
    m = comp.matcher(ResponseFormat.regex(".{1,3}"))
    assert m.vocab_size >= 400
    assert max(allowed(m, [])) < len(tokenizer)


def test_matcher_follows_rolls_back_and_rebuilds(tokenizer):
    comp = compiler(tokenizer)
    m = comp.matcher(ResponseFormat.regex(r"[a-z]{1,12}"))
    abc, abx = ids(tokenizer, "abc"), ids(tokenizer, "abx")
    m.sync(abc)
    assert m.num_consumed == len(abc)
    m.sync(abc[:1])  # the output got shorter: roll back
    assert m.num_consumed == 1
    m.sync(abx)  # diverged after the common prefix
    fresh = comp.matcher(ResponseFormat.regex(r"[a-z]{1,12}"))
    assert m.num_consumed == len(abx) and allowed(m, abx) == allowed(fresh, abx)
    with pytest.raises(ResponseFormatError, match="does not continue the format") as info:
        m.sync(abx + ids(tokenizer, "9"))
    assert info.value.field == "response_format.regex"
    row = torch.zeros(words_for(m.vocab_size), dtype=torch.int32)
    assert not m.fill_bitmask(row, abx) and bool((row == -1).all())  # a broken matcher masks nothing
    with pytest.raises(ResponseFormatError):
        m.sync(abx)
