"""Values whose methods are slow user code, and the processes of the off-loop tests:
importable, so a broker process can unpickle them.

Each slow method sleeps ``SLOW_S`` the first time it runs on a copy that was unpickled
(so in the broker, never in the process that made it), and first creates its ``marker``
file: the test starts its quick process once the broker is inside the slow method.
"""

from __future__ import annotations

import os
import time
from typing import Any

SLOW_S = 2.0


def _stall(marker: str) -> None:
    try:
        fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
    except FileExistsError:
        return  # only the first run anywhere is slow
    os.close(fd)
    time.sleep(SLOW_S)


class Slow:
    """A value whose unpickled copies are armed."""

    def __init__(self, marker: str, armed: bool = False) -> None:
        self.marker, self.armed = marker, armed

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self)._rebuild, (self.marker,))

    @classmethod
    def _rebuild(cls, marker: str) -> Slow:
        return cls(marker, armed=True)

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class SlowState(Slow):
    """Slow to unpickle (``__setstate__``)."""

    def __reduce__(self) -> tuple[Any, ...]:
        return (SlowState, (self.marker,), {"marker": self.marker})

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self.armed = True
        _stall(self.marker)


class SlowHash(Slow):
    def __hash__(self) -> int:
        if self.armed:
            _stall(self.marker)
        return 7

    def __eq__(self, other: object) -> bool:
        return isinstance(other, SlowHash)


class SlowEq(Slow):
    def __eq__(self, other: object) -> bool:
        if self.armed:
            _stall(self.marker)
        return isinstance(other, SlowEq)

    __hash__ = None  # type: ignore[assignment]


class SlowLt(Slow):
    def __init__(self, marker: str, armed: bool = False, n: int = 0) -> None:
        super().__init__(marker, armed)
        self.n = n

    def __reduce__(self) -> tuple[Any, ...]:
        return (SlowLt, (self.marker, True, self.n))

    def __lt__(self, other: SlowLt) -> bool:
        if self.armed:
            _stall(self.marker)
        return self.n < other.n


class SlowReduce(Slow):
    """Slow to pickle again once unpickled (what the broker does to send it back)."""

    def __reduce__(self) -> tuple[Any, ...]:
        if self.armed:
            _stall(self.marker)
        return (type(self)._rebuild, (self.marker,))


class BadState:
    """Its ``__setstate__`` raises."""

    def __reduce__(self) -> tuple[Any, ...]:
        return (BadState, (), {"x": 1})

    def __setstate__(self, state: dict[str, Any]) -> None:
        raise ValueError("bad state for the broker")


def slow_op(kind: str, target: Any, marker: str, out: Any) -> None:
    """The one slow operation of ``kind`` on ``target``; reports its result."""
    if kind == "setstate":
        target["x"] = SlowState(marker)
        result: Any = "stored"
    elif kind == "hash":
        target[SlowHash(marker)] = 1
        result = "stored"
    elif kind == "eq":
        result = SlowEq(marker) in target
    elif kind == "lt":
        target.sort()
        result = [v.n for v in target]
    elif kind == "reduce":
        result = type(target["x"]).__name__
    else:  # "queue": a slow item put into a Manager Queue
        target.put(SlowState(marker))
        result = "put"
    out.put(("slow", result))


def quick_ops(d: Any, cache: Any, lock: Any, go: Any, out: Any) -> None:
    """Once connected, and told to go: 50 round trips each on a dict, a mesh cache and a
    Lock; reports the seconds they took."""
    d["warm"] = 0
    if cache is not None:
        cache["warm"] = 0
    lock.acquire()
    lock.release()
    out.put(("ready", None))
    go.wait()
    start = time.monotonic()
    for i in range(50):
        d[f"k{i}"] = i
        if cache is not None:
            cache[f"k{i}"] = i
        lock.acquire()
        lock.release()
    assert d["k49"] == 49
    out.put(("quick", time.monotonic() - start))


def read_key(d: Any, key: str, out: Any) -> None:
    out.put(("read", type(d[key]).__name__))
