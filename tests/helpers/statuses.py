"""gRPC statuses of failed calls: the google.rpc details they carry, and the documented codes and field paths a
client may get for its own input."""
from __future__ import annotations

import re

import grpc
import pytest
from google.rpc import error_details_pb2 as ed
from grpc_status import rpc_status

from clients.aspen.v1 import aspen_pb2 as pb

#: Status codes a client may get for its own input (proto/aspen/v1/aspen.proto, the table at the top).
CLIENT_CODES = frozenset({grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND,
                          grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.ALREADY_EXISTS,
                          grpc.StatusCode.RESOURCE_EXHAUSTED})
#: Field paths a BadRequest may name.
REQUEST_FIELDS = frozenset({"prompt", "text", "token_ids.ids", "adapter_id", "path", "request_id", "request",
                            "response_format", "response_format.choice.choices"}
                           | {f"params.{f}" for f in pb.SamplingParams.DESCRIPTOR.fields_by_name}
                           | {f"response_format.{f}" for f in pb.ResponseFormat.DESCRIPTOR.fields_by_name})

CHAT_FIELD = re.compile(r"messages\.messages(\[\d+\]\.(role|content))?")


def details(err: grpc.RpcError) -> dict:
    """The google.rpc detail messages of a failed call, by type name."""
    out, status = {}, rpc_status.from_call(err)
    for any_msg in status.details if status is not None else ():
        for cls in (ed.BadRequest, ed.ResourceInfo, ed.RetryInfo, ed.PreconditionFailure):
            if any_msg.Is(cls.DESCRIPTOR):
                msg = cls()
                any_msg.Unpack(msg)
                out[cls.__name__] = msg
    return out


def expect_error(fn, code: grpc.StatusCode) -> dict:
    with pytest.raises(grpc.RpcError) as info:
        fn()
    assert info.value.code() == code, info.value.details()
    return details(info.value)


def check_client_error(err: grpc.RpcError, allowed=CLIENT_CODES) -> grpc.StatusCode:
    """Assert ``err`` is a documented status for client input, with the details the proto promises."""
    code = err.code()
    assert code in allowed, f"{code.name}: {err.details()}"
    d = details(err)
    if code is grpc.StatusCode.INVALID_ARGUMENT:
        fields = {v.field for v in d["BadRequest"].field_violations}
        assert fields and all(f in REQUEST_FIELDS or CHAT_FIELD.fullmatch(f) for f in fields), fields
    elif code is grpc.StatusCode.NOT_FOUND or code is grpc.StatusCode.ALREADY_EXISTS:
        assert "ResourceInfo" in d, err.details()
    elif code is grpc.StatusCode.FAILED_PRECONDITION:
        assert d["PreconditionFailure"].violations[0].type in ("ADAPTER_INCOMPATIBLE", "ADAPTER_BUSY")
    elif code is grpc.StatusCode.RESOURCE_EXHAUSTED and "RetryInfo" not in d:  # only gRPC's own size limit
        assert "larger than max" in (err.details() or ""), err.details()
    return code


def retry_delay_s(err: grpc.RpcError) -> float:
    info = details(err).get("RetryInfo")
    return info.retry_delay.ToTimedelta().total_seconds() if info is not None else 0.0
