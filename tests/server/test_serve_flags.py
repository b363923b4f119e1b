"""``aspen serve`` flags are generated from ServerOptions / EngineConfig fields (engine/server/flags.py): every
documented flag keeps its name and meaning, defaults and choices come from the dataclasses and their constants,
and the parsed flags build the same options back."""
from __future__ import annotations

import argparse
import dataclasses

import pytest

from aspen.language_model import DTYPES
from aspen.model.quantize import QUANT_MODES
from engine.config import ADAPTER_DTYPES, EngineConfig, MiB, Setting, check_settings, setting
from engine.server import command, flags
from engine.server.options import ServerOptions

#: The flags `aspen serve` has always had (README, RELIABILITY.md and the deployment tests use them).
DOCUMENTED = ("--model", "--adapter-dir", "--no-demo-adapters", "--quantize", "--dtype", "--device",
              "--max-num-seqs", "--max-num-batched-tokens", "--max-model-len", "--kv-cache-mb", "--block-size",
              "--lora-pool-mb", "--adapter-dtype", "--no-packed-gemm", "--host-adapter-mb", "--max-queue",
              "--no-prefix-caching", "--allow-pickle-adapters", "--seed", "--host", "--port", "--grace-period",
              "--max-message-bytes", "--keepalive-time", "--keepalive-timeout", "--keepalive-min-ping-interval",
              "--keepalive-permit-without-calls", "--tls-cert", "--tls-key", "--tls-client-ca", "--auth-token-file",
              "--metrics-port", "--metrics-host")


@pytest.fixture(scope="module")
def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser()
    command.add_arguments(p)
    return p


def options(parser, *argv: str) -> ServerOptions:
    return command.options_from_args(parser.parse_args(["--model", "m", *argv]))


def test_documented_flags_exist_and_defaults_are_the_dataclasses(parser):
    known = {s for a in parser._actions for s in a.option_strings}
    assert set(DOCUMENTED) <= known, sorted(set(DOCUMENTED) - known)
    assert options(parser) == ServerOptions(model="m")
    assert options(parser).engine == EngineConfig()


def test_flags_reach_the_fields_in_their_units(parser):
    o = options(parser, "--kv-cache-mb", "64", "--lora-pool-mb", "8", "--host-adapter-mb", "100", "--max-queue", "3",
                "--no-prefix-caching", "--no-packed-gemm", "--allow-pickle-adapters", "--max-model-len", "128",
                "--seed", "7", "--quantize", "int8", "--dtype", "bfloat16", "--keepalive-time", "5",
                "--metrics-port", "0")
    assert (o.engine.kv_cache_bytes, o.engine.lora_pool_bytes, o.engine.host_adapter_bytes) == \
        (64 * MiB, 8 * MiB, 100 * MiB)
    assert (o.engine.max_waiting, o.engine.max_model_len, o.engine.seed) == (3, 128, 7)
    assert not o.engine.enable_prefix_caching and not o.engine.packed_gemm and o.engine.allow_pickle_adapters
    assert (o.quantize, o.dtype, o.keepalive_time_s, o.metrics_port) == ("int8", "bfloat16", 5.0, 0)


def test_choices_come_from_the_constants(parser):
    choices = {a.option_strings[0]: a.choices for a in parser._actions if a.option_strings}
    assert tuple(choices["--quantize"]) == QUANT_MODES
    assert tuple(choices["--dtype"]) == tuple(DTYPES)
    assert tuple(choices["--adapter-dtype"]) == ADAPTER_DTYPES
    with pytest.raises(SystemExit):
        parser.parse_args(["--quantize", "int4"])


def test_help_is_grouped_and_shows_units(parser, capsys):
    with pytest.raises(SystemExit):
        parser.parse_args(["--help"])
    text = capsys.readouterr().out
    for section in ("model source:", "engine:", "network:"):
        assert section in text
    assert "--kv-cache-mb MiB" in text and "(default: 0.5)" in text and "--memory-utilization" in text


def test_out_of_range_values_name_the_field(parser):
    with pytest.raises(ValueError, match=r"EngineConfig.max_num_seqs must be an int >= 1, got 0"):
        options(parser, "--max-num-seqs", "0")
    with pytest.raises(ValueError, match=r"ServerOptions.port must be an int >= 0, got -1"):
        options(parser, "--port", "-1")
    with pytest.raises(ValueError, match="--tls-cert and --tls-key"):
        options(parser, "--tls-cert", "cert.pem")


def test_the_token_comes_from_its_file_and_stays_out_of_the_repr(parser, tmp_path):
    (tmp_path / "token").write_text("s3cret\n")
    o = options(parser, "--auth-token-file", str(tmp_path / "token"))
    assert o.auth_token == "s3cret" and "s3cret" not in repr(o)
    (tmp_path / "empty").write_text("\n")
    with pytest.raises(ValueError, match="is empty"):
        options(parser, "--auth-token-file", str(tmp_path / "empty"))


@dataclasses.dataclass(frozen=True)
class Inner:
    size_bytes: int = setting(2 * MiB, help="a size", unit="MiB", minimum=1)
    verbose: bool = setting(False, help="chatter")


@dataclasses.dataclass(frozen=True)
class Outer:
    name: str = setting("x", help="a name", choices=("x", "y"), group="naming")
    limit: int | None = setting(None, help="a cap", minimum=0)
    fast: bool = setting(True, help="speed")
    secret: str = setting("", help="set by code", cli=False)
    inner: Inner = dataclasses.field(default_factory=Inner, metadata={"setting": Setting(help="", group="inner")})

    def __post_init__(self) -> None:
        check_settings(self)


def test_the_generic_helper_round_trips_any_settings_dataclass():
    p = argparse.ArgumentParser()
    sections = flags.add_arguments(p, Outer, section="general")
    assert set(sections) == {"naming", "general", "inner"}
    assert flags.from_args(Outer, p.parse_args([]), secret="s") == Outer(secret="s")
    parsed = flags.from_args(Outer, p.parse_args(["--name", "y", "--limit", "0", "--no-fast", "--size-bytes", "3",
                                                  "--verbose"]))
    assert parsed == Outer(name="y", limit=0, fast=False, inner=Inner(size_bytes=3 * MiB, verbose=True))
    with pytest.raises(TypeError, match=r"Outer.limit must be None or an int >= 0, got 'a'"):
        Outer(limit="a")
