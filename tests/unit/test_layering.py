"""``_wire`` and ``_broker`` are sans-IO (no sockets, threads, clocks or OS calls). Their imports are checked with ``ast``."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import mpmesh

PACKAGE_DIR = Path(mpmesh.__file__).parent
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
    """Absolute names of every module ``source`` imports (relative imports resolved)."""
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


PURE_FILES = sorted(p for pkg in PURE_PACKAGES for p in (PACKAGE_DIR / pkg).glob("*.py"))


def test_the_pure_packages_exist() -> None:
    names = {p.name for p in PURE_FILES}
    assert {"_frames.py", "_messages.py", "_connection.py", "_codec.py", "_pool.py",
            "_core.py", "_routing.py", "_actions.py"} <= names


@pytest.mark.parametrize("path", PURE_FILES, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_pure_core_imports_no_io(path: Path) -> None:
    module = module_name(path)
    bad = violations(path.read_text(), module, path.name == "__init__.py")
    assert not bad, f"{module} imports {bad}: _wire/_broker must stay sans-IO"


# -- the checker itself must be able to fail ------------------------------------------------

@pytest.mark.parametrize(("source", "module", "expected"), [
    ("import socket", "mpmesh._wire._frames", ["socket"]),
    ("import os.path", "mpmesh._broker._core", ["os.path"]),
    ("from time import monotonic", "mpmesh._broker._core", ["time"]),
    ("def f():\n    import threading", "mpmesh._broker._core", ["threading"]),
    ("from concurrent.futures import Future", "mpmesh._wire._x", ["concurrent.futures"]),
    ("from .._io import _loop", "mpmesh._broker._core", ["mpmesh._io"]),
    ("from .._io._loop import BrokerLoop", "mpmesh._wire._x", ["mpmesh._io._loop"]),
    ("from ..import _client", "mpmesh._broker._core", ["mpmesh._client"]),
    ("from mpmesh._master import Master", "mpmesh._broker._core", ["mpmesh._master"]),
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


def test_relative_imports_resolve() -> None:
    assert imported_modules("from .._errors import X", "mpmesh._wire._frames") == ["mpmesh._errors"]
    assert imported_modules("from ._frames import X", "mpmesh._wire._messages") == ["mpmesh._wire._frames"]
    assert imported_modules("from . import _core", "mpmesh._broker", True) == ["mpmesh._broker._core"]
