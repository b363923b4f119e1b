"""The OpenAI-compatible HTTP API over the server's engine (a FastAPI application):

===================================  ================================================================
``POST /v1/completions``             text completion of a prompt (text, token ids, or a list of them)
``POST /v1/chat/completions``        chat completion of ``messages`` (the model's chat template)
``GET /v1/models``                   the base model and every adapter (loaded or on disk), as vLLM
``GET /v1/models/{id}``              one of them
``POST /v1/load_lora_adapter``       vLLM's body ``{"lora_name", "lora_path"}``
``POST /v1/unload_lora_adapter``     vLLM's body ``{"lora_name"}``
``GET /health``                      200 while serving, else 503 (no token needed)
===================================  ================================================================

``model`` in a body is the base model's served name (``--model``'s last path component, ``demo`` for the demo)
or an adapter id. Errors are OpenAI error objects (:mod:`engine.http.errors`): a body that does not parse or
fit the schema is a 400 naming the field, never FastAPI's 422, and nothing a client sends is a 500.
"""
from __future__ import annotations

import contextlib
import logging
import os
import time

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException
from starlette.responses import PlainTextResponse, Response

from engine.http import convert
from engine.http.chat import chat_jobs
from engine.http.errors import ApiError, HttpCallFields, error_response
from engine.http.generation import Generation, Host, adapter_of, admit
from engine.http.middleware import BodyLimit, TokenAuth
from engine.http.render import ChatRenderer, CompletionRenderer, TokenTexts
from engine.http.requests import (
    ChatCompletionRequest,
    CompletionRequest,
    LoadLoraAdapterRequest,
    UnloadLoraAdapterRequest,
)
from engine.http.responses import ModelCard, ModelList
from engine.server.status import GENERIC_INTERNAL, classify

log = logging.getLogger("aspen.http")
MAX_ERROR_CHARS = 1000


