"""Training mode: fused multi-adapter training on a tiny model, checked against PEFT and against itself."""
from __future__ import annotations

import copy
import json
import logging
import math
import os
import random
import re
import shutil
import sys
import types

import pytest
import torch
from safetensors.torch import load_file

import aspen
from aspen.kernels.cpu_kernels import kernel
from aspen.train.config import TrainConfigError, load_config, parse_config
from aspen.train.data import IGNORE, PromptTemplate, load_records, tokenize
from aspen.train.search import SuccessiveHalving
from aspen.train.trainer import Trainer, lr_at
from tests.helpers.adapters import ALL7
from tests.helpers.fake_client import recording_client
from tests.helpers.tiny_models import hf_model, make_checkpoint

WORDS = ("the", "quick", "brown", "fox", "jumps", "over", "lazy", "dog", "a", "small", "cat", "sat", "by", "warm",
         "fire", "and", "looked", "at", "rain", "tom", "took", "red", "ball")
SEED_EXAMPLE = "/work/shared/seed/aspen-example"


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny matmuls: one thread is faster than two, and immune to other processes on the machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def task(kind: str, n: int, seed: int = 0) -> list[dict]:
    """A toy prompt -> completion task: reverse four words, or repeat each word twice."""
    r = random.Random(seed)
    out = []
    for _ in range(n):
        ws = [r.choice(WORDS) for _ in range(4)]
        comp = reversed(ws) if kind == "rev" else (w for w in ws for _ in (0, 1))
        out.append({"prompt": " ".join(ws) + " =>", "completion": " " + " ".join(comp)})
    return out


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    base = make_checkpoint(str(root / "base"))
    for kind in ("rev", "dup"):
        with open(root / f"{kind}.json", "w") as f:
            json.dump(task(kind, 40, seed=len(kind)), f)
    return types.SimpleNamespace(root=root, base=base, lm=aspen.load_model(base, progress=False))


def adapter(env, name: str, kind: str, **kw) -> dict:
    return {"name": name, "data": str(env.root / f"{kind}.json"), "val_split": 8, "r": 8, "alpha": 16, "dropout": 0.0,
            "lr": 1e-2, "batch_size": 4, "micro_batch_size": 2, "max_steps": 6, "eval_every_steps": 3,
            "target_modules": ALL7, "seed": 1, **kw}


def train(env, out: str, *adapters: dict, lm=None, **kw):
    cfg = parse_config({"output_dir": str(env.root / out), "adapters": list(adapters), **kw})
    trainer = Trainer(lm or env.lm, cfg, progress=False)
    return trainer, trainer.train()


def weights(path: str) -> dict[str, torch.Tensor]:
    return load_file(os.path.join(path, "adapter_model.safetensors"))


def read_log(path: str) -> dict:
    with open(os.path.join(path, "training_log.json")) as f:
        return json.load(f)


@pytest.fixture(scope="module")
def fused(env):
    specs = [adapter(env, "rev", "rev"), adapter(env, "dup", "dup", r=4, target_modules=["q_proj", "v_proj", "down_proj"],
                                                   use_rslora=True, seed=7, lr_schedule="cosine", warmup_steps=2)]
    trainer, out = train(env, "fused", *specs)
    return specs, trainer, out


def test_fused_training_lowers_val_loss_and_equals_training_alone(env, fused):
    specs, trainer, out = fused
    assert sorted(out) == ["dup", "rev"]
    for t in trainer.trainees:
        assert t.step == 6 and len(t.val_curve) == 2
        assert t.val_curve[-1][1] < t.initial_val - 0.3, (t.label, t.initial_val, t.val_curve)
    for spec in specs:
        _, alone = train(env, f"alone-{spec['name']}", spec)
        a, b = weights(out[spec["name"]]), weights(alone[spec["name"]])
        assert a.keys() == b.keys()
        assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-5
        assert any(b[k].abs().max() > 0 for k in b if "lora_B" in k)  # the adapters really moved


