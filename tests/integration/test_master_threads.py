"""A Master's bookkeeping while other threads change it.

A Pool on a Master starts and forgets children from its own thread (recycled workers),
and the zygote can die while a thread is starting a child: listing, stopping and
starting children must not trip over each other. Each test forces its interleaving with
a hook at the exact point where the other thread would step in.
"""

from __future__ import annotations

import concurrent.futures
import os
import signal
import threading
from collections.abc import Mapping

import mpmesh
from tests.conftest import wait_for
from tests.integration import workers

WAIT_S = 10.0
# How long a listing holding the core lock lets another thread try to forget a child:
# that thread must still be waiting for the lock when the time is up.
OVERLAP_S = 0.3


class _ActsAtFirstLookup(dict):  # type: ignore[type-arg]
    """The router's children by name; at the first lookup, ``act`` runs on another
    thread, and the lookup goes on once that thread is done or ``OVERLAP_S`` has passed."""

    def __init__(self, content: Mapping[str, object], act: threading.Thread) -> None:
        super().__init__(content)
        self._act: threading.Thread | None = act

    def _step_in(self) -> None:
        act, self._act = self._act, None
        if act is not None:
            act.start()
            act.join(OVERLAP_S)

    def get(self, *args: object) -> object:
        self._step_in()
        return super().get(*args)

    def __contains__(self, key: object) -> bool:
        self._step_in()
        return super().__contains__(key)

    def __getitem__(self, key: str) -> object:
        self._step_in()
        return super().__getitem__(key)


def test_listing_children_while_another_thread_forgets_one() -> None:
    with mpmesh.Master() as m:
        m.spawn_group("g", workers.basic, size=3)
        m.shutdown_child("g-2")  # exited, as a recycled Pool worker has
        forget = threading.Thread(target=m._forget, args=("g-2",))
        router = m._core.router
        original = router.workers
        router.workers = _ActsAtFirstLookup(original, forget)
        try:
            listed = m.children()
            forget.join(WAIT_S)
        finally:
            original.clear()
            original.update(router.workers)
            router.workers = original
        assert listed == ["g-0", "g-1"]
        assert m.children() == ["g-0", "g-1"] and "g-2" not in m._specs
        assert m.send_request("echo", "g", "still serving") == "still serving"


def test_the_zygote_dying_while_a_child_is_being_started_leaves_the_broker_serving() -> None:
    with mpmesh.Master() as m:
        sup = m._supervisor
        first: concurrent.futures.Future[int] = concurrent.futures.Future()
        late: concurrent.futures.Future[int] = concurrent.futures.Future()
        # A thread records a start just as the broker fails the ones the zygote owed:
        # the moment the first is failed, the second is recorded.
        first.add_done_callback(lambda _: sup._starting.__setitem__(-2, ("late", late)))
        with sup._lock:
            sup._starting[-1] = ("first", first)
        zygote = sup._zygote_pid or (sup._zygote_popen.pid if sup._zygote_popen else 0)
        assert zygote > 0  # (os.kill(0, ...) would signal the whole process group)
        os.kill(zygote, signal.SIGKILL)
        assert wait_for(first.done, WAIT_S)
        assert isinstance(first.exception(), mpmesh.MeshError)
        assert m._loop._thread is not None and m._loop._thread.is_alive()
        cache = m.cache("after")
        cache["k"] = 1
        assert cache["k"] == 1
        with sup._lock:
            sup._starting.pop(-2, None)  # never sent to any zygote: nothing will answer it
