"""The load tester's HTTP side: one request of a workload sent to the OpenAI-compatible API
(``POST /v1/completions``, with httpx; streamed responses read as Server-Sent Events with httpx-sse), and the
server's model facts from ``GET /v1/models``.

A request is the gRPC driver's (:mod:`clients.loadtest.driver`): the same prompt (token ids or text), adapter
(the body's ``model``; the base model's served name for none), ``max_tokens``, temperature and ``ignore_eos``.
Streamed, each chunk is one engine output (the server sends one per generated token), so the first chunk's arrival
is the time to first token; the token count comes from the final usage (``stream_options.include_usage``).
Failures are counted as ``HTTP_<status>`` (with the OpenAI error message), or ``STREAM_ERROR`` for an error event
inside a stream.
"""
from __future__ import annotations

import json
import ssl
import time
from dataclasses import dataclass

import httpx
from httpx_sse import aconnect_sse


@dataclass(frozen=True)
class ServerFacts:
    """What the load tester needs of a server, as ``GET /v1/models`` gives it (the gRPC GetModelInfo's names)."""

    base_model: str
    vocab_size: int
    max_context_tokens: int
    device: str = ""


def base_url(address: str, tls_ca: str | None) -> str:
    return f"{'https' if tls_ca else 'http'}://{address}/v1"


def http_client(address: str, token: str | None, tls_ca: str | None, timeout_s: float,
                sync: bool = False) -> httpx.AsyncClient | httpx.Client:
    """A client for the API at ``address`` (HOST:PORT), with the bearer token and the TLS CA when given; no
    connection limit (an open-loop run may have every request in flight)."""
    kw = {"base_url": base_url(address, tls_ca) + "/", "timeout": timeout_s,
          "headers": {"Authorization": f"Bearer {token}"} if token else {},
          "verify": ssl.create_default_context(cafile=tls_ca) if tls_ca else True}
    if sync:
        return httpx.Client(**kw)
    return httpx.AsyncClient(limits=httpx.Limits(max_connections=None, max_keepalive_connections=None), **kw)


def server_facts(address: str, token: str | None = None, tls_ca: str | None = None) -> ServerFacts:
    """The base model's name, vocabulary size and context length (``GET /v1/models``); httpx errors propagate."""
    with http_client(address, token, tls_ca, 30.0, sync=True) as client:
        r = client.get("models")
        r.raise_for_status()
        base = next(m for m in r.json()["data"] if m.get("parent") is None)
    return ServerFacts(base["id"], int(base["vocab_size"]), int(base["max_model_len"]))


async def base_model(client: httpx.AsyncClient) -> str:
    """The served name of the base model (the listing's entry without a parent)."""
    r = await client.get("models")
    r.raise_for_status()
    return next(m["id"] for m in r.json()["data"] if m.get("parent") is None)


async def send(client: httpx.AsyncClient, res, spec, model: str, cfg, t0: float) -> None:
    """Send ``spec`` and fill the :class:`~clients.loadtest.driver.RequestResult` ``res`` (times since ``t0``)."""
    body = {"model": spec.adapter or model, "prompt": spec.prompt, "max_tokens": spec.max_new_tokens,
            "temperature": cfg.temperature, "ignore_eos": cfg.ignore_eos}
    if not cfg.stream:
        r = await client.post("completions", json=body)
        if r.status_code != 200:
            _failed(res, r.status_code, r.content)
            return
        usage = r.json()["usage"]
        res.output_tokens, res.prompt_tokens = usage["completion_tokens"], usage["prompt_tokens"]
        return
    body.update(stream=True, stream_options={"include_usage": True})
    async with aconnect_sse(client, "POST", "completions", json=body) as source:
        if source.response.status_code != 200:
            _failed(res, source.response.status_code, await source.response.aread())
            return
        async for event in source.aiter_sse():
            if event.data == "[DONE]":
                break
            chunk = json.loads(event.data)
            if "error" in chunk:
                res.code, res.error = "STREAM_ERROR", str(chunk["error"].get("message", ""))
                continue
            if chunk["choices"]:
                now = time.perf_counter() - t0
                if res.first_token is None:
                    res.first_token = now
                res.last_token = now
            if chunk.get("usage"):
                res.output_tokens = chunk["usage"]["completion_tokens"]
                res.prompt_tokens = chunk["usage"]["prompt_tokens"]


def _failed(res, status: int, content: bytes) -> None:
    res.code = f"HTTP_{status}"
    try:
        res.error = str(json.loads(content)["error"]["message"])
    except (ValueError, KeyError, TypeError):
        res.error = content[:200].decode("utf-8", "replace")