def test_saved_adapter_loads_in_peft_with_the_same_logits(env, fused):
    from peft import PeftModel

    _, _, out = fused
    ids = tokenize([task("rev", 1, seed=99)[0]], env.lm.tokenizer, PromptTemplate("{output}", "{output}"), 64,
                   False)[0].ids
    for name, path in out.items():
        log = read_log(path)
        assert log["name"] == name and log["train_loss"] and log["val_loss"] and log["config"]["name"] == name
        with torch.no_grad():
            ref = PeftModel.from_pretrained(hf_model(env.base), path).eval()(torch.tensor([ids])).logits[0]
        ours = env.lm.score(ids, adapter=path)
        assert (ours - ref).abs().max().item() < 1e-4
        assert (ours - env.lm.score(ids)).abs().max().item() > 1e-3


def test_loss_counts_only_response_tokens_and_never_padding(env):
    recs = task("rev", 3, seed=5)
    trainer = Trainer(env.lm, parse_config({"output_dir": str(env.root / "mask"), "adapters": [
        adapter(env, "m", "rev")]}), progress=False)
    t = trainer.trainees[0]
    tok = env.lm.tokenizer
    examples = tokenize(recs, tok, PromptTemplate("{output}", "{output}"), 64, train_on_inputs=False)
    for rec, ex in zip(recs, examples):
        assert ex.n_prompt == len(tok(rec["prompt"])["input_ids"]) and ex.num_targets > 1
        tg = ex.targets()
        assert tg[:ex.n_prompt - 1] == [IGNORE] * (ex.n_prompt - 1) and tg[-1] == IGNORE
        assert sum(x != IGNORE for x in tg) == ex.num_targets
    assert all(ex.n_prompt == 1 for ex in tokenize(recs, tok, PromptTemplate("{output}", "{output}"), 64, True))
    # B = 0 at init: our fused loss is the base model's; compare with HF on a right-padded batch
    sums, counts = trainer._forward_nll([(t, examples)], dropout=False)
    ours = (sums / torch.tensor(counts)).item()
    n = max(len(ex.ids) for ex in examples)
    ids = torch.tensor([list(ex.ids) + [3] * (n - len(ex.ids)) for ex in examples])
    mask = torch.tensor([[1] * len(ex.ids) + [0] * (n - len(ex.ids)) for ex in examples])
    masked = torch.tensor([[IGNORE] * ex.n_prompt + list(ex.ids[ex.n_prompt:]) + [IGNORE] * (n - len(ex.ids))
                           for ex in examples])
    hf = hf_model(env.base)
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask, labels=masked).loss.item()
        with_prompt = hf(input_ids=ids, attention_mask=mask, labels=torch.where(mask.bool(), ids, IGNORE)).loss.item()
        with_pad = hf(input_ids=ids, attention_mask=mask,
                      labels=torch.where(masked == IGNORE, masked, ids).masked_fill(mask == 0, 3)).loss.item()
    assert abs(ours - ref) < 1e-4
    assert abs(ours - with_prompt) > 1e-3 and abs(ours - with_pad) > 1e-3  # prompt or padding labels would show


