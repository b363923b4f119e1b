"""The `aspen` console script: help, the demo command end to end, and one-line errors."""
from __future__ import annotations

import pytest

from aspen.cli import main
from tests.helpers.fake_client import recording_client


def test_help_lists_commands(capsys):
    with pytest.raises(SystemExit) as info:
        main(["--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert "demo" in out


def test_demo_prints_generations(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("ASPEN_HOME", str(tmp_path))
    assert main(["demo", "--no-adapters", "--max-new-tokens", "12"]) == 0
    out = capsys.readouterr().out
    assert str(tmp_path / "demo" / "base") in out
    assert "Once upon a time" in out
    generated = out.split(">>> Once upon a time", 1)[1].split(">>>", 1)[0]
    assert len(generated.split()) >= 3  # words, not an empty completion


def test_bad_model_path_is_one_line_error(tmp_path, capsys):
    import aspen
    from aspen.errors import CheckpointError

    with pytest.raises(CheckpointError, match="is not a directory"):
        aspen.load_model(str(tmp_path / "missing"))


def test_every_subcommand_builds_its_parser():
    from aspen.cli import COMMANDS, build_parser

    for name in COMMANDS:
        build_parser(name).parse_args([name] + _required(name))


def _required(name: str) -> list[str]:
    """Minimal arguments that satisfy each subcommand's required options (parsing only, nothing runs)."""
    return {"generate": ["--server", "127.0.0.1:1", "hi"], "adapters": ["list", "--server", "127.0.0.1:1"],
            "train": ["--config", "x.yaml"], "loadtest": ["run", "--server", "127.0.0.1:1"],
            "bench": ["lora_overhead"]}.get(name, [])


def test_serve_adapter_dtype_flag_reaches_the_engine_config():
    import argparse

    from engine.server import command as serve_command

    parser = argparse.ArgumentParser()
    serve_command.add_arguments(parser)
    opts = serve_command.options_from_args(parser.parse_args(["--model", "m", "--adapter-dtype", "bfloat16"]))
    assert opts.engine.adapter_dtype == "bfloat16"
    default = serve_command.options_from_args(parser.parse_args(["--model", "m"]))
    assert default.engine.adapter_dtype == "auto"


def test_serve_no_packed_gemm_flag_reaches_the_engine_config():
    import argparse

    import pytest

    from engine.config import EngineConfig
    from engine.server import command as serve_command

    parser = argparse.ArgumentParser()
    serve_command.add_arguments(parser)
    opts = serve_command.options_from_args(parser.parse_args(["--model", "m", "--no-packed-gemm"]))
    assert opts.engine.packed_gemm is False
    default = serve_command.options_from_args(parser.parse_args(["--model", "m"]))
    assert default.engine.packed_gemm is True
    with pytest.raises(TypeError, match="packed_gemm must be a bool"):
        EngineConfig(packed_gemm="yes")


def test_train_server_flag_gets_the_client_as_an_after_save_hook(monkeypatch):
    import clients.client
    from aspen.cli import HOOKS, build_parser
    from aspen.errors import AspenError
    from aspen.train import command as train_command

    calls = []

    Client = recording_client(calls)

    monkeypatch.setattr(clients.client, "AspenClient", Client)
    hooks = HOOKS["aspen.train.command"]
    with_server = build_parser("train").parse_args(["train", "--config", "x.yaml", "--server", "127.0.0.1:1"])
    hooks(with_server)["after_save"]("math", "/out/math")
    assert calls == [("127.0.0.1:1", "math", "/out/math")]
    assert hooks(build_parser("train").parse_args(["train", "--config", "x.yaml"])) == {}
    with pytest.raises(AspenError, match="--server"):  # the library alone cannot reach a server
        train_command.run(with_server)


def test_loadtest_subcommands_route_to_the_module_next_to_what_they_drive(capsys):
    from aspen.cli import build_parser

    parser = build_parser("loadtest")
    make = parser.parse_args(["loadtest", "make-adapters", "--model", "m", "--out", "o", "--num", "3"])
    assert make._module == "aspen.lora.peft.make_adapters_command" and make.num == 3
    run = parser.parse_args(["loadtest", "run", "--server", "127.0.0.1:1", "--popularity", "zipf"])
    assert run._module == "clients.loadtest.command" and run.popularity == "zipf"
    assert main(["loadtest"]) == 2  # a group alone: its usage
    assert "make-adapters" in capsys.readouterr().err
