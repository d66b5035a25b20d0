"""Child-process targets for test_manager_faults (importable under spawn)."""

from __future__ import annotations

import threading
from typing import Any


def hold_lock_forever(lock: Any, ready: Any, never: Any) -> None:
    lock.acquire()
    ready.put("held")
    never.wait()  # until SIGKILL


def block_on_get(q: Any, ready: Any) -> None:
    ready.put("waiting")
    q.get()  # parked in the broker until SIGKILL


def create_objects(address: Any, authkey: bytes, passed: Any, ready: Any, never: Any, n: int) -> None:
    import mpmesh.managers

    m = mpmesh.managers.SyncManager(address=address, authkey=authkey)
    m.connect()
    keep = [m.dict({"i": i}) for i in range(n)]
    passed["child"] = len(keep)
    ready.put("created")
    never.wait()


def hammer(d: Any, lock: Any, threads: int, ops: int) -> None:
    def work(k: int) -> None:
        for i in range(ops):
            with lock:
                d[(k, i)] = i

    ts = [threading.Thread(target=work, args=(k,)) for k in range(threads)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()


def use_pickled(blob: bytes, out: Any) -> None:
    import pickle

    d = pickle.loads(blob)
    out.put(d["sender"])
