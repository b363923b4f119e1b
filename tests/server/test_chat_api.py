"""Chat over gRPC: ``GenerateRequest.messages`` in Generate and GenerateStream, with and without an adapter, equal
to transformers' / PEFT's ``apply_chat_template`` + greedy ``generate``; refusals with their field paths; the
``aspen generate --chat`` and ``aspen chat`` commands against a live server."""
from __future__ import annotations

import io
import sys

import grpc
import pytest
import torch

from aspen.cli import main as cli_main
from clients.aspen.v1 import aspen_pb2 as pb
from clients.client import AspenClient, build_request
from tests.helpers.server import ServerThread, build_assets, collect_stream, wait_engine_idle
from tests.helpers.statuses import expect_error
from tests.helpers.tiny_models import hf_model

NEW = 8
GREEDY = {"max_new_tokens": NEW, "temperature": 0.0, "ignore_eos": True}
CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "The lazy dog"}]


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return build_assets(tmp_path_factory.mktemp("chat-server"))


@pytest.fixture(scope="module")
def served(assets):
    s = ServerThread(assets)
    yield s
    s.stop()


@pytest.fixture()
def client(served):
    with AspenClient(served.address, timeout=30) as c:
        yield c


def _reference(assets, adapter: str | None, messages) -> list[int]:
    """Greedy tokens of transformers (PEFT with an adapter) on the chat-templated prompt."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(assets["base"])
    ids = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
    model = hf_model(assets["base"])
    if adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, f"{assets['adapters']}/{adapter}").eval()
    x = torch.tensor([ids])
    with torch.inference_mode():
        out = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=NEW, do_sample=False,
                             eos_token_id=None, pad_token_id=3)
    return out[0, len(ids):].tolist()


@pytest.mark.parametrize("adapter", [None, "team/a2"])
def test_messages_generate_and_stream_equal_transformers(client, assets, adapter):
    expected = _reference(assets, adapter, CHAT)
    unary = client.generate(CHAT, adapter, **GREEDY)
    text, ids, last = collect_stream(client, CHAT, adapter, **GREEDY)
    assert list(unary.token_ids) == expected == ids
    assert unary.text == text and last.finish_reason == pb.FINISH_REASON_LENGTH


def test_messages_from_two_adapters_and_the_base_in_one_batch(client, assets, served):
    from concurrent.futures import ThreadPoolExecutor

    jobs = [(None, CHAT), ("a1", CHAT), ("team/a2", CHAT[1:])]
    with ThreadPoolExecutor(len(jobs)) as pool:
        outs = list(pool.map(lambda j: client.generate(j[1], j[0], **GREEDY), jobs))
    for (adapter, messages), out in zip(jobs, outs):
        assert list(out.token_ids) == _reference(assets, adapter, messages)
    assert wait_engine_idle(served)["adapter_pins"] == 0


def test_a_chat_request_ends_at_the_end_of_turn_token(client):
    # the tiny template ends a turn with </s>, which is also EOS: without ignore_eos the request ends there
    out = client.generate(CHAT, max_new_tokens=200, temperature=1.0, seed=3, min_new_tokens=0)
    if out.finish_reason == pb.FINISH_REASON_EOS:
        assert out.token_ids[-1] == 2
    else:  # the sample never drew it within 200 tokens: it then must not appear at all
        assert 2 not in out.token_ids and out.finish_reason == pb.FINISH_REASON_LENGTH


def bad_field(fn) -> str:
    d = expect_error(fn, grpc.StatusCode.INVALID_ARGUMENT)
    return d["BadRequest"].field_violations[0].field


def test_bad_messages_get_invalid_argument_naming_the_message(client):
    gen = client.generation.Generate
    assert bad_field(lambda: client.generate([{"role": "robot", "content": "hi"}])) == "messages.messages[0].role"
    empty = pb.GenerateRequest()
    empty.messages.SetInParent()  # the oneof member set, with no message in it
    assert bad_field(lambda: gen(empty, timeout=10)) == "messages.messages"
    assert bad_field(lambda: client.generate(CHAT, "a1", min_p=2.0)) == "params.min_p"
    assert client.generate(CHAT, **GREEDY).token_ids  # the server keeps serving


def test_model_info_says_whether_chat_works(client):
    assert client.model_info().chat_template


def test_a_model_without_template_refuses_messages(tmp_path):
    from tests.helpers.tiny_models import make_checkpoint

    plain = {"base": make_checkpoint(str(tmp_path / "plain"), chat_template=None), "adapters": None}
    s = ServerThread(plain)
    try:
        with AspenClient(s.address, timeout=30) as c:
            assert not c.model_info().chat_template
            d = expect_error(lambda: c.generate(CHAT), grpc.StatusCode.INVALID_ARGUMENT)
            v = d["BadRequest"].field_violations[0]
            assert v.field == "messages.messages" and "no chat template" in v.description
    finally:
        s.stop()


def test_generate_cli_chat_flag(served, client, capsys):
    argv = ["generate", "--chat", "--system", "Be brief.", "--server", served.address, "--max-new-tokens",
            str(NEW), "--temperature", "0", "--ignore-eos", "The lazy dog"]
    assert cli_main(argv) == 0
    assert capsys.readouterr().out == client.generate(CHAT, **GREEDY).text + "\n"
    assert cli_main(["generate", "--system", "x", "--server", served.address, "hi"]) == 2


def test_chat_cli_keeps_the_history(served, client, capsys, monkeypatch):
    monkeypatch.setattr(sys, "stdin", io.StringIO("The lazy dog\n\nA small cat\n/exit\nnever sent\n"))
    argv = ["chat", "--server", served.address, "--adapter", "a1", "--max-new-tokens", str(NEW),
            "--temperature", "0", "--ignore-eos"]
    assert cli_main(argv) == 0
    first, second = capsys.readouterr().out.splitlines()
    turn1 = [{"role": "user", "content": "The lazy dog"}]
    assert first == client.generate(turn1, "a1", **GREEDY).text
    history = turn1 + [{"role": "assistant", "content": first}, {"role": "user", "content": "A small cat"}]
    assert second == client.generate(history, "a1", **GREEDY).text


def test_build_request_takes_messages_as_mappings_or_protos():
    req = build_request([{"role": "user", "content": "hi"}, pb.ChatMessage(role="assistant", content="yo")])
    assert req.WhichOneof("prompt") == "messages"
    assert [(m.role, m.content) for m in req.messages.messages] == [("user", "hi"), ("assistant", "yo")]
    assert build_request([1, 2]).WhichOneof("prompt") == "token_ids"