@pytest.mark.parametrize("source", ["kernel", "torch"])
def test_dropout_gradients_match_peft_with_the_same_masks(env, monkeypatch, source):
    """Our gradients with dropout equal PEFT's when PEFT's dropout modules apply the masks our op drew (in call
    order: q, k, v, o, gate, up, down per layer), for both mask sources: the CPU kernel's counter-based draw
    (regenerated in backward) and torch's bernoulli_ masks (kept)."""
    from peft import LoraConfig, get_peft_model

    from aspen.lora import grad as lora_grad

    if source == "torch":
        monkeypatch.setattr(lora_grad, "dropout_apply", lambda *a, **k: None)
    elif kernel() is None:
        pytest.skip("the CPU kernels are not available")
    drawn: list[torch.Tensor] = []
    draw = lora_grad._drop

    def recording(xs, p):
        xd, mask = draw(xs, p)
        assert isinstance(mask, int) == (source == "kernel")
        drawn.append(lora_grad.keep_mask(xs, p, mask))
        return xd, mask

    monkeypatch.setattr(lora_grad, "_drop", recording)
    cfg = parse_config({"output_dir": str(env.root / "drop"), "adapters": [
        adapter(env, "d", "rev", r=4, alpha=8, dropout=0.3)]})
    trainer = Trainer(env.lm, cfg, progress=False)
    t = trainer.trainees[0]
    with torch.no_grad():
        for k, p in t.lora.params.items():
            p.normal_(0, 0.1, generator=torch.Generator().manual_seed(len(k)))
    ex = t.train_set[0]

    def ours(dropout: bool) -> dict:
        t.lora.zero_grad(set_to_none=True)
        torch.manual_seed(123)
        sums, counts = trainer._forward_nll([(t, [ex])], dropout=dropout)
        (sums[0] / counts[0]).backward()
        return {k: p.grad.clone() for k, p in t.lora.params.items()}

    got, no_drop = ours(True), ours(False)
    masks = list(drawn)
    assert len(masks) == 7 * env.lm.config.num_hidden_layers
    assert all(0.4 < m.mean().item() < 0.95 for m in masks)  # p = 0.3: about 70% kept

    class Replay(torch.nn.Module):  # PEFT's dropout, applying our masks in order
        def forward(self, x):
            return x * masks.pop(0) / (1 - 0.3)

    peft = get_peft_model(hf_model(env.base), LoraConfig(r=4, lora_alpha=8, lora_dropout=0.3, target_modules=ALL7))
    mods = dict(peft.named_modules())
    for layer in range(env.lm.config.num_hidden_layers):
        for proj in ALL7:
            block = "self_attn" if proj in ALL7[:4] else "mlp"
            m = mods[f"base_model.model.model.layers.{layer}.{block}.{proj}"]
            m.lora_dropout["default"] = Replay()
            with torch.no_grad():
                m.lora_A["default"].weight.copy_(t.lora.A(layer, proj))
                m.lora_B["default"].weight.copy_(t.lora.B(layer, proj))
    peft.train()
    labels = [IGNORE] * ex.n_prompt + list(ex.ids[ex.n_prompt:])
    peft(input_ids=torch.tensor([ex.ids]), labels=torch.tensor([labels])).loss.backward()
    worst = 0.0
    for layer in range(env.lm.config.num_hidden_layers):
        for proj in ALL7:
            block = "self_attn" if proj in ALL7[:4] else "mlp"
            m = mods[f"base_model.model.model.layers.{layer}.{block}.{proj}"]
            for kind, ref in (("A", m.lora_A["default"].weight.grad), ("B", m.lora_B["default"].weight.grad)):
                g = got[f"l{layer}_{proj}_{kind}"]
                worst = max(worst, ((g - ref).abs().max() / ref.abs().max()).item())
                assert (g - no_drop[f"l{layer}_{proj}_{kind}"]).abs().max() > 1e-3 * ref.abs().max()
    assert worst < 1e-3 and not masks


def test_scattered_segment_with_dropout_matches_a_replayed_reference():
    """Differentiable segments of scattered tokens (the trainer builds contiguous ones) take the gather / scatter
    path with torch's dropout: its output and gradients equal a reference that replays the same bernoulli draws
    (one mask per packed projection, in order) with plain autograd."""
    from aspen.lora.group import GroupPart, GroupWeights
    from aspen.lora.op import LoraBatch, Segment

    g = torch.Generator().manual_seed(0)
    p, n_tok, d_in, width = 0.3, 9, 12, 20
    parts_spec = [(0, 3, 0, 8), (3, 5, 12, 20)]  # two projections: columns 8..12 of the group stay untargeted
    a = torch.randn(5, d_in, generator=g, requires_grad=True)
    bts = [torch.randn(r1 - r0, o1 - o0, generator=g, requires_grad=True) for r0, r1, o0, o1 in parts_spec]

    class Weights:
        def group_weights(self, layer, group):
            return GroupWeights(a, tuple(GroupPart(*spec) for spec in parts_spec), tuple(bts))

    tokens = torch.tensor([1, 4, 5, 8])
    x0, y0, gy = (torch.randn(n_tok, k, generator=g) for k in (d_in, width, width))

    def run(op):
        x = x0.clone().requires_grad_(True)
        torch.manual_seed(7)
        out = op(x, y0.clone())
        grads = torch.autograd.grad(out, [x, a, *bts], gy)
        return out.detach(), grads

    def reference(x, y):
        xs = x.index_select(0, tokens)
        delta = torch.zeros(len(tokens), width)
        for (r0, r1, o0, o1), bt in zip(parts_spec, bts):
            keep = torch.empty_like(xs).bernoulli_(1 - p)  # what F.dropout draws, in the same order
            xa = (xs * (keep / (1 - p))) @ a[r0:r1].t()
            delta = delta.index_put((torch.arange(len(tokens))[:, None], torch.arange(o0, o1)), xa @ bt)
        return y.index_add(0, tokens, delta)

    batch = LoraBatch([Segment(tokens, Weights(), p)])
    ours, our_grads = run(lambda x, y: batch.apply(0, "qkv_proj", x, y))
    ref, ref_grads = run(reference)
    torch.testing.assert_close(ours, ref)
    for mine, theirs in zip(our_grads, ref_grads):
        torch.testing.assert_close(mine, theirs)
    untouched = [r for r in range(n_tok) if r not in tokens.tolist()]
    assert torch.equal(ours[untouched], y0[untouched])  # rows of other tokens
    assert torch.equal(ours[tokens][:, 8:12], y0[tokens][:, 8:12])  # the untargeted columns
    without, _ = run(lambda x, y: LoraBatch([Segment(tokens, Weights(), 0.0)]).apply(0, "qkv_proj", x, y))
    assert not torch.allclose(ours, without)  # the masks did drop units


