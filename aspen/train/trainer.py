"""The fused multi-adapter training loop.

One *fused step* takes the next micro-batch of every active adapter (candidate), packs all their sequences into
one :class:`~aspen.batch.FlatBatch` (one :class:`~aspen.batch.SeqChunk` per sequence, start_pos 0, its own blocks
of a fresh KV cache, ``adapter_slot`` = the adapter's slot), and runs the frozen base once over it with a
:class:`~aspen.lora_op.LoraBatch` holding one :class:`~aspen.lora_op.Segment` per adapter — the server's LoRA op,
fed by each adapter's trainable weights. Only the label tokens' hidden states go through the frozen head
(:mod:`aspen.train.loss`, chunked: the [tokens, vocab] logits are never held whole). The loss of adapter k is the
sum of its tokens' NLL over the label tokens of its micro-batch, divided by the number of label tokens in its
whole (accumulated) batch, so accumulating ``batch_size / micro_batch_size`` micro-batches gives exactly the
batch mean. The losses are summed and back-propagated once: a sequence only sees its own adapter, so each
adapter receives exactly the gradient of its own loss. Each adapter then runs its own optimizer step,
learning-rate schedule and evaluation when its own batch is complete.

Evaluation (no dropout, no grad) is fused the same way across the adapters due for it. Early stopping and the
search (:mod:`aspen.train.search`) remove adapters from the fused batch. Checkpoints (``output_dir/checkpoint``)
hold every adapter's weights, pending gradients, optimizer state, data position, curves and the training RNG
(dropout masks; seeded from the first adapter's seed, separate from the caller's), so a resumed run continues
bit-for-bit.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from tqdm import tqdm

from aspen.batch import LOGITS_ALL, FlatBatch, SeqChunk
from aspen.errors import AspenError
from aspen.lora_op import LoraBatch, Segment
from aspen.train.adapter import TrainableLora
from aspen.train.config import AdapterConfig, AdapterSpec, TrainConfig, TrainConfigError
from aspen.train.data import IGNORE, DataStream, Example, dataset_key, load_dataset
from aspen.train.loss import token_nll
from aspen.train.search import RULE, SuccessiveHalving

log = logging.getLogger(__name__)

BLOCK_SIZE = 16
CHECKPOINT = os.path.join("checkpoint", "state.pt")
LOG_NAME = "training_log.json"


@contextmanager
def trainable_base(model: torch.nn.Module) -> Iterator[None]:
    """Run the frozen base in train mode (the base stays frozen: none of its parameters requires grad).

    bitsandbytes' 4-bit layers on a CPU with AVX512-BF16, called in eval mode without grad, repack their weights
    for an inference kernel that has no backward: gradients would silently stop at every such projection. In
    train mode they keep the differentiable dequantize-and-matmul path (int8 layers, too, give the exact input
    gradient of their dequantized weights only in train mode).
    Weights already repacked (a base used for CPU inference before) cannot be unpacked exactly: refused.
    """
    packed = [name for name, m in model.named_modules()
              if getattr(getattr(getattr(m, "weight", None), "quant_state", None), "packing_format_for_cpu", False)]
    if packed:
        raise AspenError(f"the 4-bit base was already used for CPU inference, which repacked {packed[0]} (and "
                         f"{len(packed) - 1} more) for a kernel without backward; load a fresh model to train")
    was = model.training
    model.train()
    try:
        yield
    finally:
        model.train(was)


def lr_at(cfg: AdapterConfig, step: int, total: int) -> float:
    """Learning rate of optimizer step ``step`` (0-based): linear warmup, then constant / linear / cosine decay."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.lr_schedule == "constant":
        return cfg.lr
    frac = (step - cfg.warmup_steps) / max(1, total - cfg.warmup_steps)
    if cfg.lr_schedule == "linear":
        return cfg.lr * max(0.0, 1.0 - frac)
    return cfg.lr * 0.5 * (1.0 + math.cos(math.pi * min(1.0, frac)))


