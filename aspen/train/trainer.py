"""The fused multi-adapter training loop.

One *fused step* takes the next micro-batch of every active adapter (candidate), packs all their sequences into
one :class:`~aspen.model.batch.FlatBatch` (one :class:`~aspen.model.batch.SeqChunk` per sequence, start_pos 0, its own blocks
of a fresh KV cache, ``adapter_slot`` = the adapter's slot), and runs the frozen base once over it with a
:class:`~aspen.lora.op.LoraBatch` holding one :class:`~aspen.lora.op.Segment` per adapter — the server's LoRA op,
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
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from tqdm import tqdm

from aspen.errors import AspenError
from aspen.lora.op import LoraBatch, Segment
from aspen.model.batch import LOGITS_ALL, FlatBatch, SeqChunk
from aspen.train.config import AdapterSpec, TrainConfig, TrainConfigError
from aspen.train.data import IGNORE, Example, dataset_key, load_dataset
from aspen.train.loss import FrozenHead, token_nll
from aspen.train.search import RULE, SuccessiveHalving
from aspen.train.trainee import Trainee, lr_at  # noqa: F401 -- lr_at: part of this module's interface

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


class Trainer:
    """Trains every adapter of ``config`` on ``lm`` (a :class:`~aspen.language_model.LanguageModel`) in fused batches.

    ``on_saved(name, path)`` is called after each adapter is saved (e.g. to load it into a running server).
    """

    def __init__(self, lm, config: TrainConfig, *, progress: bool = True, resume: bool = False,
                 on_saved: Callable[[str, str], None] | None = None) -> None:
        if lm.packed:
            raise ValueError("Trainer: this model's weights were packed for inference (pack_for_inference); "
                             "load a fresh one to train")
        self.lm, self.model, self.config = lm, lm.model, config
        self.model.requires_grad_(False)  # the base is frozen: autograd reaches only the adapters' A and B
        lm.build_kernels()  # compiled before the first step (the LM head below is packed for the loss)
        self.head = FrozenHead(self.model.lm_head.weight)  # packed once for the loss's two products (CPU fp32)
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
        nll = token_nll(hidden.index_select(0, labelled), self.head, targets)
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
