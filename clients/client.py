"""A small typed client for ASPEN serve (sync :class:`AspenClient` and asyncio :class:`AsyncAspenClient`).

    with AspenClient("127.0.0.1:50051") as c:
        print(c.generate("Once upon a time", adapter="math", max_new_tokens=32, temperature=0).text)
        for msg in c.stream("Hello", max_new_tokens=16):
            print(msg.text, end="", flush=True)
        print(c.generate([{"role": "user", "content": "What is the capital of France?"}]).text)

A prompt is a text, a list of token ids, or a conversation: a list of ``{"role", "content"}`` mappings (or
``aspen.v1.ChatMessage``), rendered by the server with the model's (or the adapter's) chat template.

Sampling parameters are the fields of ``aspen.v1.SamplingParams`` as keyword arguments (``stop`` may be one
string). ``response_format`` constrains the output (see :func:`format_message`):

    c.generate("Extract:", response_format={"json_schema": {"type": "object", "properties": {...}}})
    c.generate("Yes or no?", response_format={"choice": ["yes", "no"]})
 Errors surface as ``grpc.RpcError``; ``grpc_status.rpc_status.from_call(err)`` decodes the details.
``token`` is sent as ``authorization: Bearer <token>``; ``tls_ca`` (a PEM path or bytes) switches to TLS.
"""
from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from typing import Any

import grpc

from clients.aspen.v1 import aspen_pb2 as pb
from clients.aspen.v1 import aspen_pb2_grpc as pb_grpc

PARAM_FIELDS = frozenset(pb.SamplingParams.DESCRIPTOR.fields_by_name)


FORMAT_KINDS = ("json_object", "json_schema", "regex", "grammar", "choice")
ResponseFormatArg = pb.ResponseFormat | Mapping[str, Any] | None
Prompt = str | Sequence[int] | Sequence[Mapping[str, str] | pb.ChatMessage]


def format_message(spec: ResponseFormatArg) -> pb.ResponseFormat | None:
    """The ``aspen.v1.ResponseFormat`` of ``spec``: a message as is, or a mapping with one key among
    :data:`FORMAT_KINDS` (``{"json_schema": schema}`` with the schema as a mapping or JSON text,
    ``{"regex": "..."}``, ``{"grammar": "<lark>"}``, ``{"choice": [...]}``, ``{"json_object": True}``), or
    OpenAI's shape (``{"type": "json_object"}``, ``{"type": "json_schema", "json_schema": {"schema": ...}}``).
    TypeError / ValueError for anything else."""
    if spec is None or isinstance(spec, pb.ResponseFormat):
        return spec
    if not isinstance(spec, Mapping):
        raise TypeError(f"response_format must be a mapping or an aspen.v1.ResponseFormat, got {type(spec).__name__}")
    if "type" in spec:  # OpenAI's shape
        kind = spec["type"]
        if kind == "json_schema":
            spec = {"json_schema": (spec.get("json_schema") or {}).get("schema", {})}
        elif kind == "json_object":
            spec = {"json_object": True}
        else:
            raise ValueError(f"response_format type {kind!r}: expected json_object or json_schema")
    if len(spec) != 1 or next(iter(spec)) not in FORMAT_KINDS:
        raise ValueError(f"response_format takes exactly one key among {FORMAT_KINDS}, got {sorted(spec)}")
    kind, value = next(iter(spec.items()))
    if kind == "json_object":
        return pb.ResponseFormat(json_object=pb.JsonObject())
    if kind == "choice":
        return pb.ResponseFormat(choice=pb.Choice(choices=list(value)))
    if kind == "json_schema" and not isinstance(value, str):
        value = json.dumps(value)
    return pb.ResponseFormat(**{kind: value})


def is_chat(prompt: Prompt) -> bool:
    """Whether ``prompt`` is a conversation (a non-empty sequence of messages) rather than text or token ids."""
    return not isinstance(prompt, str) and len(prompt) > 0 and all(
        isinstance(m, (Mapping, pb.ChatMessage)) for m in prompt)


def build_request(prompt: Prompt, adapter: str | None = None, request_id: str = "",
                  response_format: ResponseFormatArg = None, **params: Any) -> pb.GenerateRequest:
    """A GenerateRequest; ``prompt`` is text, a list of token ids or a list of chat messages. TypeError for an
    unknown parameter."""
    unknown = sorted(set(params) - PARAM_FIELDS)
    if unknown:
        raise TypeError(f"unknown sampling parameter(s) {unknown}; expected some of {sorted(PARAM_FIELDS)}")
    if isinstance(params.get("stop"), str):
        params["stop"] = [params["stop"]]
    sp = pb.SamplingParams(**{k: v for k, v in params.items() if v is not None})
    req = pb.GenerateRequest(request_id=request_id, adapter_id=adapter or "", params=sp,
                             response_format=format_message(response_format))
    if isinstance(prompt, str):
        req.text = prompt
    elif is_chat(prompt):
        req.messages.messages.extend(m if isinstance(m, pb.ChatMessage) else
                                     pb.ChatMessage(role=m.get("role", ""), content=m.get("content", ""))
                                     for m in prompt)
    else:
        req.token_ids.ids.extend(prompt)
    return req


def _read(value: str | bytes | None) -> bytes | None:
    if value is None or isinstance(value, bytes):
        return value
    with open(value, "rb") as f:
        return f.read()