class Trainee:
    """One adapter (or search candidate) in training: weights, optimizer, data order, evaluation history."""

    def __init__(self, slot: int, spec: AdapterSpec, index: int, lm, train: list[Example],
                 val: list[Example]) -> None:
        self.slot, self.spec, self.index = slot, spec, index
        self.cfg = cfg = spec.candidates[index]
        self.label = spec.label(index)
        self.train_set, self.val_set = train, val
        self.lora = TrainableLora(lm.config, cfg.r, cfg.scale, cfg.target_modules, cfg.seed, lm.device)
        params = list(self.lora.parameters())
        if cfg.optimizer == "adamw":
            self.opt: torch.optim.Optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        else:
            self.opt = torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
        self.stream = DataStream(len(train), cfg.batch_size, cfg.micro_batch_size, cfg.seed)
        self.total_steps = cfg.max_steps or cfg.num_epochs * self.stream.steps_per_epoch
        default_eval = max(1, self.total_steps // 4) if len(spec.candidates) > 1 else None
        self.eval_every = cfg.eval_interval or default_eval
        self.step = 0  # optimizer steps done
        self.batch: list[list[int]] = []  # micro-batches of the current step
        self.micro_pos = 0
        self.denom = 0  # label tokens of the current step's whole batch
        self.batch_nll, self.batch_tokens, self.tokens = 0.0, 0, 0
        self.status = "training"  # | completed | early_stopped | eliminated
        self.best_val, self.best_step, self.bad_evals = math.inf, None, 0
        self.best_state: dict[str, torch.Tensor] | None = None
        self.initial_val: float | None = None  # validation loss before training (not a rung / patience eval)
        self.train_curve: list[list[float]] = []  # [step, mean loss of the step's batch]
        self.val_curve: list[list[float]] = []  # [step, validation loss]

    @property
    def done(self) -> bool:
        return self.status != "training"

    def next_micro_batch(self) -> list[Example]:
        if self.micro_pos == 0:
            self.batch = self.stream.next_batch()
            self.denom = sum(self.train_set[i].num_targets for mb in self.batch for i in mb)
        return [self.train_set[i] for i in self.batch[self.micro_pos]]

    def after_micro_batch(self, nll: float, tokens: int) -> bool:
        """Account a micro-batch whose gradient is in ``.grad``; True when it completed an optimizer step."""
        self.micro_pos += 1
        self.batch_nll += nll
        self.batch_tokens += tokens
        self.tokens += tokens
        if self.micro_pos < len(self.batch):
            return False
        lr = lr_at(self.cfg, self.step, self.total_steps)
        for group in self.opt.param_groups:
            group["lr"] = lr
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        self.step += 1
        self.train_curve.append([self.step, self.batch_nll / self.batch_tokens])
        self.micro_pos, self.batch_nll, self.batch_tokens = 0, 0.0, 0
        return True

    def eval_due(self) -> bool:
        last = self.step >= self.total_steps
        return bool(self.val_set) and (last or bool(self.eval_every) and self.step % self.eval_every == 0)

    def record_eval(self, loss: float) -> None:
        self.val_curve.append([self.step, loss])
        es = self.cfg.early_stopping
        if loss < self.best_val - (es.min_delta if es else 0.0):
            self.best_val, self.best_step, self.bad_evals = loss, self.step, 0
            if self.cfg.keep_best:
                self.best_state = {k: v.detach().clone() for k, v in self.lora.state_dict().items()}
        else:
            self.bad_evals += 1
            if es and self.bad_evals >= es.patience:
                self.status = "early_stopped"
                log.info("%s: early stop at step %d (best validation loss %.4f at step %s)", self.label,
                         self.step, self.best_val, self.best_step)

    _FIELDS = ("step", "batch", "micro_pos", "denom", "batch_nll", "batch_tokens", "tokens", "status", "best_val",
               "best_step", "bad_evals", "best_state", "initial_val", "train_curve", "val_curve")

    def state_dict(self) -> dict:
        state = {k: getattr(self, k) for k in self._FIELDS}
        state.update(lora=self.lora.state_dict(), opt=self.opt.state_dict(), stream=self.stream.state_dict(),
                     grads={k: p.grad for k, p in self.lora.params.items()})
        return state

    def load_state_dict(self, state: dict) -> None:
        for k in self._FIELDS:
            setattr(self, k, state[k])
        self.lora.load_state_dict(state["lora"])
        self.opt.load_state_dict(state["opt"])
        self.stream.load_state_dict(state["stream"])
        for k, p in self.lora.params.items():
            p.grad = state["grads"][k]


class Trainer:
    """Trains every adapter of ``config`` on ``lm`` (a :class:`~aspen.llm.LanguageModel`) in fused batches.

    ``on_saved(name, path)`` is called after each adapter is saved (e.g. to load it into a running server).
    """

    def __init__(self, lm, config: TrainConfig, *, progress: bool = True, resume: bool = False,
                 on_saved: Callable[[str, str], None] | None = None) -> None:
        self.lm, self.model, self.config = lm, lm.model, config
        self.model.requires_grad_(False)  # the base is frozen: autograd reaches only the adapters' A and B
        self.progress, self.on_saved = progress, on_saved
        self.fused_steps, self.elapsed = 0, 0.0
        datasets: dict[tuple, tuple[list[Example], list[Example]]] = {}
        self.trainees: list[Trainee] = []
        self.groups: list[list[Trainee]] = []
        for spec in config.adapters:
            group = []
            for i, cand in enumerate(spec.candidates):
                key = dataset_key(cand)
                if key not in datasets:
                    datasets[key] = load_dataset(cand, lm.tokenizer)
                group.append(Trainee(len(self.trainees), spec, i, lm, *datasets[key]))
                self.trainees.append(group[-1])
            self.groups.append(group)
        self.searches = [SuccessiveHalving(len(s.candidates), s.search.eta, s.search.rung_every_evals)
                         for s in config.adapters]
        self.saved = [False] * len(config.adapters)
        self.rng = {"cpu": torch.Generator().manual_seed(self.seed).get_state(), "cuda": None}
        if resume:
            self.load_checkpoint()

    # ---- the loop -------------------------------------------------------------------------------------------
    def train(self, stop_after: int | None = None) -> dict[str, str]:
        """Train until every adapter is saved; returns {name: output dir}. ``stop_after`` fused steps: return
        early as if interrupted (the state is then only what the last checkpoint holds).

        Dropout masks come from a training RNG of their own (seeded with the first adapter's seed, saved in
        checkpoints); the caller's global RNG state is left as it was.
        """
        cuda = [self.lm.device] if self.lm.device.type == "cuda" else []
        with torch.random.fork_rng(devices=cuda), trainable_base(self.model):
            self._set_rng(self.rng)
            try:
                return self._loop(stop_after)
            finally:
                self.rng = self._get_rng()

    def _get_rng(self) -> dict:
        cuda = torch.cuda.get_rng_state(self.lm.device) if self.lm.device.type == "cuda" else None
        return {"cpu": torch.get_rng_state(), "cuda": cuda}

    def _set_rng(self, state: dict) -> None:
        torch.set_rng_state(state["cpu"].cpu())
        if self.lm.device.type == "cuda":
            if state["cuda"] is None:
                torch.cuda.manual_seed(self.seed)
            else:
                torch.cuda.set_rng_state(state["cuda"].cpu(), self.lm.device)

    def _loop(self, stop_after: int | None) -> dict[str, str]:
        t0 = time.perf_counter() - self.elapsed
        total = max(t.total_steps * (t.cfg.batch_size // t.cfg.micro_batch_size) for t in self.trainees)
        bar = tqdm(total=total, initial=min(self.fused_steps, total), desc="train", unit="step",
                   disable=not self.progress, dynamic_ncols=True)
        if self.fused_steps == 0:
            with_val = [t for t in self.trainees if t.val_set]
            for t, loss in zip(with_val, self._evaluate(with_val) if with_val else []):
                t.initial_val = loss
        self._finish_adapters()
        try:
            while (active := self._active()) and (stop_after is None or self.fused_steps < stop_after):
                stepped = self._train_step(active)
                self.fused_steps += 1
                due = [t for t in stepped if t.eval_due()]
                if due:
                    for t, loss in zip(due, self._evaluate(due)):
                        t.record_eval(loss)
                for t in stepped:
                    if not t.done and t.step >= t.total_steps:
                        t.status = "completed"
                self._update_search()
                self.elapsed = time.perf_counter() - t0
                self._finish_adapters()
                if any(t.cfg.save_every_steps and t.step % t.cfg.save_every_steps == 0 for t in stepped):
                    self.save_checkpoint()
                bar.update(1)
                bar.set_postfix({t.label: f"{t.train_curve[-1][1]:.3f}" for t in active if t.train_curve},
                                refresh=False)
        finally:
            bar.close()
        if not self._active():
            self.save_checkpoint()
        return {s.name: self.output_path(s) for s, done in zip(self.config.adapters, self.saved) if done}

    def _active(self) -> list[Trainee]:
        todo = [t for t in self.trainees if not t.done]
        return todo[:self.config.max_concurrent] if self.config.max_concurrent else todo

    def _pack(self, items: list[tuple[Trainee, list[Example]]]):
        """One flat batch of every sequence (one chunk each, own blocks), the KV cache it needs (usually none),
        the flat positions of the label tokens (item by item) and their targets."""
        chunks, targets, block = [], [], 0
        for t, examples in items:
            for ex in examples:
                nb = -(-len(ex.ids) // BLOCK_SIZE)
                chunks.append(SeqChunk(ex.ids, 0, range(block, block + nb), adapter_slot=t.slot, logits=LOGITS_ALL))
                block += nb
                targets.extend(ex.targets())
        batch = FlatBatch.build(chunks, BLOCK_SIZE, self.lm.device, self.lm.config.sliding_window)
        # sequences attend only to themselves from position 0: no KV cache is needed, unless a sliding window
        # shorter than a sequence makes attention read keys through the paged path
        fresh = all(p.mask is None for p in batch.prefills)
        kv = None if fresh else self.lm.new_kv_cache(block, BLOCK_SIZE)
        labelled = [i for i, t in enumerate(targets) if t != IGNORE]
        device = self.lm.device
        return (batch, kv, torch.tensor(labelled, dtype=torch.long, device=device),
                torch.tensor([targets[i] for i in labelled], dtype=torch.long, device=device))

    @property
    def seed(self) -> int:
        """Seed of the training RNG (dropout masks): the first adapter's."""
        return self.config.adapters[0].candidates[0].seed

    def _forward_nll(self, items, dropout: bool):
        """Per item: the summed NLL of its label tokens (a tensor [len(items)]) and their number."""
        batch, kv, labelled, targets = self._pack(items)
        spans, at = [], 0
        for _, examples in items:
            n = sum(len(ex.ids) for ex in examples)
            spans.append(slice(at, at + n))
            at += n
        lora = LoraBatch([Segment(span, t.lora, t.cfg.dropout if dropout else 0.0)
                          for (t, _), span in zip(items, spans)])
        hidden = self.model.final_hidden(batch, kv, lora)  # [T, hidden], every token
        # only the label tokens go through the head: chunked, never the whole [T, vocab] logits at once
        nll = token_nll(hidden.index_select(0, labelled), self.model.lm_head.weight, targets)
        counts = [sum(ex.num_targets for ex in examples) for _, examples in items]
        sums = torch.stack([part.sum() for part in nll.split(counts)])
        return sums, counts

    def _train_step(self, active: list[Trainee]) -> list[Trainee]:
        """One fused forward/backward over a micro-batch of every active adapter; returns those that stepped."""
        items = [(t, t.next_micro_batch()) for t in active]
        with torch.inference_mode(False), torch.enable_grad():
            sums, counts = self._forward_nll(items, dropout=True)
            denoms = torch.tensor([t.denom for t in active], dtype=sums.dtype, device=sums.device)
            (sums / denoms).sum().backward()
        nll = sums.detach().cpu().tolist()
        return [t for t, s, n in zip(active, nll, counts) if t.after_micro_batch(s, n)]

    def _evaluate(self, due: list[Trainee]) -> list[float]:
        """Validation loss (mean NLL over all label tokens) of each adapter in ``due``, fused, without dropout."""
        sums, counts = [0.0] * len(due), [0] * len(due)
        rounds = max(-(-len(t.val_set) // t.cfg.eval_batch_size) for t in due)
        with torch.inference_mode(False), torch.no_grad():
            for r in range(rounds):
                items = [(i, t, t.val_set[r * t.cfg.eval_batch_size:(r + 1) * t.cfg.eval_batch_size])
                         for i, t in enumerate(due)]
                items = [x for x in items if x[2]]
                s, n = self._forward_nll([(t, exs) for _, t, exs in items], dropout=False)
                for (i, _, _), si, ni in zip(items, s.tolist(), n):
                    sums[i] += si
                    counts[i] += ni
        return [s / n for s, n in zip(sums, counts)]

    def _update_search(self) -> None:
        for spec, group, sh in zip(self.config.adapters, self.groups, self.searches):
            if len(group) < 2:
                continue
            dropped = sh.update([len(t.val_curve) for t in group], [t.best_val for t in group],
                                [t.status in ("completed", "early_stopped") for t in group])
            for i in dropped:
                group[i].status, group[i].best_state = "eliminated", None
                log.info("%s: dropped by the search at step %d (best validation loss %.4f)", group[i].label,
                         group[i].step, group[i].best_val)

    # ---- output -----------------------------------------------------------------------------------------------
    def output_path(self, spec: AdapterSpec) -> str:
        return os.path.join(self.config.output_dir, spec.output)

    def _finish_adapters(self) -> None:
        """Save every adapter whose candidates have all finished (the winner's best weights)."""
        for k, (spec, group, sh) in enumerate(zip(self.config.adapters, self.groups, self.searches)):
            if self.saved[k] or not all(t.done for t in group):
                continue
            win = group[sh.winner([t.best_val for t in group])]
            if win.best_state is not None:
                win.lora.load_state_dict(win.best_state)
            path = self.output_path(spec)
            base = self.lm.config.name_or_path or self.lm.path
            win.lora.save(path, win.cfg.alpha, win.cfg.use_rslora, base)
            with open(os.path.join(path, LOG_NAME), "w", encoding="utf-8") as f:
                json.dump(self._log(spec, group, sh, win), f, indent=1)
                f.write("\n")
            self.saved[k] = True
            log.info("%s: saved %s (step %s%s)", spec.name, path,
                     win.best_step if win.best_state is not None else win.step,
                     f", best validation loss {win.best_val:.4f}" if win.val_curve else "")
            if self.on_saved is not None:
                self.on_saved(spec.name, os.path.abspath(path))

    def _log(self, spec: AdapterSpec, group: list[Trainee], sh: SuccessiveHalving, win: Trainee) -> dict:
        def curves(t: Trainee) -> dict:
            return {"status": t.status, "steps": t.step, "tokens": t.tokens, "best_step": t.best_step,
                    "best_val_loss": t.best_val if t.val_curve else None, "initial_val_loss": t.initial_val,
                    "train_loss": t.train_curve,
                    "val_loss": t.val_curve}

        out = {"name": spec.name, "base_model": self.lm.path, "quantize": self.lm.quantize,
               "config": dataclasses.asdict(win.cfg), "total_steps": win.total_steps,
               "saved_step": win.best_step if win.best_state is not None else win.step, **curves(win),
               "elapsed_s": round(self.elapsed, 2), "search": None}
        if len(group) > 1:
            out["search"] = {"rule": RULE, "eta": spec.search.eta, "rung_every_evals": spec.search.rung_every_evals,
                             "searched": list(spec.searched), "winner": win.index, "candidates": [
                                 {"index": t.index, "label": t.label,
                                  "hparams": {k: getattr(t.cfg, k) for k in spec.searched},
                                  "eliminated_at_rung": sh.eliminated.get(t.index), **curves(t)} for t in group]}
        return out

    # ---- checkpoints ------------------------------------------------------------------------------------------
    def _fingerprint(self) -> str:
        specs = [dataclasses.asdict(s) for s in self.config.adapters]
        return json.dumps([specs, self.config.max_concurrent], sort_keys=True, default=str)

    def save_checkpoint(self) -> None:
        path = os.path.join(self.config.output_dir, CHECKPOINT)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        state = {"version": 1, "fingerprint": self._fingerprint(), "fused_steps": self.fused_steps,
                 "elapsed": self.elapsed, "rng": self._get_rng(), "saved": list(self.saved),
                 "trainees": [t.state_dict() for t in self.trainees],
                 "searches": [sh.state_dict() for sh in self.searches]}
        torch.save(state, path + ".tmp")
        os.replace(path + ".tmp", path)

    def load_checkpoint(self) -> bool:
        """Restore the last checkpoint of ``output_dir`` if there is one (False: none, start afresh)."""
        path = os.path.join(self.config.output_dir, CHECKPOINT)
        if not os.path.isfile(path):
            log.warning("no checkpoint at %s: starting from scratch", path)
            return False
        state = torch.load(path, map_location=self.lm.device, weights_only=True)
        if state.get("fingerprint") != self._fingerprint():
            raise TrainConfigError(f"checkpoint {path} was made with a different adapter configuration; "
                                   "resume needs the same config (or remove the checkpoint)")
        for t, s in zip(self.trainees, state["trainees"]):
            t.load_state_dict(s)
        for sh, s in zip(self.searches, state["searches"]):
            sh.load_state_dict(s)
        self.saved, self.fused_steps, self.elapsed = list(state["saved"]), state["fused_steps"], state["elapsed"]
        self.rng = state["rng"]
        log.info("resumed from %s at fused step %d", path, self.fused_steps)
        return True
