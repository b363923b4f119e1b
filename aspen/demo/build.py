"""Build the embedded demo base model: the exact script that made ``aspen/demo/assets``.

    python -m aspen.demo.build --out aspen/demo/assets

Steps, all on CPU and deterministic for a given ``--seed``:

1. generate the procedural CC0 corpus (:mod:`aspen.demo.corpus`);
2. train a byte-level BPE tokenizer on it (``tokenizers``), wrap it as ``PreTrainedTokenizerFast``;
3. pretrain a tiny ``LlamaForCausalLM`` (GQA, tied embeddings) with AdamW and a cosine LR schedule on random
   windows of the tokenized corpus;
4. save weights as float16 safetensors, plus tokenizer, ``generation_config.json`` and a ``README.md``.
"""
from __future__ import annotations

import argparse
import inspect
import json
import math
import os
import random
import time

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from tqdm import tqdm
from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from aspen.demo.corpus import make_documents

SPECIALS = ("<unk>", "<s>", "</s>", "<pad>")  # ids 0..3
SAMPLE_PROMPTS = ("Once upon a time", "The little dog", "Question: what color is the sky?\nAnswer:")


def build_tokenizer(docs: list[str], vocab_size: int, max_len: int) -> PreTrainedTokenizerFast:
    """Byte-level BPE: any UTF-8 text round-trips through encode/decode; ``<s>`` is prepended on encode."""
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIALS), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(docs, trainer=trainer)
    bos = tok.token_to_id("<s>")
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                       special_tokens=[("<s>", bos)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>", model_max_length=max_len)


def encode_corpus(tok: PreTrainedTokenizerFast, docs: list[str]) -> torch.Tensor:
    """All documents as one stream: ``<s> doc </s> <s> doc </s> ...``."""
    ids: list[int] = []
    for enc in tok.backend_tokenizer.encode_batch(docs, add_special_tokens=False):
        ids += [tok.bos_token_id, *enc.ids, tok.eos_token_id]
    return torch.tensor(ids, dtype=torch.long)


def make_config(tok: PreTrainedTokenizerFast, args: argparse.Namespace) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=len(tok), hidden_size=args.hidden, num_hidden_layers=args.layers,
        num_attention_heads=args.heads, num_key_value_heads=args.kv_heads, intermediate_size=args.intermediate,
        max_position_embeddings=args.max_positions, rms_norm_eps=1e-6, rope_theta=10000.0,
        tie_word_embeddings=True, hidden_act="silu", initializer_range=0.02,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)


def lr_at(step: int, args: argparse.Namespace) -> float:
    """Linear warmup, then cosine decay to 10% of the peak."""
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    frac = (step - args.warmup) / max(1, args.steps - args.warmup)
    return args.lr * (0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * frac)))


def train(model: LlamaForCausalLM, data: torch.Tensor, args: argparse.Namespace) -> list[float]:
    gen = torch.Generator().manual_seed(args.seed)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=args.lr, betas=(0.9, 0.95), eps=1e-8)
    offsets = torch.arange(args.seq_len)
    losses: list[float] = []
    model.train()
    bar = tqdm(range(args.steps), desc="pretrain", unit="step")
    for step in bar:
        for group in opt.param_groups:
            group["lr"] = lr_at(step, args)
        starts = torch.randint(0, len(data) - args.seq_len, (args.batch,), generator=gen)
        batch = data[starts[:, None] + offsets]
        loss = model(input_ids=batch, labels=batch).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
        if step % 10 == 0 or step == args.steps - 1:
            bar.set_postfix(loss=f"{sum(losses[-10:]) / len(losses[-10:]):.3f}", lr=f"{lr_at(step, args):.2e}")
    model.eval()
    return losses


@torch.no_grad()
def samples(model: LlamaForCausalLM, tok: PreTrainedTokenizerFast, max_new: int = 40) -> list[str]:
    out = []
    for prompt in SAMPLE_PROMPTS:
        ids = tok(prompt, return_tensors="pt").input_ids
        gen = model.generate(ids, max_new_tokens=max_new, do_sample=False)
        out.append(tok.decode(gen[0], skip_special_tokens=True))
    return out


def _dir_sizes(out: str) -> dict[str, int]:
    return {f: os.path.getsize(os.path.join(out, f)) for f in sorted(os.listdir(out))
            if os.path.isfile(os.path.join(out, f))}


