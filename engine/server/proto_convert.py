"""Conversions between ``aspen.v1`` protobuf messages and engine objects (for :mod:`engine.server.app` and
:mod:`engine.server.servicers`).

Sampling parameters and the response format in (:func:`params_from_proto`, :func:`response_format_from_proto`);
logprobs, finish reasons / usage, quantization names and adapter listings out. Pure field mapping: no validation
beyond what :class:`SamplingParams` and :class:`ResponseFormat` do themselves (and which member of a oneof is set).
"""
from __future__ import annotations

import os

from aspen.lora.peft.config import read_adapter_config
from clients.aspen.v1 import aspen_pb2 as pb
from engine.adapters.paths import check_confined
from engine.llm_engine import LLMEngine
from engine.scheduling.response_format import ResponseFormat
from engine.scheduling.sampling_params import SamplingParams
from engine.server.status import InvalidArgument

_OPTIONAL_PARAMS = ("max_new_tokens", "temperature", "top_k", "top_p", "min_p", "repetition_penalty",
                    "presence_penalty", "frequency_penalty", "seed", "min_new_tokens", "logprobs",
                    "skip_special_tokens")
_FINISH = {"length": pb.FINISH_REASON_LENGTH, "eos": pb.FINISH_REASON_EOS, "stop": pb.FINISH_REASON_STOP,
           "aborted": pb.FINISH_REASON_CANCELLED, "error": pb.FINISH_REASON_ERROR}
_TIER = {"disk": pb.ADAPTER_TIER_DISK, "host": pb.ADAPTER_TIER_HOST, "device": pb.ADAPTER_TIER_DEVICE}
_QUANT = {"none": pb.QUANTIZATION_NONE, "int8": pb.QUANTIZATION_INT8, "nf4": pb.QUANTIZATION_NF4,
          "fp4": pb.QUANTIZATION_FP4}


def params_from_proto(p: pb.SamplingParams, response_format: ResponseFormat | None = None) -> SamplingParams:
    """Engine sampling parameters; unset optional fields keep the engine defaults."""
    kw = {name: getattr(p, name) for name in _OPTIONAL_PARAMS if p.HasField(name)}
    return SamplingParams(stop=tuple(p.stop), stop_token_ids=tuple(p.stop_token_ids), ignore_eos=p.ignore_eos,
                          response_format=response_format, **kw)


def response_format_from_proto(request: pb.GenerateRequest) -> ResponseFormat | None:
    """The request's response format, None when unset; :class:`InvalidArgument` for a ResponseFormat message that
    sets no member of its oneof. The format's own checks raise ``ResponseFormatError`` naming the field."""
    if not request.HasField("response_format"):
        return None
    rf = request.response_format
    kind = rf.WhichOneof("format")
    if kind is None:
        raise InvalidArgument("response_format", "set one of json_object, json_schema, regex, grammar, choice")
    if kind == "json_object":
        return ResponseFormat.json_object()
    if kind == "choice":
        return ResponseFormat.choice(list(rf.choice.choices))
    return ResponseFormat(kind, getattr(rf, kind))


def logprobs_proto(items) -> list[pb.TokenLogprob]:
    """Proto TokenLogprobs of engine logprob entries (each with its top alternatives)."""
    return [pb.TokenLogprob(token_id=lp.token_id, logprob=lp.logprob,
                            top=[pb.TopLogprob(token_id=t, logprob=v) for t, v in lp.top]) for lp in items]


def fill_finish(msg, out) -> None:
    """Fill finish_reason, usage and the stop reason of a final message."""
    msg.finish_reason = _FINISH.get(out.finish_reason, pb.FINISH_REASON_UNSPECIFIED)
    msg.usage.prompt_tokens = out.prompt_tokens
    msg.usage.completion_tokens = out.completion_tokens
    msg.usage.cached_prompt_tokens = out.num_cached_tokens
    if isinstance(out.stop_reason, str):
        msg.stop_sequence = out.stop_reason
    elif isinstance(out.stop_reason, int):
        msg.stop_token_id = out.stop_reason


def quantization_proto(name) -> int:
    """The proto Quantization of an engine quantization name (UNSPECIFIED when unknown)."""
    return _QUANT.get(name, pb.QUANTIZATION_UNSPECIFIED)


def adapter_info_proto(engine: LLMEngine, info, registered: bool) -> pb.AdapterInfo:
    """Proto AdapterInfo, with rank / target modules / alpha read from adapter_config.json (best effort)."""
    msg = pb.AdapterInfo(adapter_id=info.adapter_id, tier=_TIER.get(info.tier, pb.ADAPTER_TIER_UNSPECIFIED),
                         registered=registered,
                         active_requests=info.pins, host_bytes=info.nbytes or 0, device_pages=info.num_pages or 0,
                         generation=info.generation, path=os.path.relpath(info.path, engine.adapter_dir))
    try:
        check_confined(engine.adapter_dir, info.path)  # never read a config through a symlink out of the root
        raw = read_adapter_config(info.path)
    except Exception:  # noqa: BLE001 -- a broken config only leaves these fields empty in a listing
        return msg
    if isinstance(raw.get("r"), int):
        msg.rank = raw["r"]
    if isinstance(raw.get("lora_alpha"), (int, float)):
        msg.lora_alpha = raw["lora_alpha"]
    targets = raw.get("target_modules")
    msg.target_modules.extend([targets] if isinstance(targets, str) else sorted(map(str, targets or ())))
    return msg
