"""The import direction of the project, read from the source with ``ast``: every import statement of aspen/,
engine/ and clients/ (module level, inside functions, under ``TYPE_CHECKING``, and ``import_module`` calls with a
literal name) must follow :data:`LAYERS`, the torch-free and client rules below it, and form no cycle.

A violation prints as ``module:line -> target (rule)``. ``from X import Y`` counts as an import of ``X.Y`` when
that is a module, else of ``X``; a package's ``__init__`` is a module of its own (importing ``a.b`` is not counted
as importing ``a``)."""
from __future__ import annotations

import ast
import os
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from fnmatch import fnmatchcase
from pathlib import Path

#: The library's layers, lowest first. A module may import its own layer and the layers listed before it, never
#: one listed after it. A pattern names a module; ``pkg.*`` names every module below ``pkg``. A module belongs
#: to the layer of the longest pattern it matches.
LAYERS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("base", ("aspen.errors", "aspen.files")),  # errors, the cache home and its file locks
    ("kernels", ("aspen.kernels", "aspen.kernels.*")),
    ("model", ("aspen.model", "aspen.model.*")),
    ("lora", ("aspen.lora", "aspen.lora.*")),
    ("language model", ("aspen", "aspen.language_model")),  # "aspen" is the facade, aspen/__init__.py
    ("train", ("aspen.train", "aspen.train.*")),
    ("demo", ("aspen.demo", "aspen.demo.*")),
    ("bookkeeping", ("engine.scheduling", "engine.scheduling.*", "engine.adapters", "engine.adapters.*")),
    ("engine core", ("engine", "engine.*")),
    ("server", ("engine.server", "engine.server.*", "engine.http", "engine.http.*")),  # the gRPC and HTTP fronts
)
#: Of the gRPC front, only these modules start the HTTP front (which may use the gRPC front's shared pieces:
#: options, status classification, metrics); nothing else of it imports engine.http.
HTTP = "engine.http"
HTTP_STARTERS = ("engine.server.app", "engine.server.command")
#: Torch-free packages: they import only the standard library, aspen.errors and each other.
TORCH_FREE = ("engine.scheduling", "engine.adapters")
TORCH_FREE_MAY_IMPORT = ("aspen.errors",)
#: clients.* imports only clients.* and third-party packages; of clients.*, only the generated gRPC stubs may
#: be imported from outside, and only by the packages named here.
CLIENTS = "clients"
STUBS = "clients.aspen.v1"
STUB_IMPORTERS = ("engine.server",)
#: The one CLI dispatch module: it imports across, lazily, so the rules above skip it (the cycle check does not).
EXEMPT = ("aspen.cli",)
#: Top-level folders scanned, and the project's other top-level packages, which none of them may import.
SCANNED = ("aspen", "engine", "clients")
APPS = ("benchmarks", "tests")
GENERATED = (STUBS,)  # modules that are import targets but are not read