def write_readme(out: str, args: argparse.Namespace, info: dict) -> None:
    sizes = _dir_sizes(out)
    sizes.pop("README.md", None)
    rows = "\n".join(f"| `{f}` | {n:,} |" for f, n in sizes.items())
    sample_md = "\n\n".join(f"```\n{s}\n```" for s in info["samples"])
    text = f"""# ASPEN demo base model

A tiny Llama-architecture causal LM bundled with ASPEN serve so the engine, adapters and examples can run with
no download. It writes short, simple (and silly) English stories and answers toy questions; it is **not** a
useful language model.

## How it was made

Made by `aspen/demo/build.py`, from the repository root, with:

    {info["command"]}

CPU only (`torch.set_num_threads({args.threads})`), fixed seeds (`--seed {args.seed}`), deterministic.

- Corpus: `aspen.demo.corpus.make_corpus(seed={args.seed}, num_sentences={args.num_sentences})` -
  {info["corpus_chars"]:,} characters, {info["corpus_tokens"]:,} tokens of text generated by our own procedural
  grammar (no copied text).
- Tokenizer: byte-level BPE (`tokenizers`), {info["vocab"]} tokens; special tokens `<unk>`=0, `<s>`=1 (bos,
  prepended on encode), `</s>`=2 (eos), `<pad>`=3.
- Model: `LlamaForCausalLM`, hidden {args.hidden}, {args.layers} layers, {args.heads} heads, {args.kv_heads} KV heads
  (GQA), intermediate {args.intermediate}, max positions {args.max_positions}, rope_theta 10000, tied
  embeddings; {info["params"]:,} parameters, stored in float16.
- Training: AdamW (lr {args.lr}, betas 0.9/0.95, weight decay 0.1), {args.warmup} warmup steps then cosine decay,
  {args.steps} steps of {args.batch} random windows x {args.seq_len} tokens; {info["train_s"]:.0f} s wall time
  on 2 CPU cores (about 5 minutes when the machine is idle; more when other jobs share it); final loss (mean
  of the last 20 steps) {info["final_loss"]:.3f}.

## License

The training corpus is our own procedurally generated text, dedicated to the public domain (CC0 1.0); these
weights and tokenizer files are likewise released under CC0 1.0.

## Files (bytes)

| file | size |
|---|---|
{rows}

Total (without this README): {sum(sizes.values()):,} bytes.

## Greedy samples (40 new tokens)

{sample_md}
"""
    with open(os.path.join(out, "README.md"), "w", encoding="utf-8") as f:
        f.write(text)


def save(model: LlamaForCausalLM, tok: PreTrainedTokenizerFast, out: str) -> None:
    os.makedirs(out, exist_ok=True)
    model.half()
    model.config.dtype = torch.float16
    model.generation_config = GenerationConfig(
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
        do_sample=False, max_new_tokens=64)
    kwargs = {}
    if "safe_serialization" in inspect.signature(model.save_pretrained).parameters:
        kwargs["safe_serialization"] = True  # transformers 4.x; 5.x always writes safetensors
    model.save_pretrained(out, **kwargs)
    tok.save_pretrained(out)
    # Readable by transformers 4.x as well as 5.x.
    _patch_json(os.path.join(out, "config.json"), {"torch_dtype": "float16", "dtype": "float16"})
    _patch_json(os.path.join(out, "tokenizer_config.json"), {"tokenizer_class": "PreTrainedTokenizerFast"})


def _patch_json(path: str, updates: dict) -> None:
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    data.update(updates)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2, sort_keys=True)
        f.write("\n")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num-sentences", type=int, default=8000)
    p.add_argument("--vocab-size", type=int, default=1024)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--intermediate", type=int, default=688)
    p.add_argument("--max-positions", type=int, default=512)
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--warmup", type=int, default=50)
    p.add_argument("--threads", type=int, default=2)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    random.seed(args.seed)
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    torch.use_deterministic_algorithms(True)

    docs = make_documents(args.seed, args.num_sentences)
    tok = build_tokenizer(docs, args.vocab_size, args.max_positions)
    data = encode_corpus(tok, docs)
    print(f"corpus: {len(docs)} docs, {sum(map(len, docs)):,} chars, {len(data):,} tokens, vocab {len(tok)}")

    model = LlamaForCausalLM(make_config(tok, args))
    params = sum(p.numel() for p in model.parameters())
    print(f"model: {params:,} parameters")
    t0 = time.time()
    losses = train(model, data, args)
    train_s = time.time() - t0
    final = sum(losses[-20:]) / len(losses[-20:])
    print(f"trained {args.steps} steps in {train_s:.0f} s, final loss {final:.3f}")

    save(model, tok, args.out)
    model.float()
    outs = samples(model, tok)
    for s in outs:
        print("sample:", repr(s))
    rel_out = os.path.relpath(args.out) if not os.path.relpath(args.out).startswith("..") else args.out
    defaults = vars(parse_args([]))
    extra = " ".join(f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items()
                     if k != "out" and v != defaults[k])
    command = f"python -m aspen.demo.build --out {rel_out}" + (f" {extra}" if extra else "")
    write_readme(args.out, args, {
        "command": command, "corpus_chars": sum(map(len, docs)), "corpus_tokens": len(data), "vocab": len(tok),
        "params": params, "train_s": train_s, "final_loss": final, "samples": outs})
    total = sum(_dir_sizes(args.out).values())
    print(f"wrote {args.out}: {total:,} bytes")


if __name__ == "__main__":
    main()
