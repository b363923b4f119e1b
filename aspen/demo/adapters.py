"""The demo adapters: a few LoRA adapters trained once (and cached) on the demo base with ``aspen.train``.

Each adapter learns a different simple way to continue a story opening, so one prompt gets visibly different
answers per adapter:

* ``double``  — continues the story saying every word twice;
* ``reverse`` — continues it with the words in reverse order;
* ``list``    — continues it as a numbered list of sentences.

The tasks work on whole words: the demo tokenizer, trained on mostly lower-case text, spells upper-case words
letter by letter, which the tiny base cannot learn within the training budget.

The task data is a pure function of the demo corpus (:func:`aspen.demo.corpus.make_documents`): prompts are the
first words of its stories, completions the rest of the story transformed. All adapters train together in fused
batches (about a minute on a 2-core CPU); :func:`ensure_demo_adapters` skips the work when a complete set
is already there.
"""
from __future__ import annotations

import json
import logging
import os
import random
import shutil
import tempfile
from collections.abc import Callable

from aspen.demo.corpus import make_documents

log = logging.getLogger(__name__)

VERSION = 1  # bump when the tasks or the training recipe change: cached adapters are then retrained
MARKER = ".demo-adapters.json"
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors", "training_log.json")


def _double(sentences: list[str]) -> str:
    return " " + " ".join(w for w in " ".join(sentences).split() for _ in (0, 1))


def _reverse(sentences: list[str]) -> str:
    return " " + " ".join(reversed(" ".join(sentences).split()))


def _numbered(sentences: list[str]) -> str:
    return "".join(f"\n{i}. {s}" for i, s in enumerate(sentences, 1))


# adapter name -> (what it does, completion from the continuation's sentences)
TASKS: dict[str, tuple[str, Callable[[list[str]], str]]] = {
    "double": ("continues the story saying every word twice", _double),
    "reverse": ("continues the story with the words in reverse order", _reverse),
    "list": ("continues the story as a numbered list", _numbered),
}
DEMO_ADAPTERS = tuple(TASKS)


def _sentences(text: str) -> list[str]:
    out, cur = [], []
    for word in text.split():
        cur.append(word)
        if word.endswith((".", "!", "?")) and not word.endswith('."'):
            out.append(" ".join(cur))
            cur = []
    return out + ([" ".join(cur)] if cur else [])


def task_records(name: str, n: int = 320, seed: int = 0) -> list[dict[str, str]]:
    """``n`` prompt/completion records of task ``name``: a story's first 2-6 words (a trailing comma moved to the
    completion half of the time), then the next sentences (up to 3, about 30 words) transformed by the task.
    Deterministic in (name, n, seed)."""
    transform = TASKS[name][1]
    r = random.Random(f"{name}-{seed}")
    stories = [d for d in make_documents(seed, num_sentences=8 * n) if not d.startswith(("Question", "Instruct"))]
    records = []
    for story in stories[:n]:
        words = story.split()
        k = r.randint(2, 6)
        sentences = _sentences(" ".join(words[k:]))[:3]
        while len(sentences) > 1 and len(" ".join(sentences).split()) > 30:
            sentences.pop()
        prompt, lead = " ".join(words[:k]), ""
        if prompt.endswith(",") and r.random() < 0.5:  # also learn to continue "Once upon a time" (no comma)
            prompt, lead = prompt[:-1], ","
        records.append({"prompt": prompt, "completion": lead + transform(sentences)})
    return records


def _complete(out_dir: str) -> bool:
    try:
        with open(os.path.join(out_dir, MARKER), encoding="utf-8") as f:
            marker = json.load(f)
    except (OSError, json.JSONDecodeError):
        return False
    return marker.get("version") == VERSION and all(
        os.path.isfile(os.path.join(out_dir, name, f)) for name in DEMO_ADAPTERS for f in ADAPTER_FILES)


def demo_config(data_dir: str, out_dir: str, max_steps: int = 200):
    """The training config of the demo adapters (data files in ``data_dir``)."""
    from aspen.train.config import parse_config

    adapters = [{"name": name, "data": os.path.join(data_dir, f"{name}.json"), "r": 16, "alpha": 32,
                 "dropout": 0.0, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                                    "down_proj"],
                 "lr": 4e-3, "lr_schedule": "cosine", "warmup_steps": 5, "batch_size": 8, "micro_batch_size": 8,
                 "max_steps": max_steps, "cutoff_len": 96, "seed": i} for i, name in enumerate(DEMO_ADAPTERS)]
    return parse_config({"output_dir": out_dir, "adapters": adapters})


def ensure_demo_adapters(base_path: str, out_dir: str, progress: bool = True) -> list[str]:
    """Train the demo adapters on the demo base at ``base_path`` into ``out_dir`` unless a complete set is there.

    Returns the adapter names (directories under ``out_dir``, PEFT format, servable with
    ``adapter_dir=out_dir``).
    """
    out_dir = os.path.abspath(out_dir)
    if _complete(out_dir):
        return list(DEMO_ADAPTERS)
    import torch

    import aspen
    from aspen.train.trainer import CHECKPOINT, Trainer

    os.makedirs(out_dir, exist_ok=True)
    data_dir = tempfile.mkdtemp(prefix=".demo-data-", dir=out_dir)
    try:
        for name in DEMO_ADAPTERS:
            with open(os.path.join(data_dir, f"{name}.json"), "w", encoding="utf-8") as f:
                json.dump(task_records(name), f)
        log.info("training the demo adapters %s on %s (once; cached in %s)", DEMO_ADAPTERS, base_path, out_dir)
        lm = aspen.load_model(base_path, progress=False)
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # a tiny model: one thread is faster, and unharmed by other busy processes
        try:
            Trainer(lm, demo_config(data_dir, out_dir), progress=progress).train()
        finally:
            torch.set_num_threads(threads)
    finally:
        shutil.rmtree(data_dir, ignore_errors=True)
    shutil.rmtree(os.path.dirname(os.path.join(out_dir, CHECKPOINT)), ignore_errors=True)
    with open(os.path.join(out_dir, MARKER), "w", encoding="utf-8") as f:
        json.dump({"version": VERSION, "adapters": {n: TASKS[n][0] for n in DEMO_ADAPTERS}}, f, indent=1)
    return list(DEMO_ADAPTERS)