def _under(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def layer_of(module: str) -> tuple[int, str] | None:
    """(rank, layer name) of ``module`` by its longest matching pattern; None where no pattern matches."""
    best: tuple[int, int, str] | None = None
    for rank, (name, patterns) in enumerate(LAYERS):
        for pattern in patterns:
            if fnmatchcase(module, pattern) and (best is None or len(pattern) > best[0]):
                best = (len(pattern), rank, name)
    return None if best is None else (best[1], best[2])


@dataclass(frozen=True)
class Import:
    source: str  # importing module
    line: int
    target: str  # imported project module, or the imported name where it is not a project module

    def __str__(self) -> str:
        return f"{self.source}:{self.line} -> {self.target}"


def find_modules(root: Path) -> dict[str, Path | None]:
    """Dotted name -> file of every module under the scanned folders; generated modules map to None (not read)."""
    modules: dict[str, Path | None] = {}
    for top in SCANNED:
        for path in sorted((root / top).rglob("*.py")):
            parts = list(path.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            name = ".".join(parts)
            modules[name] = None if any(_under(name, g) for g in GENERATED) else path
    return modules


def _resolve(name: str, modules: dict) -> str:
    """The longest prefix of ``name`` that is a project module (``name`` itself where none is)."""
    parts = name.split(".")
    for n in range(len(parts), 0, -1):
        if ".".join(parts[:n]) in modules:
            return ".".join(parts[:n])
    return name


def _package_of(module: str, path: Path) -> str:
    return module if path.name == "__init__.py" else module.rpartition(".")[0]


def imports_of(module: str, path: Path, modules: dict) -> list[Import]:
    """Every import ``module`` makes, wherever in the file it stands."""
    found: list[Import] = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                package = _package_of(module, path).split(".")
                anchor = ".".join(package[:len(package) - node.level + 1])
                base = f"{anchor}.{base}" if base else anchor
            names = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
        elif (isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant)
              and isinstance(node.args[0].value, str)
              and getattr(node.func, "attr", getattr(node.func, "id", None)) in ("import_module", "__import__")):
            names = [node.args[0].value]
        found += [Import(module, node.lineno, _resolve(n, modules)) for n in dict.fromkeys(names)]
    return found


def import_graph(root: Path) -> tuple[dict[str, Path | None], list[Import]]:
    modules = find_modules(root)
    edges = [imp for name, path in modules.items() if path is not None for imp in imports_of(name, path, modules)]
    return modules, edges


def rule_broken(imp: Import, modules: dict) -> str | None:
    """The rule ``imp`` breaks, or None."""
    src, dst = imp.source, imp.target
    if any(_under(src, e) for e in EXEMPT):
        return None
    top = dst.partition(".")[0]
    if any(_under(dst, e) for e in EXEMPT):
        return "nothing imports the CLI dispatch module"
    if _under(src, CLIENTS):
        if top in SCANNED + APPS and not _under(dst, CLIENTS):
            return "clients import only clients.* and third-party packages"
        return None
    if any(_under(src, p) for p in TORCH_FREE):
        if any(_under(dst, p) for p in TORCH_FREE + TORCH_FREE_MAY_IMPORT):
            return None
        if top in sys.stdlib_module_names:
            return None
        return "torch-free: only the standard library, aspen.errors and " + " / ".join(TORCH_FREE)
    if top in APPS:
        return f"the library imports no {top}"
    if _under(dst, CLIENTS):
        if _under(dst, STUBS) and any(_under(src, p) for p in STUB_IMPORTERS):
            return None
        if _under(dst, STUBS):
            return f"only {', '.join(STUB_IMPORTERS)} and clients.* import the generated stubs {STUBS}"
        return "nothing outside clients.* imports clients.*"
    if _under(dst, HTTP) and _under(src, "engine.server") and src not in HTTP_STARTERS:
        return f"of engine.server only {', '.join(HTTP_STARTERS)} import {HTTP}"
    if dst not in modules:
        return None  # third-party or standard library
    src_layer, dst_layer = layer_of(src), layer_of(dst)
    if src_layer is None or dst_layer is None:
        return f"not in LAYERS: {src if src_layer is None else dst}"
    if dst_layer[0] > src_layer[0]:
        return f"layer: {src_layer[1]} may not import {dst_layer[1]}"
    return None


def direction_violations(root: Path) -> list[str]:
    """``module:line -> target (rule)`` for every import against the rules, sorted."""
    modules, edges = import_graph(root)
    out = [f"{imp} ({rule})" for imp in edges if (rule := rule_broken(imp, modules)) is not None]
    out += [f"{m}: not in LAYERS" for m in modules if layer_of(m) is None and not _under(m, CLIENTS)
            and not any(_under(m, e) for e in EXEMPT)]
    return sorted(set(out))


def strongly_connected(graph: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's strongly connected components of ``graph`` (iterative), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, successors = work[-1]
            for nxt in successors:
                if nxt not in index:
                    index[nxt] = low[nxt] = len(index)
                    stack.append(nxt)
                    on_stack.add(nxt)
                    work.append((nxt, iter(sorted(graph.get(nxt, ())))))
                    break
                if nxt in on_stack:
                    low[node] = min(low[node], index[nxt])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    component = []
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        component.append(member)
                        if member == node:
                            break
                    components.append(sorted(component))
    return components


def cycles(root: Path) -> list[str]:
    """``module:line -> target (cycle: members)`` for every import inside a cycle of project modules."""
    modules, edges = import_graph(root)
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for imp in edges:
        if imp.target in modules:
            graph[imp.source].add(imp.target)
    out = []
    for component in strongly_connected(graph):
        if len(component) == 1 and component[0] not in graph[component[0]]:
            continue
        members = set(component)
        out += [f"{imp} (cycle: {', '.join(component)})" for imp in edges
                if imp.source in members and imp.target in members]
    return sorted(set(out))


ROOT = Path(__file__).resolve().parent.parent


def test_imports_point_one_way():
    violations = direction_violations(ROOT)
    assert not violations, "imports against the layers:\n" + "\n".join(violations)


def test_no_import_cycles():
    found = cycles(ROOT)
    assert not found, "import cycles:\n" + "\n".join(found)


def test_torch_free_packages_load_no_torch():
    """Import every module of the torch-free packages in a fresh interpreter; none may load torch."""
    names = [m for m in find_modules(ROOT) if any(_under(m, p) for p in TORCH_FREE)]
    assert len(names) >= 2 * len(TORCH_FREE)
    code = ("import importlib, sys\n"
            f"for name in {names!r}:\n"
            "    importlib.import_module(name)\n"
            "    if 'torch' in sys.modules:\n"
            "        sys.exit(f'importing {name} loaded torch')\n")
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                          env={**os.environ, "PYTHONPATH": path}, timeout=120, check=False)
    assert done.returncode == 0, done.stderr


FAKE_TREE = {
    "aspen/__init__.py": "from aspen.errors import AspenError\n",
    "aspen/errors.py": "class AspenError(Exception):\n    pass\n",
    "aspen/cli.py": "import engine.server.app\nimport clients.client\n",
    "aspen/model/__init__.py": "",
    "aspen/model/config.py": """\
        from aspen.errors import AspenError


        def adapters():
            from aspen.lora import op  # upward: model -> lora

            return op
        """,
    "aspen/lora/__init__.py": "",
    "aspen/lora/op.py": "from aspen.model import config\nfrom . import pool\n",
    "aspen/lora/pool.py": "import torch\n",
    "engine/__init__.py": "",
    "engine/llm_engine.py": """\
        import importlib

        from clients.aspen.v1 import aspen_pb2


        def serve():
            return importlib.import_module("engine.server.app")
        """,
    "engine/scheduling/__init__.py": "",
    "engine/scheduling/scheduler.py": "import collections\nimport torch\nfrom aspen.errors import AspenError\n",
    "engine/server/__init__.py": "",
    "engine/server/app.py": "from engine.server import servicers\nfrom clients.aspen.v1 import aspen_pb2\n",
    "engine/server/servicers.py": """\
        from typing import TYPE_CHECKING

        if TYPE_CHECKING:
            from engine.server.app import App
        """,
    "clients/__init__.py": "",
    "clients/client.py": "import grpc\nfrom clients.aspen.v1 import aspen_pb2\nimport aspen.lora.op\n",
    "clients/aspen/__init__.py": "",
    "clients/aspen/v1/__init__.py": "",
    "clients/aspen/v1/aspen_pb2.py": "import engine.server.app  # generated: not read\n",
}


def test_checker_reports_an_upward_import_and_a_cycle(tmp_path):
    for rel, text in FAKE_TREE.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(textwrap.dedent(text))
    assert direction_violations(tmp_path) == [
        "aspen.model.config:5 -> aspen.lora.op (layer: model may not import lora)",
        "clients.client:3 -> aspen.lora.op (clients import only clients.* and third-party packages)",
        ("engine.llm_engine:3 -> clients.aspen.v1.aspen_pb2 (only engine.server and clients.* import the generated "
         "stubs clients.aspen.v1)"),
        "engine.llm_engine:7 -> engine.server.app (layer: engine core may not import server)",
        ("engine.scheduling.scheduler:2 -> torch (torch-free: only the standard library, aspen.errors and "
         "engine.scheduling / engine.adapters)"),
    ]
    assert cycles(tmp_path) == [
        "aspen.lora.op:1 -> aspen.model.config (cycle: aspen.lora.op, aspen.model.config)",
        "aspen.model.config:5 -> aspen.lora.op (cycle: aspen.lora.op, aspen.model.config)",
        "engine.server.app:1 -> engine.server.servicers (cycle: engine.server.app, engine.server.servicers)",
        "engine.server.servicers:4 -> engine.server.app (cycle: engine.server.app, engine.server.servicers)",
    ]
    (tmp_path / "aspen/model/config.py").write_text("from aspen.errors import AspenError\n")
    (tmp_path / "engine/server/servicers.py").write_text("")
    (tmp_path / "engine/scheduling/scheduler.py").write_text("import collections\n")
    (tmp_path / "clients/client.py").write_text("import grpc\nfrom clients.aspen.v1 import aspen_pb2\n")
    (tmp_path / "engine/llm_engine.py").write_text("import engine.scheduling.scheduler\n")
    assert direction_violations(tmp_path) == [] and cycles(tmp_path) == []