def _make_channel(address: str, tls_ca, tls_cert, tls_key, server_name, options, aio: bool):
    opts = list(options or [])
    if server_name:
        opts.append(("grpc.ssl_target_name_override", server_name))
    mod = grpc.aio if aio else grpc
    if tls_ca is None and tls_cert is None:
        return mod.insecure_channel(address, options=opts)
    creds = grpc.ssl_channel_credentials(root_certificates=_read(tls_ca), private_key=_read(tls_key),
                                         certificate_chain=_read(tls_cert))
    return mod.secure_channel(address, creds, options=opts)


class _Base:
    def __init__(self, address: str, token: str | None = None, tls_ca: str | bytes | None = None,
                 timeout: float | None = None, *, tls_cert: str | bytes | None = None,
                 tls_key: str | bytes | None = None, server_name: str | None = None, options=None) -> None:
        self.address = address
        self.timeout = timeout
        self._metadata = (("authorization", f"Bearer {token}"),) if token else ()
        self.channel = _make_channel(address, tls_ca, tls_cert, tls_key, server_name, options,
                                     aio=isinstance(self, AsyncAspenClient))
        self.generation = pb_grpc.GenerationServiceStub(self.channel)
        self.adapters = pb_grpc.AdapterServiceStub(self.channel)

    def _kw(self, timeout: float | None) -> dict:
        return {"timeout": self.timeout if timeout is None else timeout, "metadata": self._metadata}


class AspenClient(_Base):
    """Blocking client. ``timeout`` is the default deadline of every call in seconds (None: no deadline)."""

    def generate(self, prompt: Prompt, adapter: str | None = None, *, request_id: str = "",
                 timeout: float | None = None, **params: Any) -> pb.GenerateResponse:
        return self.generation.Generate(build_request(prompt, adapter, request_id, **params), **self._kw(timeout))

    def stream(self, prompt: Prompt, adapter: str | None = None, *, request_id: str = "",
               timeout: float | None = None, **params: Any) -> Iterator[pb.GenerateStreamResponse]:
        """Stream deltas; leaving the loop early cancels the call (and the request on the server)."""
        call = self.generation.GenerateStream(build_request(prompt, adapter, request_id, **params),
                                              **self._kw(timeout))
        try:
            yield from call
        finally:
            call.cancel()

    def tokenize(self, text: str, timeout: float | None = None) -> list[int]:
        return list(self.generation.Tokenize(pb.TokenizeRequest(text=text), **self._kw(timeout)).token_ids)

    def model_info(self, timeout: float | None = None) -> pb.GetModelInfoResponse:
        return self.generation.GetModelInfo(pb.GetModelInfoRequest(), **self._kw(timeout))

    def load_adapter(self, adapter_id: str, path: str | None = None, timeout: float | None = None) -> pb.AdapterInfo:
        req = pb.LoadAdapterRequest(adapter_id=adapter_id, path=path or "")
        return self.adapters.LoadAdapter(req, **self._kw(timeout)).adapter

    def unload_adapter(self, adapter_id: str, timeout: float | None = None) -> None:
        self.adapters.UnloadAdapter(pb.UnloadAdapterRequest(adapter_id=adapter_id), **self._kw(timeout))

    def list_adapters(self, timeout: float | None = None) -> list[pb.AdapterInfo]:
        return list(self.adapters.ListAdapters(pb.ListAdaptersRequest(), **self._kw(timeout)).adapters)

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> AspenClient:  # noqa: PYI034
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class AsyncAspenClient(_Base):
    """The same calls for asyncio code (``grpc.aio`` channel)."""

    async def generate(self, prompt: Prompt, adapter: str | None = None, *, request_id: str = "",
                       timeout: float | None = None, **params: Any) -> pb.GenerateResponse:
        return await self.generation.Generate(build_request(prompt, adapter, request_id, **params),
                                              **self._kw(timeout))

    async def stream(self, prompt: Prompt, adapter: str | None = None, *, request_id: str = "",
                     timeout: float | None = None, **params: Any) -> AsyncIterator[pb.GenerateStreamResponse]:
        call = self.generation.GenerateStream(build_request(prompt, adapter, request_id, **params),
                                              **self._kw(timeout))
        try:
            async for msg in call:
                yield msg
        finally:
            call.cancel()

    async def tokenize(self, text: str, timeout: float | None = None) -> list[int]:
        resp = await self.generation.Tokenize(pb.TokenizeRequest(text=text), **self._kw(timeout))
        return list(resp.token_ids)

    async def model_info(self, timeout: float | None = None) -> pb.GetModelInfoResponse:
        return await self.generation.GetModelInfo(pb.GetModelInfoRequest(), **self._kw(timeout))

    async def load_adapter(self, adapter_id: str, path: str | None = None,
                           timeout: float | None = None) -> pb.AdapterInfo:
        req = pb.LoadAdapterRequest(adapter_id=adapter_id, path=path or "")
        return (await self.adapters.LoadAdapter(req, **self._kw(timeout))).adapter

    async def unload_adapter(self, adapter_id: str, timeout: float | None = None) -> None:
        await self.adapters.UnloadAdapter(pb.UnloadAdapterRequest(adapter_id=adapter_id), **self._kw(timeout))

    async def list_adapters(self, timeout: float | None = None) -> list[pb.AdapterInfo]:
        return list((await self.adapters.ListAdapters(pb.ListAdaptersRequest(), **self._kw(timeout))).adapters)

    async def close(self) -> None:
        await self.channel.close()

    async def __aenter__(self) -> AsyncAspenClient:  # noqa: PYI034
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()