def test_counter_dropout_kernel_draws_a_reproducible_bernoulli_mask():
    from aspen.kernels.cpu_kernels import dropout_apply

    if kernel() is None:
        pytest.skip("the CPU kernels are not available")
    x = torch.randn(3000, 700)
    y = dropout_apply(x, 0.1, 42)
    keep = y != 0
    assert torch.equal(y[keep], x[keep])
    assert abs(keep.float().mean().item() - 0.9) < 2e-3  # 2.1M draws: sd of the mean 2e-4
    cols = keep.float().mean(dim=0)
    assert (cols - 0.9).abs().max() < 0.03  # no column is favoured (3000 draws each: sd 0.0055)
    assert torch.equal(dropout_apply(x, 0.1, 42), y)  # a pure function of (seed, index)
    other = dropout_apply(x, 0.1, 43) != 0
    assert abs((other & keep).float().mean().item() - 0.81) < 2e-3  # independent of another seed's mask
    acc = torch.ones_like(x)
    assert torch.equal(dropout_apply(x, 0.1, 42, acc=acc), y + 1)
    assert dropout_apply(x.t(), 0.1, 42) is None  # not contiguous: the caller's torch path


def test_early_stopping_on_plateau_leaves_the_others_training(env):
    flat = adapter(env, "flat", "rev", lr=1e-7, early_stopping={"patience": 2, "min_delta": 0.01,
                                                               "eval_every_steps": 1}, max_steps=20)
    busy = adapter(env, "busy", "dup", max_steps=8)
    trainer, out = train(env, "es", flat, busy)
    stopped, other = trainer.trainees
    assert stopped.status == "early_stopped" and stopped.step == 3 and len(stopped.val_curve) == 3
    assert other.status == "completed" and other.step == 8
    log = read_log(out["flat"])
    assert log["status"] == "early_stopped" and log["best_step"] == 1 and log["saved_step"] == 1


def test_search_keeps_the_best_candidate(env):
    spec = adapter(env, "s", "rev", lr=[1e-6, 1e-2, 1e-5], max_steps=6, eval_every_steps=2, search={"eta": 2})
    trainer, out = train(env, "search", spec)
    log = read_log(out["s"])
    cands = log["search"]["candidates"]
    assert log["search"]["winner"] == 1 and log["config"]["lr"] == 1e-2
    assert [c["hparams"]["lr"] for c in cands] == [1e-6, 1e-2, 1e-5]
    assert cands[1]["status"] == "completed" and cands[1]["steps"] == 6
    assert sorted(c["eliminated_at_rung"] for c in cands if c["index"] != 1) == [1, 2]
    assert all(c["steps"] < 6 and c["val_loss"] for c in cands if c["index"] != 1)
    best = trainer.trainees[1]
    assert torch.equal(weights(out["s"])["base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"],
                       best.best_state["params.l0_q_proj_B"])


def test_successive_halving_rule():
    sh = SuccessiveHalving(5, eta=2)
    inf = math.inf
    assert sh.update([0] * 5, [inf] * 5, [False] * 5) == []
    assert sorted(sh.update([1] * 5, [5, 1, 4, 2, 3], [False] * 5)) == [0, 2]  # keep ceil(5/2) = 3
    assert sh.contenders == [1, 3, 4]
    assert sh.update([1, 2, 1, 1, 2], [5, 1, 4, 2, 3], [False, False, False, True, False]) == [4]  # 3 finished
    assert sh.update([1, 3, 1, 1, 3], [5, 1, 4, 0.5, 3], [False, False, False, True, False]) == [1]
    assert sh.winner([5, 1, 4, 0.5, 3]) == 3 and sh.eliminated == {0: 1, 2: 1, 4: 2, 1: 3}


