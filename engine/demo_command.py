"""``aspen demo``: write the embedded demo model (cached) and print a few generations through LLMEngine.

When the demo adapters exist (trained once by ``aspen.demo.adapters``), the same prompt is also answered by each
adapter, to show them side by side.
"""
from __future__ import annotations

import argparse
import os

from aspen.demo import DEMO_PROMPTS, default_home, ensure_demo_base
from aspen.demo.adapters import ensure_demo_adapters
from engine.llm_engine import LLMEngine
from engine.scheduling.sampling_params import SamplingParams


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default=None, help="where to write the demo checkpoint (default: $ASPEN_HOME/demo/base)")
    p.add_argument("--adapters-out", default=None,
                   help="where the demo adapters live (default: $ASPEN_HOME/demo/adapters)")
    p.add_argument("--no-adapters", action="store_true", help="do not train/use the demo adapters")
    p.add_argument("--max-new-tokens", type=int, default=40)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=0)


def run(args: argparse.Namespace) -> int:
    base = ensure_demo_base(args.out)
    print(f"demo base model: {base}")
    adapter_dir = args.adapters_out or os.path.join(default_home(), "demo", "adapters")
    adapters: list[str] = []
    if not args.no_adapters:
        adapters = ensure_demo_adapters(base, adapter_dir)
    llm = LLMEngine(model=base, adapter_dir=adapter_dir if adapters else None, progress=False)
    params = SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature, seed=args.seed)
    outs = llm.generate(list(DEMO_PROMPTS), params)
    for prompt, out in zip(DEMO_PROMPTS, outs):
        print(f"\n>>> {prompt}\n{out.text.strip()}")
    if adapters:
        prompt = DEMO_PROMPTS[0]
        names = [None] + adapters
        outs = llm.generate([prompt] * len(names), params, names)
        print(f"\nThe same prompt, one batch, a different adapter per row:\n>>> {prompt}")
        for name, out in zip(names, outs):
            print(f"[{name or 'base'}] {out.text.strip()}")
    return 0
