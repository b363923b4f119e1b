"""One in-process server with gRPC and the HTTP API over the tiny model and its adapters, shared by the HTTP
tests; ``reference`` holds greedy gRPC outputs to compare HTTP outputs with."""
from __future__ import annotations

import openai
import pytest

from clients.client import AspenClient
from tests.helpers.server import ServerThread, shared_assets

PROMPT = "The quick brown fox"
REFERENCE_TOKENS = 12


@pytest.fixture(scope="package")
def http_server(tmp_path_factory):
    s = ServerThread(shared_assets(tmp_path_factory), http=True, engine={"max_model_len": 256})
    with AspenClient(s.address, timeout=30) as c:
        s.reference = {a: c.generate(PROMPT, a, max_new_tokens=REFERENCE_TOKENS, temperature=0.0, ignore_eos=True)
                       for a in (None, "a1", "team/a2")}
    yield s
    s.stop()


@pytest.fixture(scope="package")
def client(http_server) -> openai.OpenAI:
    with openai.OpenAI(base_url=http_server.http_url, api_key="unused", max_retries=0, timeout=60) as c:
        yield c