def create_app(host: Host) -> FastAPI:
    """The application serving ``host``'s engine (see the module docstring)."""
    app = FastAPI(title="ASPEN serve", docs_url=None, redoc_url=None, openapi_url=None)
    started = int(time.time())
    texts: list[TokenTexts] = []

    def token_texts() -> TokenTexts:
        if not texts:
            texts.append(TokenTexts(host.engine.tokenizer))
        return texts[0]

    @contextlib.asynccontextmanager
    async def call(fields: HttpCallFields):
        await admit(host)
        with host.in_flight():
            try:
                yield
            except ApiError:
                raise
            except Exception as e:  # noqa: BLE001 -- classified: client errors get their status, the rest 500
                raise ApiError.of(classify(e, fields, host.adapter_root), fields.adapter_field) from None

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request) -> Response:
        fields = HttpCallFields(prompt_field="prompt")
        n_prompts = len(body.prompt) if isinstance(body.prompt, list) and body.prompt \
            and not isinstance(body.prompt[0], int) else 1
        prompt_of = {p * body.n + j: p for p in range(n_prompts) for j in range(body.n)}
        renderer = CompletionRenderer(body.model or host.options.model_name, token_texts(), prompt_of,
                                      body.logprobs is not None, bool(body.stream_options and
                                                                      body.stream_options.include_usage))
        generation = Generation(host, request, fields, renderer, adapter_of(host, body.model), body.stream)

        async def jobs() -> list[convert.Job]:
            return convert.completion_jobs(body, fields)

        return await generation.respond(jobs)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        fields = HttpCallFields(prompt_field="messages")
        renderer = ChatRenderer(body.model or host.options.model_name, token_texts(),
                                {j: 0 for j in range(body.n)}, body.logprobs,
                                bool(body.stream_options and body.stream_options.include_usage))
        adapter = adapter_of(host, body.model)
        generation = Generation(host, request, fields, renderer, adapter, body.stream)
        return await generation.respond(lambda: chat_jobs(host, body, fields, adapter))

    async def model_cards() -> list[ModelCard]:
        engine, name = host.engine, host.options.model_name
        base = ModelCard(id=name, created=started, root=name, max_model_len=engine.max_model_len,
                         vocab_size=engine.model.config.vocab_size)
        infos = await host.run_blocking(engine.list_adapters)
        return [base] + [ModelCard(id=i.adapter_id, created=started, parent=name,
                                   root=os.path.relpath(i.path, engine.adapter_dir)) for i in infos]

    @app.get("/v1/models")
    async def list_models() -> Response:
        async with call(HttpCallFields()):
            return _json(ModelList(data=await model_cards()))

    @app.get("/v1/models/{model_id:path}")
    async def get_model(model_id: str) -> Response:
        async with call(HttpCallFields()):
            card = next((c for c in await model_cards() if c.id == model_id), None)
            if card is None:
                raise ApiError(404, f"the model {model_id[:200]!r} does not exist", "model", "model_not_found")
            return _json(card)

    @app.post("/v1/load_lora_adapter")
    async def load_lora_adapter(body: LoadLoraAdapterRequest) -> Response:
        fields = HttpCallFields(adapter_id=body.lora_name, adapter_field="lora_path" if body.lora_path else "lora_name")
        async with call(fields):
            info = await host.run_blocking(host.engine.load_adapter, body.lora_name, body.lora_path or None)
            log.info("adapter %r loaded over HTTP (tier %s)", body.lora_name, info.tier)
            return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' added successfully.")

    @app.post("/v1/unload_lora_adapter")
    async def unload_lora_adapter(body: UnloadLoraAdapterRequest) -> Response:
        async with call(HttpCallFields(adapter_id=body.lora_name, adapter_field="lora_name")):
            await host.run_blocking(host.engine.unload_adapter, body.lora_name)
            log.info("adapter %r unloaded over HTTP", body.lora_name)
            return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' removed successfully.")

    @app.get("/health")
    async def health() -> Response:
        await admit(host)
        return Response(status_code=200)

    _handle_errors(app)
    app.add_middleware(BodyLimit, limit=host.options.max_message_bytes)
    if host.options.auth_token:
        app.add_middleware(TokenAuth, token=host.options.auth_token)  # added last: outermost, checked first
    return app


#: pydantic's names of union members in an error location, which are no part of the body's field path
_UNION_TAGS = frozenset({"str", "int", "float", "bool", "none", "dict", "list"})


def _param(loc) -> str:
    """The body field path of a validation error's location (``messages.0.content``)."""
    return ".".join(str(p) for p in loc if p != "body" and not (isinstance(p, str) and ("[" in p or p in _UNION_TAGS)))


def _json(body) -> Response:
    return Response(body.model_dump_json(), media_type="application/json")


def _handle_errors(app: FastAPI) -> None:
    """Every error as an OpenAI error object with its status (see the module docstring)."""

    @app.exception_handler(ApiError)
    async def api_error(_request, e: ApiError) -> Response:
        return error_response(e)

    @app.exception_handler(RequestValidationError)
    async def invalid_body(_request, e: RequestValidationError) -> Response:
        errors = e.errors()
        if errors and errors[0].get("type") == "json_invalid":
            return error_response(ApiError(400, f"the body is not valid JSON: {errors[0].get('ctx', {}).get('error')}"))
        text = "; ".join(f"{_param(x.get('loc', ())) or 'body'}: {x.get('msg')}" for x in errors[:5])
        param = _param(errors[0].get("loc", ())) if errors else None
        return error_response(ApiError(400, f"invalid request body: {text}"[:MAX_ERROR_CHARS], param or None))

    @app.exception_handler(HTTPException)
    async def http_error(_request, e: HTTPException) -> Response:
        return error_response(ApiError(e.status_code, str(e.detail)[:MAX_ERROR_CHARS]))

    @app.exception_handler(Exception)
    async def unexpected(_request, e: Exception) -> Response:
        log.error("unexpected error while serving an HTTP request", exc_info=e)
        return error_response(ApiError(500, GENERIC_INTERNAL))
