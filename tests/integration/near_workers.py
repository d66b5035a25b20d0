"""Workers for the near-cache tests: importable, so ``spawn`` children can run them."""

from __future__ import annotations

import time
from typing import Any

ROUNDS = 200
DEADLINE_S = 30.0


def read_of(kind: str, obj: Any) -> Any:
    if kind == "dict":
        return obj["k"]
    if kind == "list":
        return obj[0]
    if kind == "value":
        return obj.value
    return obj["k"]  # a mesh cache


def write_to(kind: str, obj: Any, value: int) -> None:
    if kind == "dict":
        obj["k"] = value
        obj["other"] = -value  # writes of other keys: no reason to refresh "k"
    elif kind == "list":
        obj[0] = value
    elif kind == "value":
        obj.value = value
    else:
        obj["k"] = value
        obj["other"] = -value


def writer(kind: str, obj: Any, out: Any) -> None:
    """Write 1..ROUNDS, noting when each write began and ended (ns, system-wide clock)."""
    history = []
    for value in range(1, ROUNDS + 1):
        start = time.monotonic_ns()
        write_to(kind, obj, value)
        history.append((start, time.monotonic_ns(), value))
    out.put(("w", history, 0))


def reader(kind: str, obj: Any, out: Any) -> None:
    """Read until the last value shows up, noting each read's interval and value; then
    say how many of this process's reads its own copies served."""
    from mpmesh import _near

    read_of(kind, obj)  # connected, and holding a copy, before the writer starts
    out.put(("ready", [], 0))
    history = []
    deadline = time.monotonic() + DEADLINE_S
    while time.monotonic() < deadline:
        start = time.monotonic_ns()
        value = read_of(kind, obj)
        history.append((start, time.monotonic_ns(), value))
        if value == ROUNDS:
            break
    out.put(("r", history, _near.counters()["near_hits"]))


def hold_then_read(obj: Any, conn: Any) -> None:
    """Read (keeping a copy), say so, wait for the word that the value changed, read again."""
    first = obj["k"]
    for _ in range(100):
        obj["k"]  # served from the copy now
    conn.send(first)
    conn.recv()
    conn.send(obj["k"])
    conn.close()


def hold_forever(child: Any) -> None:
    """A Master's child that keeps a copy of cache "c" key "k" and answers "ready"."""

    @child.handler("ready")
    def ready(_: object) -> int:
        cache = child.cache("c")
        cache["k"]
        return cache["k"]  # type: ignore[no-any-return]
