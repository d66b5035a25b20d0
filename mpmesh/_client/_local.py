"""``LocalClient``: the client of a process that hosts its broker (a Master, a Manager).

A request is handed to the core directly and replies arrive from the broker's thread.
A caller that will block on a request a child starts at once borrows that child's socket
and reads the reply itself (``BrokerLoop.submit_lent``): no thread hand-off.
"""


from __future__ import annotations

import concurrent.futures
from typing import TYPE_CHECKING

from .._errors import MeshClosed
from .._io import _deadline
from .._wire._messages import Failure, Message, Push, Reply, Request, check_size
from ._futures import Call, MeshFuture

if TYPE_CHECKING:
    from .._io._loop import BrokerLoop, Lease

from ._base import ClientBase

__all__ = ["LocalClient"]




class LocalClient(ClientBase):
    """A Master's client: messages go straight into the in-process broker core."""

    def __init__(self, loop: BrokerLoop) -> None:
        super().__init__()
        self._loop = loop

    def _send(self, msg: Message) -> None:
        check_size(msg)  # what goes on to a child is encoded by the broker, too late to refuse
        self._loop.submit_local(msg)

    def deliver(self, msgs: list[Message]) -> None:
        """Called by the broker (any thread, no lock held) with messages for us."""
        for msg in msgs:
            cls = type(msg)
            if cls is Reply or cls is Failure:
                self._resolve(msg)  # type: ignore[arg-type]
            elif cls is Push:
                self.on_push(msg)  # type: ignore[arg-type]
            else:
                self.on_incoming(msg)

    def _call(self, call: Call, msg: Request, deadline: float) -> object:
        # A child that starts the request at once has its socket lent to this thread
        # before the frame goes out: the reply is read here, not by the loop thread.
        lease = self._send_or_forget(self._submit_lent, msg)
        if lease is not None:
            call._latch.arm(lease.wake)
            try:
                self._loop.read_for(lease, call._settled, deadline)
            finally:
                call._latch.arm(None)
        return self.wait(call, deadline)

    def _submit_lent(self, msg: Request) -> Lease | None:
        check_size(msg)
        return self._loop.submit_lent(msg)

    def wait(self, fut: MeshFuture | Call, deadline: float) -> object:
        try:
            return fut.result(_deadline.remaining(deadline))
        except concurrent.futures.TimeoutError:
            if fut.done():
                return fut.result()
            raise self._timed_out(fut) from None

    def close(self, exc: BaseException | None = None) -> None:
        if self._closed is None:
            self._closed = exc or MeshClosed("the mesh was shut down")
            self._fail_pending(self._closed_error)
