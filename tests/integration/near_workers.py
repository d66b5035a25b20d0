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
    from mpmesh._client import _near

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


class Point:
    """A value of the user's own class: never left in the write ring."""

    def __init__(self, x: int) -> None:
        self.x = x

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Point) and other.x == self.x

    __hash__ = None  # type: ignore[assignment]


def write_plainly(d: Any, ns: Any, v: Any, items: Any, n: int, out: Any) -> None:
    """Plain writes of every kind the ring takes, each read back at once; then how many of
    them this process left in the ring."""
    from mpmesh._client import _near

    before = _near.counters()["near_writes"]
    for i in range(n):
        d[f"k{i % 10}"] = i
        assert d[f"k{i % 10}"] == i
        ns.x = (i, "x")
        assert ns.x == (i, "x")
        v.value = float(i)
        assert v.value == float(i)
        items.append([i])
    out.put(_near.counters()["near_writes"] - before)


def write_in_order(d: Any, items: Any, out: Any) -> None:
    """Writes left in the ring mixed with calls sent to the broker, each checked at once."""
    from mpmesh._client import _near

    before = _near.counters()["near_writes"]
    seen = []
    for i in range(200):
        d["a"] = i                      # ring
        seen.append(d.pop("a"))         # sent: after the write above
        d["a"] = -i                     # ring: after the pop
        d.update(b=i)                   # sent
        d["b"] = d["b"] + 1             # ring, after a read that went to the broker
        items.append(i)                 # ring
        items.extend([i])               # sent
        assert "a" in d and d["a"] == -i and d["b"] == i + 1 and items[-2:] == [i, i]
    out.put((seen, _near.counters()["near_writes"] - before))


def write_then_die(d: Any, n: int) -> None:
    """Leave ``n`` writes in the ring, then die by SIGKILL before anything else."""
    import os
    import signal

    for i in range(n):
        d[i] = i
    os.kill(os.getpid(), signal.SIGKILL)


def write_many(d: Any, n: int, out: Any) -> None:
    """More writes than the ring holds at once (it fills: some are sent, none is lost)."""
    from mpmesh._client import _near

    before = _near.counters()["near_writes"]
    blob = "x" * 200
    for i in range(n):
        d[i % 1000] = (i, blob)
    out.put(_near.counters()["near_writes"] - before)


def count_under_lock(lock: Any, d: Any, rounds: int, out: Any) -> None:
    """``with lock: d["n"] += 1``, ``rounds`` times; then how many lock operations this
    process did through the lock's cell."""
    from mpmesh._broker import _lockcells

    before = _lockcells.fast[0]
    for _ in range(rounds):
        with lock:
            d["n"] = d["n"] + 1
    out.put(_lockcells.fast[0] - before)


def hold_and_die(lock: Any, conn: Any) -> None:
    """Take the lock, say so (through a Pipe: nothing is left unsent), and die by SIGKILL
    holding it."""
    import os
    import signal

    assert lock.acquire(timeout=5)
    conn.send("holding")
    os.kill(os.getpid(), signal.SIGKILL)


def hold_and_exit(lock: Any, out: Any) -> None:
    """Take the lock, say so, and exit cleanly holding it."""
    assert lock.acquire(timeout=5)
    out.put("holding")


def wait_for_lock(lock: Any, out: Any) -> None:
    """Say "waiting", then take the lock (however long it takes) and report the time."""
    out.put("waiting")
    start = time.monotonic()
    got = lock.acquire(timeout=30)
    out.put((got, time.monotonic() - start))
    if got:
        lock.release()


def notify_under(cond: Any, d: Any, out: Any) -> None:
    """Wait on ``cond`` until d["go"] is set, then say so."""
    with cond:
        out.put("waiting")
        ok = cond.wait_for(lambda: d.get("go"), timeout=20)
    out.put(ok)


def cache_writes(name: str, n: int, out: Any) -> None:
    """Set keys of mesh cache ``name`` through a ``connect()``ed handle, reading each back
    at once; then how many writes went through the ring and how many reads were copies."""
    import mpmesh
    from mpmesh._client import _near

    with mpmesh.connect(name, autospawn=False) as h:
        cache = h.cache("c")
        before = _near.counters()
        for i in range(n):
            cache[f"k{i % 10}"] = i
            assert cache[f"k{i % 10}"] == i
        after = _near.counters()
        out.put((after["near_writes"] - before["near_writes"], after["near_hits"] - before["near_hits"]))
