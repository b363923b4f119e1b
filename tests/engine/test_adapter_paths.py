"""Adapter id validation, confinement to the adapter root, and adapter discovery (real temp dirs)."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from aspen.errors import AdapterError, AdapterNotFoundError, AdapterPathError
from engine.adapters.paths import (
    MAX_ADAPTER_ID_LEN,
    list_adapter_dirs,
    resolve_adapter_path,
    validate_adapter_id,
    validate_adapter_path,
)


def make_adapter(root: Path, rel: str, config: bool = True) -> Path:
    d = root / rel
    d.mkdir(parents=True, exist_ok=True)
    if config:
        (d / "adapter_config.json").write_text("{}")
    return d


@pytest.fixture
def root(tmp_path: Path) -> Path:
    r = tmp_path / "adapters"
    r.mkdir()
    return r


@pytest.mark.parametrize(
    "adapter_id",
    ["math", "team-a/summarizer-v2", "a.b_c-1/x.y", "v1.0", "..a", "a..", "x" * MAX_ADAPTER_ID_LEN, ".hidden"],
)
def test_valid_ids_pass(adapter_id: str) -> None:
    validate_adapter_id(adapter_id)


@pytest.mark.parametrize(
    ("adapter_id", "needle"),
    [
        ("", "empty"),
        ("x" * (MAX_ADAPTER_ID_LEN + 1), "257 characters"),
        ("a\x00b", "NUL"),
        ("a\nb", "control"),
        ("a\tb", "U+0009"),
        ("a\x7fb", "control"),
        ("a\\b", "backslash"),
        ("..\\etc", "backslash"),
        ("/etc/passwd", "absolute"),
        ("//server/share", "absolute"),
        ("..", "'..'"),
        ("../outside", "'..'"),
        ("a/../../b", "'..'"),
        ("a/..", "'..'"),
        (".", "'.'"),
        ("./a", "'.'"),
        ("a/./b", "'.'"),
        ("a//b", "empty path component"),
        ("a/", "empty path component"),
        ("a b", "outside [A-Za-z0-9._-/]"),
        ("c:evil", "':'"),
        ("caf\u00e9", "outside"),
        ("a*b?", "'*'"),
    ],
)
def test_invalid_ids_are_refused_with_a_named_problem(adapter_id: str, needle: str) -> None:
    with pytest.raises(AdapterPathError) as exc:
        validate_adapter_id(adapter_id)
    assert needle in str(exc.value)
    assert isinstance(exc.value, AdapterError)


def test_non_string_id_is_refused() -> None:
    with pytest.raises(AdapterPathError, match="string"):
        validate_adapter_id(42)  # type: ignore[arg-type]


def test_long_id_message_is_truncated() -> None:
    with pytest.raises(AdapterPathError) as exc:
        validate_adapter_id("y" * 5000)
    assert len(str(exc.value)) < 300


def test_resolve_returns_real_path(root: Path) -> None:
    d = make_adapter(root, "team-a/summarizer-v2")
    assert resolve_adapter_path(str(root), "team-a/summarizer-v2") == os.path.realpath(d)
    assert resolve_adapter_path(str(root), "team-a") == os.path.realpath(root / "team-a")


def test_resolve_through_symlinked_root(tmp_path: Path, root: Path) -> None:
    d = make_adapter(root, "math")
    link = tmp_path / "root-link"
    link.symlink_to(root)
    assert resolve_adapter_path(str(link), "math") == os.path.realpath(d)


def test_a_path_given_for_an_adapter_has_the_id_syntax(root: Path) -> None:
    make_adapter(root, "math")
    for bad in ("../adapters/math", "/" + str(root / "math").lstrip("/"), "math//", "ma\x00th"):
        with pytest.raises(AdapterPathError, match="adapter path"):
            validate_adapter_path(bad)
    validate_adapter_path("math")


def test_symlink_inside_root_is_allowed(root: Path) -> None:
    target = make_adapter(root, "team-a/summarizer-v2")
    (root / "latest").symlink_to(target)
    (root / "team-b").mkdir()
    (root / "team-b" / "rel").symlink_to(Path("..") / "team-a" / "summarizer-v2")
    assert resolve_adapter_path(str(root), "latest") == os.path.realpath(target)
    assert resolve_adapter_path(str(root), "team-b/rel") == os.path.realpath(target)


def test_symlink_escaping_root_is_refused(tmp_path: Path, root: Path) -> None:
    outside = make_adapter(tmp_path, "outside-adapter")
    (root / "evil").symlink_to(outside)
    (root / "evil-rel").symlink_to(Path("..") / "outside-adapter")
    (root / "sub").mkdir()
    (root / "sub" / "up").symlink_to(tmp_path)  # a directory symlink used as an intermediate component
    for adapter_id in ("evil", "evil-rel", "sub/up/outside-adapter"):
        with pytest.raises(AdapterPathError, match="outside the adapter root"):
            resolve_adapter_path(str(root), adapter_id)


def test_dangling_symlink_escaping_root_is_a_path_error_not_not_found(tmp_path: Path, root: Path) -> None:
    (root / "ghost").symlink_to(tmp_path / "does-not-exist")
    with pytest.raises(AdapterPathError, match="outside"):
        resolve_adapter_path(str(root), "ghost")


def test_symlink_to_root_itself_is_refused(root: Path) -> None:
    (root / "self").symlink_to(root)
    with pytest.raises(AdapterPathError, match="adapter root itself"):
        resolve_adapter_path(str(root), "self")


def test_missing_dir_is_not_found(root: Path) -> None:
    with pytest.raises(AdapterNotFoundError, match="no adapter directory 'nope'"):
        resolve_adapter_path(str(root), "nope")
    (root / "file-not-dir").write_text("x")
    with pytest.raises(AdapterNotFoundError):
        resolve_adapter_path(str(root), "file-not-dir")
    (root / "dangling").symlink_to(root / "never-created")
    with pytest.raises(AdapterNotFoundError):
        resolve_adapter_path(str(root), "dangling")


def test_missing_root_is_not_found(tmp_path: Path) -> None:
    with pytest.raises(AdapterNotFoundError, match="adapter root"):
        resolve_adapter_path(str(tmp_path / "no-root"), "math")
    with pytest.raises(AdapterNotFoundError):
        list_adapter_dirs(str(tmp_path / "no-root"))


def test_list_adapter_dirs(tmp_path: Path, root: Path) -> None:
    make_adapter(root, "math")
    make_adapter(root, "math/checkpoint-100")  # nested adapters are listed too
    make_adapter(root, "team-a/summarizer-v2")
    make_adapter(root, "team-a/notes", config=False)  # no config: not an adapter
    (root / "empty").mkdir()
    make_adapter(root, "bad name")  # not a valid id: skipped
    (root / "cfg-is-dir" / "adapter_config.json").mkdir(parents=True)  # config must be a file
    (root / "latest").symlink_to(root / "team-a" / "summarizer-v2")  # alias inside root: listed
    make_adapter(tmp_path, "outside")
    (root / "escape").symlink_to(tmp_path / "outside")  # escapes: skipped
    (root / "team-a" / "loop").symlink_to(root / "team-a")  # cycle: not followed forever
    (root / "team-a" / "to-root").symlink_to(root)  # the root itself: skipped
    (root / "broken").symlink_to(root / "missing")
    assert list_adapter_dirs(str(root)) == [
        "latest",
        "math",
        "math/checkpoint-100",
        "team-a/summarizer-v2",
    ]
    for adapter_id in list_adapter_dirs(str(root)):
        assert os.path.isfile(os.path.join(resolve_adapter_path(str(root), adapter_id), "adapter_config.json"))


def test_list_adapter_dirs_empty_root(root: Path) -> None:
    assert list_adapter_dirs(str(root)) == []