def test_resume_equals_uninterrupted_bit_for_bit(env):
    specs = [adapter(env, "a", "rev", dropout=0.1, save_every_steps=2, max_steps=5),
             adapter(env, "b", "dup", dropout=0.2, save_every_steps=2, max_steps=4, batch_size=6, seed=3,
                     optimizer="sgd", momentum=0.9, lr=0.05)]
    _, full = train(env, "full", *specs)
    cfg = parse_config({"output_dir": str(env.root / "resumed"), "adapters": specs})
    first = Trainer(env.lm, cfg, progress=False)
    assert first.train(stop_after=9) == {}  # killed mid-way, past a checkpoint, mid gradient accumulation
    torch.manual_seed(999)  # a new process has another RNG state
    out = Trainer(env.lm, cfg, progress=False, resume=True).train()
    for name in ("a", "b"):
        a, b = weights(full[name]), weights(out[name])
        assert all(torch.equal(a[k], b[k]) for k in a)
        assert read_log(full[name])["val_loss"] == read_log(out[name])["val_loss"]


def test_aspen_format_config_trains_via_the_cli_and_notifies_the_server(env, tmp_path, monkeypatch, caplog):
    with open(os.path.join(SEED_EXAMPLE, "finetune.json")) as f:
        raw = json.load(f)
    os.makedirs(tmp_path / "data")
    os.makedirs(tmp_path / "template")
    shutil.copy(os.path.join(SEED_EXAMPLE, "template_demo.json"), tmp_path / "template" / "template_demo.json")
    recs = [{"instruction": f"Reverse: {r['prompt'][:-3]}", "output": r["completion"].strip()} for r in task("rev", 10)]
    recs[1]["input"] = "four words"
    for name, part in (("data_demo.json", recs[:8]), ("test_data_demo.json", recs[8:])):
        with open(tmp_path / "data" / name, "w") as f:
            json.dump(part, f)
    raw.update(cutoff_len=64, save_step=1, early_stop_test_step=1, expand_right=True)
    for lora in raw["lora"]:
        lora.update(num_epochs=1, batch_size=4, micro_batch_size=2, test_batch_size=2)
    with open(tmp_path / "aspen.json", "w") as f:
        json.dump(raw, f)

    with caplog.at_level(logging.WARNING):
        cfg, unsupported = load_config(str(tmp_path / "aspen.json"))
    assert "train_lora_candidate_num" in caplog.text and "expand_side" in caplog.text
    assert any("train_strategy" in u for u in unsupported) and any("expand_right" in u for u in unsupported)
    c0, c2 = cfg.adapters[0].candidates[0], cfg.adapters[2].candidates[0]
    assert (c0.optimizer, c0.momentum, c0.lr, c0.eval_batch_size, c0.save_every_steps) == ("sgd", 0.9, 1e-2, 2, 1)
    assert c0.target_modules == ("q_proj", "k_proj", "v_proj", "o_proj") and c0.early_stopping.eval_every_steps == 1
    assert set(c2.target_modules) == set(ALL7) and c2.r == 16 and cfg.max_concurrent == 2
    assert c0.val_data == str(tmp_path / "data" / "test_data_demo.json") and c0.cutoff_len == 64

    calls = []

    FakeClient = recording_client(calls)

    monkeypatch.setitem(sys.modules, "clients.client", types.SimpleNamespace(AspenClient=FakeClient))
    from aspen.cli import main

    out = tmp_path / "out"
    assert main(["train", "--config", str(tmp_path / "aspen.json"), "--base-model", env.base, "--out", str(out),
                 "--server", "localhost:50051", "--no-progress"]) == 0
    assert sorted(c[1] for c in calls) == ["lora_0", "lora_1", "lora_2"]
    for addr, name, path in calls:
        assert addr == "localhost:50051" and path == str(out / name)
        assert os.path.isfile(os.path.join(path, "adapter_config.json")) and read_log(path)["steps"] == 2


