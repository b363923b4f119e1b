"""One adapter (or search candidate) in fused training: its weights, optimizer, learning-rate schedule, data
order, accumulation and evaluation history; what :class:`~aspen.train.trainer.Trainer` steps."""
from __future__ import annotations

import logging
import math

import torch

from aspen.train.adapter import TrainableLora
from aspen.train.config import AdapterConfig, AdapterSpec
from aspen.train.data import DataStream, Example

log = logging.getLogger(__name__)


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
