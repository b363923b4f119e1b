"""The server maps the engine's refusals to gRPC statuses and request field paths, and validates nothing the
engine validates: a fake engine raises each error from ``add_request`` behind a real server on loopback."""
from __future__ import annotations

import asyncio

import grpc
import pytest
from google.rpc import error_details_pb2 as ed
from google.rpc import status_pb2

from aspen.errors import AdapterPathError
from clients.aspen.v1 import aspen_pb2 as pb
from clients.aspen.v1 import aspen_pb2_grpc as pb_grpc
from engine.scheduling.errors import DuplicateRequestError, RequestError
from engine.scheduling.sampling_params import SamplingParamsError
from engine.server import status as errs
from engine.server.app import AspenServer
from engine.server.options import ServerOptions


class RefusingEngine:
    """Stands in for LLMEngine: ``add_request`` records what it was given and raises ``error``."""

    adapter_dir = None

    def __init__(self, error: Exception) -> None:
        self.error = error
        self.requests: list[tuple] = []

    def has_work(self) -> bool:
        return False

    def add_request(self, prompt, params, adapter_id, request_id) -> str:
        self.requests.append((prompt, adapter_id, request_id))
        raise self.error

    def abort(self, request_id: str) -> None:
        pass


def refuse(error: Exception, request: pb.GenerateRequest, stream: bool = False):
    """Send ``request`` to a server whose engine raises ``error``; returns (the RpcError, what the engine got)."""
    engine = RefusingEngine(error)

    async def scenario():
        server = AspenServer(ServerOptions(model="fake", port=0, http_port=0, grace_period=0), lambda: engine)
        port = await server.bind()
        await server.load()
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                stub = pb_grpc.GenerationServiceStub(channel)
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    if stream:
                        async for _ in stub.GenerateStream(request, timeout=30):
                            pass
                    else:
                        await stub.Generate(request, timeout=30)
                return info.value
        finally:
            await server.stop(0)

    return asyncio.run(scenario()), engine.requests


def details(err: grpc.aio.AioRpcError) -> dict:
    """The google.rpc detail messages of a failed call, by type name."""
    raw = dict(err.trailing_metadata() or ()).get("grpc-status-details-bin")
    out = {}
    for any_msg in status_pb2.Status.FromString(raw).details if raw else ():
        for cls in (ed.BadRequest, ed.ResourceInfo):
            if any_msg.Is(cls.DESCRIPTOR):
                msg = cls()
                any_msg.Unpack(msg)
                out[cls.__name__] = msg
    return out


def violation(err: grpc.aio.AioRpcError) -> tuple[str, str]:
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, err.details()
    v = details(err)["BadRequest"].field_violations
    assert len(v) == 1
    return v[0].field, v[0].description


TEXT = pb.GenerateRequest(text="hello")
IDS = pb.GenerateRequest(token_ids=pb.TokenIds(ids=[5, 6, 100000]))


@pytest.mark.parametrize("request_msg, path", [(TEXT, "text"), (IDS, "token_ids.ids")])
@pytest.mark.parametrize("stream", [False, True])
def test_a_prompt_refusal_names_the_prompt_field_the_request_used(request_msg, path, stream):
    err, got = refuse(RequestError("prompt", "token ids must be in [0, 320)"), request_msg, stream)
    assert violation(err) == (path, "token ids must be in [0, 320)")
    assert err.details() == f"invalid {path}: token ids must be in [0, 320)"
    assert len(got) == 1  # the engine saw the request: the server did not check the ids itself


def test_other_request_fields_keep_their_name():
    err, got = refuse(RequestError("request_id", "at most 256 characters, got 300"),
                      pb.GenerateRequest(text="hi", request_id="r" * 300))
    assert violation(err) == ("request_id", "at most 256 characters, got 300")
    assert got[0][2] == "r" * 300


def test_a_duplicate_request_id_is_already_exists_with_the_id():
    err, _ = refuse(DuplicateRequestError("dup-1"), pb.GenerateRequest(text="hi", request_id="dup-1"))
    assert err.code() == grpc.StatusCode.ALREADY_EXISTS
    info = details(err)["ResourceInfo"]
    assert (info.resource_type, info.resource_name) == ("request", "dup-1")
    assert "already in use" in err.details()


def test_empty_prompts_and_adapter_ids_reach_the_engine_unchecked():
    err, got = refuse(RequestError("prompt", "the prompt is empty"), pb.GenerateRequest(text=""))
    assert violation(err) == ("text", "the prompt is empty")
    err, got = refuse(AdapterPathError("adapter id '../x' leaves the adapter root"),
                      pb.GenerateRequest(text="hi", adapter_id="../x"))
    assert violation(err)[0] == "adapter_id" and got[0][1] == "../x"


def test_a_context_overflow_is_the_prompts_fault():
    error = SamplingParamsError("max_new_tokens", "no room left in the context: use a shorter prompt")
    err, _ = refuse(error, IDS)
    assert violation(err)[0] == "token_ids.ids"


def test_the_server_checks_only_the_wire_message():
    err, got = refuse(RequestError("prompt", "unused"), pb.GenerateRequest())
    assert violation(err) == ("prompt", "set one of text, token_ids or messages") and got == []


def test_an_error_outside_the_contract_is_internal_and_generic():
    err, _ = refuse(ValueError("/secret/path: something broke"), TEXT)
    assert err.code() == grpc.StatusCode.INTERNAL
    assert err.details() == errs.GENERIC_INTERNAL


def test_call_fields_map_engine_fields_to_message_paths():
    call = errs.CallFields(prompt_field="token_ids.ids")
    assert [call.path_of(f) for f in ("prompt", "request_id", "adapter_id")] == \
        ["token_ids.ids", "request_id", "adapter_id"]
    status = errs.status_for_exception(RequestError("prompt", "under /root/a/b"), call, root="/root")
    assert "/root" not in status.details and "a/b" in status.details
