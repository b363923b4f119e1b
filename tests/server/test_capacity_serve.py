"""`aspen serve --model DIR` with no sizing options on a long-context model: it starts, logs its capacity and
serves; with a memory utilization too small it exits naming the tokens that fit and the options; the wait
counters are exported as metrics."""
from __future__ import annotations

import os
import re
import subprocess

import pytest
from prometheus_client import generate_latest

from clients.client import AspenClient
from engine import LLMEngine, SamplingParams
from engine.server.metrics import ServerMetrics
from tests.helpers.adapters import ALL7, make_peft_adapter
from tests.helpers.metrics import scrape
from tests.helpers.server import ServeProcess, aspen_command
from tests.helpers.tiny_models import make_checkpoint


@pytest.fixture(scope="module")
def long_context(tmp_path_factory):
    root = tmp_path_factory.mktemp("long")
    base = make_checkpoint(str(root / "base"), "llama", max_position_embeddings=32768)
    for i in range(2):
        make_peft_adapter(base, str(root / "adapters" / f"a{i}"), seed=i, r=8, lora_alpha=16, target_modules=ALL7)
    return {"base": base, "adapters": str(root / "adapters")}


def test_serve_with_no_sizing_options_starts_on_a_long_context(long_context, tmp_path):
    server = ServeProcess(long_context, tmp_path)
    try:
        with AspenClient(server.address, timeout=60) as c:
            reply = c.generate("hello", adapter="a0", max_new_tokens=3, temperature=0.0, ignore_eos=True)
        assert len(reply.token_ids) == 3
        line = re.search(r"capacity: (\d+) tokens of KV \((\d+) sequences of max_model_len=32768.*", server.log())
        assert line and int(line.group(1)) >= 32768 and "adapters of the largest shape (rank 8 on 7" in line.group(0)
        metrics = scrape(server.metrics_port)
        assert re.search(r"^aspen:adapter_page_waits_total 0\.0$", metrics, re.MULTILINE)
        assert re.search(r"^aspen:kv_block_waits_total 0\.0$", metrics, re.MULTILINE)
    finally:
        server.kill()


def test_serve_says_what_fits_when_the_context_does_not(long_context, tmp_path):
    # 8 KiB of KV per token: one 32768-token context is 256 MiB, more than 0.0001 of any machine's memory
    wide = make_checkpoint(str(tmp_path / "wide"), "llama", max_position_embeddings=32768, hidden_size=256,
                           intermediate_size=256, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4)
    cmd = aspen_command() + ["serve", "--model", wide, "--adapter-dir", long_context["adapters"],
                             "--port", "0", "--http-port", "0", "--memory-utilization", "0.0001"]
    env = {**os.environ, "ASPEN_HOME": str(tmp_path / "home")}
    done = subprocess.run(cmd, check=False, capture_output=True, text=True, env=env, timeout=120)
    out = done.stdout + done.stderr
    assert done.returncode != 0, out
    fit = re.search(r"the KV cache holds (\d+) tokens, fewer than max_model_len=32768", out)
    assert fit, out
    assert f"lower --max-model-len to {fit.group(1)} or less" in out and "--memory-utilization" in out
    assert "--kv-cache-mb" in out


def test_waits_for_adapter_pages_are_a_metric(long_context):
    # a device pool of one adapter (56 pages): the second adapter's request waits while the first runs
    llm = LLMEngine(model=long_context["base"], adapter_dir=long_context["adapters"], progress=False,
                    num_kv_blocks=64, lora_pool_pages=56, max_model_len=256)
    metrics = ServerMetrics("m")
    metrics.bind_engine(llm)
    params = SamplingParams(max_new_tokens=4, temperature=0.0, ignore_eos=True)
    llm.generate([[1, 2, 3], [4, 5, 6]], params, adapters=["a0", "a1"])
    text = generate_latest(metrics.registry).decode()
    waits = float(re.search(r"^aspen:adapter_page_waits_total (\S+)$", text, re.MULTILINE).group(1))
    assert waits >= 1 and waits == llm.scheduler.stats().num_adapter_waits
    assert re.search(r"^aspen:kv_block_waits_total 0\.0$", text, re.MULTILINE)