def test_nf4_base_trains_and_serves(env):
    lm = aspen.load_model(env.base, quantize="nf4", progress=False)
    _, out = train(env, "nf4", adapter(env, "q", "rev", max_steps=3, lr=2e-2, eval_every_steps=None), lm=lm)
    ids = list(range(5, 25))
    with_adapter, base = lm.score(ids, adapter=out["q"]), lm.score(ids)
    assert torch.isfinite(with_adapter).all() and (with_adapter - base).abs().max().item() > 1e-3
    # serving on a CPU with AVX512-BF16 repacks the 4-bit weights for a kernel without backward: refused
    if any(getattr(m.weight.quant_state, "packing_format_for_cpu", False) for m in lm.model.modules()
           if isinstance(m, bnb_linear(4))):
        with pytest.raises(aspen.AspenError, match="already used for CPU inference"):
            train(env, "nf4-again", adapter(env, "q", "rev", max_steps=1), lm=lm)


def bnb_linear(bits: int):
    import bitsandbytes as bnb

    return bnb.nn.Linear4bit if bits == 4 else bnb.nn.Linear8bitLt


@pytest.mark.parametrize("mode", ["nf4", "int8"])
def test_quantized_base_gradients_equal_the_dequantized_base(env, mode):
    """Gradients reach the adapters through every quantized projection (no inference-only kernel on the way)."""
    import bitsandbytes as bnb
    from torch import nn

    lm = aspen.load_model(env.base, quantize=mode, progress=False)
    ref = copy.deepcopy(lm)
    for block in (mod for layer in ref.model.model.layers for mod in (layer.self_attn, layer.mlp)):
        for name, m in list(block.named_children()):
            if isinstance(m, bnb_linear(4)):
                w = bnb.functional.dequantize_4bit(m.weight.data, m.weight.quant_state)
            elif isinstance(m, bnb_linear(8)):
                w = m.weight.CB.float() * m.weight.SCB.float()[:, None] / 127
            else:
                continue
            setattr(block, name, nn.Linear(w.shape[1], w.shape[0], bias=False).requires_grad_(False))
            getattr(block, name).weight.copy_(w)

    def grads(model) -> dict[str, torch.Tensor]:
        trainer = Trainer(model, parse_config({"output_dir": str(env.root / "g"), "adapters": [
            adapter(env, "g", "rev", r=4)]}), progress=False)
        t = trainer.trainees[0]
        with torch.no_grad():
            for k, p in t.lora.params.items():
                p.normal_(0, 0.1, generator=torch.Generator().manual_seed(len(k)))
        from aspen.train.trainer import trainable_base

        with trainable_base(model.model):
            sums, counts = trainer._forward_nll([(t, t.train_set[:2])], dropout=False)
        (sums[0] / counts[0]).backward()
        return {k: p.grad for k, p in t.lora.params.items()}

    got, want = grads(lm), grads(ref)
    assert max(((got[k] - want[k]).abs().max() / want[k].abs().max()).item() for k in got) < 1e-4


def test_config_errors_name_the_field(env):
    good = adapter(env, "x", "rev")
    cases = [({"lr": -1}, "adapter 'x': lr must be"), ({"batch_size": 3}, "batch_size must be a multiple"),
             ({"target_modules": ["w9"]}, "target_modules"), ({"bogus": 1}, "unknown field(s) ['bogus']"),
             ({"batch_size": [4, 8]}, "['batch_size'] may not be lists"),
             ({"val_split": 0, "early_stopping": {"patience": 1}}, "early_stopping must be used with val_data"),
             ({"early_stopping": {"patience": 0}}, "early_stopping: patience must be an int >= 1"),
             ({"lr": [1e-3, 1e-3]}, "lr must be a non-empty list of distinct values")]
    for change, msg in cases:
        with pytest.raises(TrainConfigError, match=re.escape(msg)):
            parse_config({"adapters": [{**good, **change}]})
    with pytest.raises(TrainConfigError, match="quantize must be one of"):
        parse_config({"adapters": [good], "quantize": "int3"})


