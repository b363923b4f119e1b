"""Automatic hyperparameter search by successive halving (pure Python, no torch).

An adapter entry that lists several values (``lr: [1e-4, 3e-4, 1e-3]``, ``r: [8, 16]``) expands into candidates
that train side by side in the same fused batches. The rule:

* rungs sit at evaluation points: rung ``k`` is decided once every contender still training has done
  ``k * rung_every_evals`` validation evaluations (contenders that already finished — early stopped or out of
  steps — take part with what they reached);
* at a rung the contenders are ranked by their best validation loss so far (ties: the earlier candidate), the
  best ``ceil(n / eta)`` are kept and the others stop training at once (they leave the fused batch);
* rungs continue until one contender is left; the winner is the contender with the lowest best validation loss
  when all have finished, and it is saved under the adapter's name.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

RULE = ("successive halving: at rung k (after k*rung_every_evals evals of every contender still training) keep "
        "the ceil(n/eta) contenders with the lowest best validation loss; the winner has the lowest best "
        "validation loss at the end")


class SuccessiveHalving:
    """Which candidates of one adapter are still contenders."""

    def __init__(self, num_candidates: int, eta: int = 2, rung_every_evals: int = 1) -> None:
        if num_candidates < 1 or eta < 2 or rung_every_evals < 1:
            raise ValueError(f"need num_candidates >= 1, eta >= 2, rung_every_evals >= 1; got "
                             f"{num_candidates}, {eta}, {rung_every_evals}")
        self.eta = eta
        self.every = rung_every_evals
        self.contenders = list(range(num_candidates))
        self.rungs_done = 0
        self.eliminated: dict[int, int] = {}  # candidate -> rung at which it was dropped

    def update(self, evals: Sequence[int], best: Sequence[float], finished: Sequence[bool]) -> list[int]:
        """Decide every rung that is due; returns the candidates dropped now.

        ``evals[i]``: evaluations candidate i has done; ``best[i]``: its best validation loss (inf if none);
        ``finished[i]``: it stopped training on its own (early stopping, or all its steps done).
        """
        dropped: list[int] = []
        while len(self.contenders) > 1:
            need = (self.rungs_done + 1) * self.every
            training = [i for i in self.contenders if not finished[i]]
            if not training or any(evals[i] < need for i in training):
                break
            ranked = sorted(self.contenders, key=lambda i: (best[i], i))
            keep = math.ceil(len(ranked) / self.eta)
            self.rungs_done += 1
            for i in ranked[keep:]:
                self.eliminated[i] = self.rungs_done
                dropped.append(i)
            self.contenders = sorted(ranked[:keep])
        return dropped

    def winner(self, best: Sequence[float]) -> int:
        return min(self.contenders, key=lambda i: (best[i], i))

    def state_dict(self) -> dict:
        return {"contenders": list(self.contenders), "rungs_done": self.rungs_done,
                "eliminated": dict(self.eliminated)}

    def load_state_dict(self, state: dict) -> None:
        self.contenders = list(state["contenders"])
        self.rungs_done = int(state["rungs_done"])
        self.eliminated = {int(k): int(v) for k, v in state["eliminated"].items()}
