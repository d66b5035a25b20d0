"""The package layout is the layering: each package imports only from the ones below it.

``_wire`` and ``_broker`` are also sans-IO (no sockets, threads, clocks or OS calls), and
the module import graph has no cycles, lazy and ``TYPE_CHECKING`` imports included. All of
it is read from the source with ``ast``, so a new module is checked without being listed.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import mpmesh

PACKAGE_DIR = Path(mpmesh.__file__).parent

# Bottom to top. ``_errors`` is the base every layer raises from; the last row is the
# public facade (``mpmesh``, ``mpmesh.managers``, ``python -m mpmesh``).
LAYERS: tuple[tuple[str, ...], ...] = (
    ("_errors",),
    ("_wire",),
    ("_broker",),
    ("_io",),
    ("_client",),
    ("_host",),
    ("_state",),
    ("_redis",),
    ("_procs",),
    ("_pool",),
    ("_managers",),
    ("_mesh",),
    ("", "__main__", "managers"),
)
PURE_PACKAGES = ("_wire", "_broker")

# Standard-library modules that do I/O, start threads or processes, or read the clock.
FORBIDDEN = frozenset({
    "socket", "selectors", "select", "threading", "_thread", "os", "multiprocessing",
    "time", "subprocess", "signal", "asyncio", "concurrent", "importlib", "io", "shutil",
    "tempfile", "pathlib", "mmap", "fcntl",
})
# Serialization is one module's job; nothing else in the pure core may (un)pickle. The
# codec may also use ``io``, for the in-memory buffer its restricted unpickler reads.
CODEC_ONLY = frozenset({"pickle", "dill", "traceback", "io"})
CODEC_MODULE = "mpmesh._wire._codec"
ALLOWED_INTERNAL = ("mpmesh._wire", "mpmesh._broker", "mpmesh._errors")


def module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE_DIR.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imported_modules(source: str, module: str, is_package: bool = False) -> list[str]:
    """Absolute names of every module ``source`` imports, wherever the import sits
    (function bodies and ``if TYPE_CHECKING:`` included; relative imports resolved)."""
    found: list[str] = []
    base = module.split(".") if is_package else module.split(".")[:-1]
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                anchor = base[: len(base) - (node.level - 1)]
                prefix = ".".join(anchor + ([node.module] if node.module else []))
            else:
                prefix = node.module or ""
            if node.level and not node.module:
                found += [f"{prefix}.{alias.name}" for alias in node.names]
            else:
                found.append(prefix)
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
              and node.func.id == "__import__"):
            found.append("__import__")
    return found


def violations(source: str, module: str, is_package: bool = False) -> list[str]:
    """What a module of the pure core imports that it must not."""
    bad: list[str] = []
    for name in imported_modules(source, module, is_package):
        top = name.split(".")[0]
        if name == "__import__":
            bad.append("dynamic __import__()")
        elif top in FORBIDDEN and not (top in CODEC_ONLY and module == CODEC_MODULE):
            bad.append(name)
        elif top in CODEC_ONLY and module != CODEC_MODULE:
            bad.append(name)
        elif top == "mpmesh" and name != "mpmesh" and not name.startswith(ALLOWED_INTERNAL):
            bad.append(name)
        elif name == "mpmesh":
            bad.append("mpmesh (the public facade sits above the core)")
    return bad


def unit_of(module: str) -> str:
    """The top-level package or module of ``mpmesh`` that ``module`` belongs to."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def layer_of(unit: str) -> int:
    for i, row in enumerate(LAYERS):
        if unit in row:
            return i
    raise LookupError(f"mpmesh.{unit} is in no layer: add it to LAYERS")


def upward(module: str, imports: list[str]) -> list[str]:
    """The imports of ``module`` that reach a layer above its own."""
    mine = layer_of(unit_of(module))
    return [name for name in imports
            if name.split(".")[0] == "mpmesh" and layer_of(unit_of(name)) > mine]


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module, or a self-import."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:  # Tarjan; the graph is small enough for recursion
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            scc = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                scc.append(w)
                if w == v:
                    break
            if len(scc) > 1 or v in graph.get(v, ()):
                found.append(sorted(scc))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


ALL_FILES = sorted(PACKAGE_DIR.rglob("*.py"))
MODULES = {module_name(p): p for p in ALL_FILES}
PURE_FILES = [p for p in ALL_FILES if unit_of(module_name(p)) in PURE_PACKAGES]


def import_graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for module, path in MODULES.items():
        names = imported_modules(path.read_text(), module, path.name == "__init__.py")
        graph[module] = {n for n in names if n in MODULES}
    return graph


