"""``aspen loadtest make-adapters``: write N random PEFT adapters for a base checkpoint (for load tests and
benchmarks; see :mod:`aspen.lora.peft.synthetic`).

    aspen loadtest make-adapters --model PATH --out DIR --num 1000 --rank 16 --targets all

The ids are ``adapter-0000`` ... (``--prefix``), the ids ``aspen loadtest run --num-adapters`` sends.
"""
from __future__ import annotations

import argparse
import os
import sys

from aspen.lora.peft.synthetic import DEFAULT_PREFIX, TARGET_SETS, make_adapters


def add_arguments(m: argparse.ArgumentParser) -> None:
    m.add_argument("--model", required=True, help="base checkpoint directory (its config.json gives the shapes)")
    m.add_argument("--out", required=True, help=f"adapter root to write {DEFAULT_PREFIX}0000 ... into")
    m.add_argument("--num", type=int, default=100, help="how many adapters (default 100)")
    m.add_argument("--rank", default="16", help="rank, or a comma-separated cycle of ranks (default 16)")
    m.add_argument("--targets", default="all",
                   help=f"{' | '.join(TARGET_SETS)} | comma-separated projections (default all)")
    m.add_argument("--seed", type=int, default=0, help="adapter i is drawn with seed + i (default 0)")
    m.add_argument("--prefix", default=DEFAULT_PREFIX, help=f"id prefix (default {DEFAULT_PREFIX})")
    m.add_argument("--overwrite", action="store_true", help="rewrite adapters that already exist")
    m.add_argument("--workers", type=int, default=None, help="writer threads (default min(4, CPUs))")
    m.add_argument("--no-progress", action="store_true")


def run(args: argparse.Namespace) -> int:
    try:
        ids = make_adapters(args.model, args.out, args.num, rank=args.rank, targets=args.targets, seed=args.seed,
                            prefix=args.prefix, overwrite=args.overwrite, progress=not args.no_progress,
                            workers=args.workers)
    except ValueError as e:
        print(f"aspen loadtest make-adapters: error: {e}", file=sys.stderr)
        return 1
    print(f"{len(ids)} adapters in {os.path.abspath(args.out)} ({ids[0]} .. {ids[-1]})")
    return 0