def test_data_kinds_templates_and_cutoff(env, tmp_path):
    path = tmp_path / "mixed.jsonl"
    rows = [{"instruction": "Say hi", "output": "hi"}, {"instruction": "Add", "input": "1 2", "output": "3"},
            {"prompt": "a =>", "completion": " b"}, {"text": "the cat sat"}]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    recs = load_records(str(path))
    assert recs == rows
    tpl = PromptTemplate("I: {instruction} In: {input} O: {output}!", "I: {instruction} O: {output}!")
    tok = env.lm.tokenizer
    exs = tokenize(recs, tok, tpl, 64, False)
    decode = [tok.decode(list(e.ids[e.n_prompt:])) for e in exs]
    assert decode[:3] == ["hi!</s>", "3!</s>", " b</s>"] and tok.decode(list(exs[3].ids)) == "the cat sat</s>"
    assert tok.decode(list(exs[1].ids[:exs[1].n_prompt])) == "I: Add In: 1 2 O: "
    assert exs[3].n_prompt == 1
    short = tokenize(recs, tok, tpl, 4, False)  # prompts longer than 4 tokens leave no target: dropped
    assert all(len(e.ids) <= 4 and e.num_targets >= 1 for e in short) and len(short) < len(exs)
    with pytest.raises(TrainConfigError, match="record 0"):
        tokenize([{"question": "?"}], tok, tpl, 64, False)
    assert lr_at(parse_config({"adapters": [adapter(env, "w", "rev", lr_schedule="cosine", warmup_steps=2)]})
                 .adapters[0].candidates[0], 0, 10) == pytest.approx(1e-2 / 2)


def test_trained_adapter_is_served_by_a_running_server_without_restart(env, tmp_path):
    from clients.client import AspenClient
    from tests.helpers.server import ServerThread

    ads = tmp_path / "served"
    os.makedirs(ads)
    server = ServerThread({"base": env.base, "adapters": str(ads)})
    try:
        cfg = tmp_path / "train.yaml"
        spec = adapter(env, "rev", "rev", max_steps=4)
        cfg.write_text(json.dumps({"adapters": [spec]}))  # JSON is YAML
        from aspen.cli import main

        assert main(["train", "--config", str(cfg), "--base-model", env.base, "--out", str(ads),
                     "--server", server.address, "--no-progress"]) == 0
        with AspenClient(server.address, timeout=30) as c:
            info = {a.adapter_id: a for a in c.list_adapters()}
            assert info["rev"].registered and info["rev"].rank == 8
            tuned = c.generate("tom took =>", adapter="rev", max_new_tokens=6, temperature=0.0, ignore_eos=True)
    finally:
        server.stop()
    ids = env.lm.tokenizer("tom took =>")["input_ids"]
    for _ in range(6):  # greedy decoding with the adapter we saved, through our own engine
        ids.append(int(env.lm.score(ids, adapter=str(ads / "rev"))[-1].argmax()))
    assert list(tuned.token_ids) == ids[-6:]


def test_demo_adapter_tasks_are_deterministic_and_cached(tmp_path, monkeypatch):
    from aspen.demo import adapters as demo

    for name in demo.DEMO_ADAPTERS:
        assert demo.task_records(name, n=12) == demo.task_records(name, n=12)
    for rec in demo.task_records("double", n=12):
        words = rec["completion"].removeprefix(",").split()
        assert words and words[::2] == words[1::2]
    for rec in demo.task_records("list", n=12):
        lines = rec["completion"].removeprefix(",").strip("\n").split("\n")
        assert [line.split(". ")[0] for line in lines] == [str(i) for i in range(1, len(lines) + 1)]
    assert demo.task_records("reverse", n=1)[0]["completion"] != demo.task_records("double", n=1)[0]["completion"]
    cfg = demo.demo_config(str(tmp_path), str(tmp_path / "out"))
    assert [s.name for s in cfg.adapters] == list(demo.DEMO_ADAPTERS)

    out = tmp_path / "ads"
    for name in demo.DEMO_ADAPTERS:
        os.makedirs(out / name)
        for f in demo.ADAPTER_FILES:
            (out / name / f).write_text("{}")
    (out / demo.MARKER).write_text(json.dumps({"version": demo.VERSION}))

    def no_training(*a, **k):
        raise AssertionError("a complete set of demo adapters must not be retrained")

    monkeypatch.setattr("aspen.train.trainer.Trainer", no_training)
    assert demo.ensure_demo_adapters("no-base-needed", str(out)) == list(demo.DEMO_ADAPTERS)