def test_every_top_level_package_and_module_has_a_layer() -> None:
    units = {unit_of(m) for m in MODULES}
    listed = {u for row in LAYERS for u in row}
    assert units <= listed, f"not in LAYERS: {sorted(units - listed)}"
    assert {"_frames.py", "_messages.py", "_connection.py", "_codec.py", "_pool.py", "_core.py",
            "_routing.py", "_actions.py"} <= {p.name for p in PURE_FILES}


@pytest.mark.parametrize("path", ALL_FILES, ids=lambda p: str(p.relative_to(PACKAGE_DIR)))
def test_imports_point_down(path: Path) -> None:
    module = module_name(path)
    bad = upward(module, imported_modules(path.read_text(), module, path.name == "__init__.py"))
    assert not bad, f"{module} (layer {unit_of(module) or 'mpmesh'}) imports {bad} from above it"


@pytest.mark.parametrize("path", PURE_FILES, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_pure_core_imports_no_io(path: Path) -> None:
    module = module_name(path)
    bad = violations(path.read_text(), module, path.name == "__init__.py")
    assert not bad, f"{module} imports {bad}: _wire/_broker must stay sans-IO"


def test_no_import_cycles() -> None:
    assert cycles(import_graph()) == []


# -- the checkers themselves must be able to fail --------------------------------------------

@pytest.mark.parametrize(("source", "module", "expected"), [
    ("import socket", "mpmesh._wire._frames", ["socket"]),
    ("import os.path", "mpmesh._broker._core", ["os.path"]),
    ("from time import monotonic", "mpmesh._broker._core", ["time"]),
    ("def f():\n    import threading", "mpmesh._broker._core", ["threading"]),
    ("from concurrent.futures import Future", "mpmesh._wire._x", ["concurrent.futures"]),
    ("from .._io import _loop", "mpmesh._broker._core", ["mpmesh._io"]),
    ("from .._io._loop import BrokerLoop", "mpmesh._wire._x", ["mpmesh._io._loop"]),
    ("from ..import _client", "mpmesh._broker._core", ["mpmesh._client"]),
    ("from mpmesh._mesh._master import Master", "mpmesh._broker._core", ["mpmesh._mesh._master"]),
    ("import mpmesh", "mpmesh._broker._core", ["mpmesh (the public facade sits above the core)"]),
    ("import pickle", "mpmesh._broker._core", ["pickle"]),
    ("import dill", "mpmesh._wire._connection", ["dill"]),
    ("m = __import__('socket')", "mpmesh._wire._x", ["dynamic __import__()"]),
    ("import pickle, traceback\ndef f():\n    import dill", CODEC_MODULE, []),
    ("from .._errors import RemoteProtocolError", "mpmesh._wire._frames", []),
    ("from ._frames import HEADER", "mpmesh._wire._messages", []),
    ("from .._wire._messages import Request", "mpmesh._broker._core", []),
    ("from . import _core", "mpmesh._broker", []),
    ("import heapq, random, struct, hmac, enum", "mpmesh._broker._routing", []),
])
def test_checker(source: str, module: str, expected: list[str]) -> None:
    assert violations(source, module, is_package=module == "mpmesh._broker") == expected


@pytest.mark.parametrize(("source", "module", "expected"), [
    ("from .._mesh._master import Master", "mpmesh._pool._api", ["mpmesh._mesh._master"]),
    ("if TYPE_CHECKING:\n    from .._procs._child import Child", "mpmesh._io._zygote",
     ["mpmesh._procs._child"]),
    ("def f():\n    from ..managers import Namespace", "mpmesh._mesh._master", ["mpmesh.managers"]),
    ("from .._client import _near", "mpmesh._io._loop", ["mpmesh._client"]),
    ("from .._procs._supervisor import Supervisor", "mpmesh._pool._api", []),
    ("from ._socket import SocketClient", "mpmesh._client._binding", []),
    ("from .._errors import MeshClosed", "mpmesh._wire._frames", []),
    ("from ._mesh._master import Master", "mpmesh", []),
])
def test_layer_checker(source: str, module: str, expected: list[str]) -> None:
    assert upward(module, imported_modules(source, module, module == "mpmesh")) == expected


def test_cycle_finder() -> None:
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"a"}}) == [["a"]]
    assert cycles({"a": {"b"}, "b": set(), "c": {"a", "b"}}) == []


def test_relative_imports_resolve() -> None:
    assert imported_modules("from .._errors import X", "mpmesh._wire._frames") == ["mpmesh._errors"]
    assert imported_modules("from ._frames import X", "mpmesh._wire._messages") == ["mpmesh._wire._frames"]
    assert imported_modules("from . import _core", "mpmesh._broker", True) == ["mpmesh._broker._core"]
