"""The bundled demo base model: materialisation, loadability with transformers, and output quality."""
from __future__ import annotations

import os

import pytest

from aspen.demo import ASSETS_DIR, ensure_demo_base
from aspen.demo.corpus import corpus_words, make_corpus

CHECKPOINT_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
                    "generation_config.json")


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory) -> str:
    return ensure_demo_base(str(tmp_path_factory.mktemp("home") / "demo" / "base"))


def test_assets_small():
    total = sum(os.path.getsize(os.path.join(ASSETS_DIR, f)) for f in os.listdir(ASSETS_DIR))
    assert total <= 10 * 1024 * 1024


def test_ensure_demo_base_writes_checkpoint_and_is_idempotent(tmp_path):
    out = str(tmp_path / "a" / "base")
    assert ensure_demo_base(out) == out
    for name in CHECKPOINT_FILES:
        assert os.path.getsize(os.path.join(out, name)) > 0, name
    weights = os.path.join(out, "model.safetensors")
    stamp = os.stat(weights).st_mtime_ns
    assert ensure_demo_base(out) == out
    assert os.stat(weights).st_mtime_ns == stamp  # untouched the second time
    assert sorted(os.listdir(tmp_path / "a")) == ["base"]  # no temp dirs left behind

    # An incomplete directory (say, an interrupted manual copy) is replaced by a complete one.
    os.remove(os.path.join(out, "tokenizer.json"))
    with open(weights, "r+b") as f:
        f.truncate(100)
    assert ensure_demo_base(out) == out
    assert os.path.getsize(weights) == os.path.getsize(os.path.join(ASSETS_DIR, "model.safetensors"))
    assert os.path.isfile(os.path.join(out, "tokenizer.json"))
    assert sorted(os.listdir(tmp_path / "a")) == ["base"]


def test_default_location_honours_aspen_home(tmp_path, monkeypatch):
    monkeypatch.setenv("ASPEN_HOME", str(tmp_path))
    assert ensure_demo_base() == str(tmp_path / "demo" / "base")
    assert os.path.isfile(tmp_path / "demo" / "base" / "config.json")


def test_corpus_is_deterministic():
    a = make_corpus(seed=0)
    assert a == make_corpus(seed=0)
    assert a != make_corpus(seed=1)
    assert "Question: what color is the sky?\nAnswer: the sky is blue." in a


def test_tokenizer_round_trips(demo_dir):
    transformers = pytest.importorskip("transformers")
    tok = transformers.AutoTokenizer.from_pretrained(demo_dir)
    assert (tok.bos_token, tok.eos_token, tok.pad_token) == ("<s>", "</s>", "<pad>")
    text = "Once upon a time, Zoë ate crème brûlée ☕ 日本 🙂\n\tdone."
    ids = tok(text).input_ids
    assert ids[0] == tok.bos_token_id
    assert tok.decode(ids, skip_special_tokens=True) == text


def test_greedy_generation_is_corpus_english(demo_dir):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    tok = transformers.AutoTokenizer.from_pretrained(demo_dir)
    major = int(transformers.__version__.split(".")[0])
    kw = {"dtype": torch.float32} if major >= 5 else {"torch_dtype": torch.float32}
    model = transformers.AutoModelForCausalLM.from_pretrained(demo_dir, **kw).eval()
    ids = tok("Once upon a time", return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=30, do_sample=False)
    text = tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
    words = [w.strip(".,!?\"':;()").lower() for w in text.split()]
    words = [w for w in words if w]
    assert len(words) >= 8, text
    vocab = corpus_words(make_corpus())
    known = sum(w in vocab for w in words)
    assert known >= 0.8 * len(words), text
