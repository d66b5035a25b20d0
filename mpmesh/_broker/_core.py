"""BrokerCore: the peer table, and one place that routes each message to its owner.

``on_message(peer, msg, now)``, ``on_peer_lost(peer, now)`` and ``on_tick(now)`` mutate
state and return the actions to perform; the I/O driver (``_io/_loop.py``) performs them.
Shared-state components (cache, locks, pub/sub, objects, ...) plug in by name and receive
the ``Op`` messages addressed to them.
"""

from __future__ import annotations

import heapq
import itertools
import random
from dataclasses import dataclass, field
from typing import Final, Protocol

from .._wire._messages import (
    Cancel, ErrorCode, Failure, Goodbye, Heartbeat, Hello, Message, Op, Ready, Reply,
    Request, Role, Serve,
)
from ._actions import WARNING, Action, Close, Notify, Send
from ._health import HealthCheck
from ._jobs import UNLIMITED, Group, Worker, WorkerState
from ._limits import FOREVER
from ._ring import KINDS, RingReader
from ._routing import STRATEGIES, Router

__all__ = ["LOCAL_PEER", "BrokerCore", "Component", "Peer"]

# The peer id of the in-process host (a Master's own client). Socket peers start at 1.
LOCAL_PEER: Final = 0
# Who a write taken from the write ring comes from: nobody waits for its answer.
RING_PEER: Final = -1


class Component(Protocol):
    """Broker-held state reached through ``Op`` messages (see ``_broker/_cache.py``...)."""

    def on_op(self, peer: int, msg: Op, now: float) -> list[Action]: ...

    def on_peer_lost(self, peer: int, now: float) -> list[Action]: ...

    def on_tick(self, now: float) -> list[Action]: ...

    def next_deadline(self) -> float | None: ...

    # Optional: ``on_idle(now) -> list[Action]``, run every few tens of milliseconds.
    # Optional: how many timers the component has set so far (any count that grows with
    # each). An Op to a component that has it and left it unchanged set no timer, so the
    # loop need not ask every component for its next deadline again (``timers_moved``).
    # timers: int


@dataclass(eq=False, slots=True)
class Peer:
    id: int
    instance_id: int = -1
    role: Role = Role.CLIENT
    pid: int = 0
    name: str = ""
    group: str = ""
    hostname: str = ""
    worker: Worker | None = None
    last_seen: float = 0.0
    leaving: bool = False   # it said Goodbye: a clean exit, not a crash
    hello: bool = False
    extra: dict[str, object] = field(default_factory=dict)
    # The pid the OS (or our zygote) says is at the other end; None where nothing says
    # (TCP), and the Hello's own pid is taken on its word.
    known_pid: int | None = None


class BrokerCore:
    """All broker state; pure: no I/O, no threads, no clock."""

    def __init__(self, *, rng: random.Random | None = None, first_instance: int = 1) -> None:
        """``first_instance``: the first instance id handed out (a host of a mesh across
        hosts has a block of ids of its own)."""
        self.router = Router(rng or random.Random())
        self.health = HealthCheck()  # of the router's workers
        self.peers: dict[int, Peer] = {}
        self.by_instance: dict[int, Peer] = {}
        self.components: dict[str, Component] = {}
        self._instances = itertools.count(first_instance)
        self.ops = 0
        # Where local processes leave plain writes (``_ring``); the owner sets it.
        self.ring: RingReader | None = None
        # (deadline, peer): a peer that has not said Hello by then is closed (stale
        # entries, of peers gone or introduced, are skipped).
        self._hello_due: list[tuple[float, int]] = []
        # Hellos naming a supervised child whose pid its supervisor has not reported yet.
        self._held: dict[int, Hello] = {}
        # Whether a timer may have been set since the owner last cleared this: until then
        # the owner may keep using the ``next_deadline()`` it read. Set by every entry
        # point but an Op that set no timer; whoever changes state directly (a Master
        # through the router) sets it too.
        self.timers_moved = True

    # -- peers ------------------------------------------------------------------------------

    def on_connect(self, peer: int, now: float, *, pid: int | None = None,
                   hello_by: float | None = None) -> None:
        """A socket peer connected (and authenticated); it must say Hello first.

        ``pid``: the process the OS says connected (None: unknown); a Hello must name it.
        ``hello_by``: when the peer is closed unless its Hello was taken (None: never, for
        a connection our own zygote made).
        """
        self.timers_moved = True
        self.peers[peer] = Peer(peer, last_seen=now, known_pid=pid)
        if hello_by is not None:
            heapq.heappush(self._hello_due, (hello_by, peer))

    def add_local(self, name: str, pid: int, hostname: str, now: float) -> Peer:
        """Register the in-process host; it serves requests whose target is ``""``."""
        self.timers_moved = True
        peer = self.peers[LOCAL_PEER] = Peer(LOCAL_PEER, role=Role.MASTER, pid=pid, name=name,
                                             hostname=hostname, last_seen=now, hello=True)
        peer.instance_id = next(self._instances)
        self.by_instance[peer.instance_id] = peer
        host = Worker(name or "master", None, UNLIMITED, supervised=False)
        self.router.attach(host, LOCAL_PEER, pid, peer.instance_id, UNLIMITED, now)
        self.router.host = peer.worker = host
        return peer

    def _hello(self, peer: Peer, msg: Hello, now: float) -> list[Action]:
        if msg.role not in Role._value2member_map_ or msg.capacity < 0:
            return [Close(peer.id, f"Hello with an unknown role {msg.role} or capacity {msg.capacity}")]
        if peer.known_pid is not None and msg.pid != peer.known_pid:
            return _refuse(peer, msg, f"it says it is pid {msg.pid}, but pid {peer.known_pid} connected")
        worker = self.router.workers.get(msg.name) if msg.name else None
        if worker is not None and worker.supervised:
            if worker.peer is not None or worker.state not in (
                    WorkerState.STARTING, WorkerState.LOST, WorkerState.STOPPING):
                return [Close(peer.id, f"a process named {msg.name!r} is already connected")]
            if not worker.started_pid:
                # The supervisor has not reported this start's pid yet (a script child can
                # connect before the zygote's report is read): wait for it (``child_started``)
                # until the peer's Hello deadline.
                self._held[peer.id] = msg
                return []
            if msg.pid != worker.started_pid:
                return _refuse(peer, msg, f"child {msg.name!r} was started as pid {worker.started_pid}")
        self._introduce(peer, msg)
        actions: list[Action] = []
        if worker is not None and worker.supervised:
            peer.worker = worker
            actions.append(Send(peer.id, Ready(peer.instance_id, msg.name)))
            actions += self.router.attach(worker, peer.id, msg.pid, peer.instance_id, msg.capacity, now)
            actions.append(Notify("child-started", {"name": worker.name, "pid": msg.pid,
                                                    "group": worker.group.name if worker.group else None,
                                                    "instance_id": peer.instance_id}))
            return actions
        name = msg.name or f"{'client' if peer.role is Role.CLIENT else 'peer'}-{peer.instance_id}"
        anon = Worker(name, None, msg.capacity, supervised=False)
        self.router.attach(anon, peer.id, msg.pid, peer.instance_id, msg.capacity, now)
        peer.worker = anon
        return [Send(peer.id, Ready(peer.instance_id, name))]

    def _introduce(self, peer: Peer, msg: Hello) -> None:
        """Take ``peer``'s Hello: who it is, and its instance id."""
        peer.hello = True
        peer.pid, peer.role, peer.name, peer.group, peer.hostname = (
            msg.pid, Role(msg.role), msg.name, msg.group, msg.hostname)
        peer.instance_id = next(self._instances)
        self.by_instance[peer.instance_id] = peer

    def child_started(self, name: str, pid: int, now: float) -> list[Action]:
        """The supervisor started child ``name`` as process ``pid``: only that process may
        say Hello with its name (until ``Router.worker_down``). Settles the Hellos held
        for it."""
        worker = self.router.workers.get(name)
        if worker is None or not worker.supervised:
            return []
        self.timers_moved = True
        worker.started_pid = pid
        actions: list[Action] = []
        for peer_id, msg in list(self._held.items()):
            if msg.name == name:
                del self._held[peer_id]
                actions += self._hello(self.peers[peer_id], msg, now)
        return actions

    def on_peer_lost(self, peer_id: int, now: float) -> list[Action]:
        self.timers_moved = True
        peer = self.peers.get(peer_id)
        if peer is None:
            return []
        self.by_instance.pop(peer.instance_id, None)
        self._held.pop(peer_id, None)
        actions = self.router.on_origin_lost(peer_id)
        worker = peer.worker
        if worker is not None and worker.peer == peer_id:
            actions += self.router.on_worker_lost(worker, now)
        # Components may still look the peer up (who it was, whether it said Goodbye)
        # while they let go of what it held.
        for component in self.components.values():
            actions += component.on_peer_lost(peer_id, now)
        del self.peers[peer_id]
        return actions

    def on_idle(self, now: float) -> list[Action]:
        """What components do now and then, whether or not anything arrived: the object
        table applies the writes processes left in shared memory (``_ring``)."""
        self.timers_moved = True
        actions = self.take_ring(now) if self.ring is not None and self.ring.pending() else []
        for component in self.components.values():
            idle = getattr(component, "on_idle", None)
            if idle is not None:
                actions += idle(now)
        return actions

    # -- messages ---------------------------------------------------------------------------

    def on_message(self, peer_id: int, msg: Message, now: float) -> list[Action]:
        peer = self.peers.get(peer_id)
        if peer is None:
            return []
        peer.last_seen = now
        worker = peer.worker
        if worker is not None:
            worker.last_beat = now
            if not worker.healthy:
                self.timers_moved = True
                return self.health.on_beat(worker, now) + self._dispatch(peer, msg, now)
        if type(msg) is Op:  # the most common message by far: shared-state operations
            return self._op(peer, msg, now)
        self.timers_moved = True
        return self._dispatch(peer, msg, now)

    def _dispatch(self, peer: Peer, msg: Message, now: float) -> list[Action]:
        peer_id = peer.id
        cls = type(msg)
        if cls is Request:
            return self._request(peer, msg, now)  # type: ignore[arg-type]
        if cls is Reply or cls is Failure:
            return self.router.on_result(peer_id, msg, peer.worker, now)  # type: ignore[arg-type]
        if cls is Op:
            return self._op(peer, msg, now)  # type: ignore[arg-type]
        if cls is Heartbeat:
            return []
        if cls is Serve:
            if peer.worker is None:
                return []
            return self.router.set_capacity(peer.worker, msg.capacity, now)  # type: ignore[attr-defined]
        if cls is Cancel:
            return self.router.cancel(peer_id, msg.rid)  # type: ignore[attr-defined]
        if cls is Hello:
            if peer.hello or peer_id in self._held:
                return [Close(peer_id, "Hello sent twice")]
            return self._hello(peer, msg, now)  # type: ignore[arg-type]
        if cls is Goodbye:
            peer.leaving = True
            return []
        return [Close(peer_id, f"{cls.__name__} is not a message peers may send")]

    def _request(self, peer: Peer, req: Request, now: float) -> list[Action]:
        if not peer.hello:
            return [Close(peer.id, "Request before Hello")]
        if req.target_id >= 0:
            target_peer = self.by_instance.get(req.target_id)
            where: Worker | Group | None = target_peer.worker if target_peer else None
            label = f"instance {req.target_id}"
        else:
            where = self.router.resolve(req.target)
            label = repr(req.target) if req.target else "the master"
        if where is None:
            if not req.target and req.target_id < 0:
                return [Send(peer.id, Failure(req.rid, ErrorCode.NO_HANDLER,
                                              "this mesh has no master to serve requests", b""))]
            return [Send(peer.id, Failure(req.rid, ErrorCode.NOT_FOUND,
                                          f"no child, group or node named {label}", b""))]
        return self.router.submit(peer.id, req, where, now)

    def _op(self, peer: Peer, msg: Op, now: float) -> list[Action]:
        ring = self.ring
        if ring is not None and ring.pending():
            return self.take_ring(now) + self._to_component(peer.id, msg, now)
        return self._to_component(peer.id, msg, now)

    def take_ring(self, now: float) -> list[Action]:
        """Apply the writes processes left in the write ring (``_ring``), in their order:
        before any operation, so none can read around them. Their answers go to nobody;
        what a write starts off the loop (an object holding user values) is kept."""
        actions: list[Action] = []
        if self.ring is None:
            return actions
        for kind, payload in self.ring.take():
            where = KINDS.get(kind)
            if where is None:
                continue
            for action in self._to_component(RING_PEER, Op(0, -1.0, where[0], where[1], payload), now):
                if type(action) is not Send or action.peer != RING_PEER:
                    actions.append(action)
        return actions

    def _to_component(self, peer_id: int, msg: Op, now: float) -> list[Action]:
        self.ops += 1
        component = self.components.get(msg.component)
        if component is None:
            return [Send(peer_id, Failure(msg.rid, ErrorCode.NOT_FOUND,
                                          f"this broker has no {msg.component!r} component", b""))]
        timers = getattr(component, "timers", None)
        actions = component.on_op(peer_id, msg, now)
        if timers is None or timers != component.timers:  # type: ignore[attr-defined]
            self.timers_moved = True
        return actions

    # -- time -------------------------------------------------------------------------------

    def on_tick(self, now: float) -> list[Action]:
        self.timers_moved = True
        actions = self.router.on_tick(now)
        if now >= self.health.next_check:
            actions += self.health.check(self.router.workers.values(), now)
        for component in self.components.values():
            actions += component.on_tick(now)
        due = self._hello_due
        while due and due[0][0] <= now:
            peer = self.peers.get(heapq.heappop(due)[1])
            if peer is None or peer.hello:
                continue
            held = self._held.pop(peer.id, None)
            if held is None:
                actions.append(Close(peer.id, "it said no Hello in time"))
            else:
                actions += _refuse(peer, held, f"no process was reported started as child {held.name!r} in time")
        return actions

    def next_deadline(self) -> float | None:
        """The earliest moment ``on_tick`` has work; asked once per pass of the loop."""
        best = self.router.next_deadline()
        check = self.health.next_check
        if check != FOREVER and (best is None or check < best):
            best = check
        for component in self.components.values():
            d = component.next_deadline()
            if d is not None and (best is None or d < best):
                best = d
        due = self._hello_due
        while due and ((peer := self.peers.get(due[0][1])) is None or peer.hello):
            heapq.heappop(due)
        if due and (best is None or due[0][0] < best):
            best = due[0][0]
        return best

    # -- the owner's controls -----------------------------------------------------------------

    def declare_group(self, name: str, strategy: str, max_concurrency: int | None = None) -> Group:
        if strategy not in STRATEGIES:
            raise ValueError(f"unknown strategy {strategy!r}; expected one of {', '.join(STRATEGIES)}")
        self.timers_moved = True
        if name in self.router.workers:
            raise ValueError(f"{name!r} is already the name of a child")
        return self.router.declare_group(name, strategy, max_concurrency)

    def declare_child(self, name: str, group: str | None, capacity: int) -> Worker:
        if name in self.router.workers or name in self.router.groups:
            raise ValueError(f"a child or group named {name!r} already exists")
        if not name:
            raise ValueError("a child needs a non-empty name")
        self.timers_moved = True
        return self.router.declare_worker(name, group, capacity)

    # -- control: what the mesh's owner (a Master) asks of its children's records -----------
    # Reads return the records themselves (the owner reads them under the core's lock);
    # changes return the actions they caused.

    def enable_heartbeats(self, interval: float | None, misses: int, now: float,
                          inspect: bool = False) -> None:
        """Watch children's heartbeats (see ``HealthCheck.enable``)."""
        self.timers_moved = True
        self.health.enable(interval, misses, now, inspect)  # type: ignore[arg-type]

    def on_running(self, running: set[int], now: float) -> list[Action]:
        """The driver's answer to ``Inspect``: which of the pids it named are on a CPU."""
        self.timers_moved = True
        return self.health.on_running(running, now)

    def child(self, name: str) -> Worker | None:
        return self.router.workers.get(name)

    def instance_id(self, peer: int = LOCAL_PEER) -> int:
        """The instance id of ``peer`` (by default the in-process host); -1 if unknown."""
        found = self.peers.get(peer)
        return found.instance_id if found is not None else -1

    def serves(self, target: str | int, *, free_only: bool) -> bool:
        """Whether this broker serves ``target`` (a node's instance id, a child or a
        group) — with ``free_only``, whether a member could take a request now.

        Safe to call without the core lock (it only reads, and tolerates a list that
        grows meanwhile): the Master routes with it, and a stale answer only sends a
        request to a queue instead of another host, or the other way round."""
        if isinstance(target, int):
            return target in self.by_instance
        worker = self.router.workers.get(target)
        if worker is not None:
            return worker.state is not WorkerState.DOWN and (worker.free or not free_only)
        group = self.router.groups.get(target)
        if group is None:
            return False
        if not free_only:
            return any(w.state is not WorkerState.DOWN for w in group.members)
        return group.has_room and any(w.free for w in group.members)

    def free_members(self) -> tuple[dict[str, int], dict[str, bool]]:
        """Per group, how many members could take a request now; per child, whether it could."""
        groups = {name: (sum(1 for w in g.members if w.free) if g.has_room else 0)
                  for name, g in self.router.groups.items()
                  if any(w.state is not WorkerState.DOWN for w in g.members)}
        children = {name: w.free for name, w in self.router.workers.items()
                    if w.supervised and w.state is not WorkerState.DOWN}
        return groups, children

    def children(self) -> dict[str, Worker]:
        return self.router.workers

    def group(self, name: str) -> Group | None:
        return self.router.groups.get(name)

    def groups(self) -> dict[str, Group]:
        return self.router.groups

    def requests(self) -> tuple[int, int]:
        """Requests queued (for a child or a group) and in flight."""
        router = self.router
        queued = sum(len(w.queue) for w in router.workers.values()) + sum(
            len(g.queue) for g in router.groups.values())
        return queued, len(router.jobs) - queued

    def forget_child(self, name: str) -> None:
        """Drop child ``name``'s record (it never started)."""
        worker = self.router.workers.get(name)
        if worker is not None:
            self.timers_moved = True
            self.router.forget(worker)

    def configure_group(self, name: str, now: float, *, strategy: str | None = None,
                        max_concurrency: int | None = None) -> list[Action]:
        """Change a group's strategy or cap; what it may now start. KeyError: no group."""
        group = self.router.groups[name]
        if strategy is not None:
            if strategy not in STRATEGIES:
                raise ValueError(f"unknown strategy {strategy!r}; expected one of {', '.join(STRATEGIES)}")
            group.strategy = strategy
        if max_concurrency is not None:
            group.max_concurrency = max_concurrency
        self.timers_moved = True
        return self.router.pump_group(group, now)

    def child_down(self, name: str, how: str, now: float, *, restarting: bool = False,
                   unless_down: bool = False) -> list[Action]:
        """Child ``name``'s process is gone (``how`` says how); it is started again if
        ``restarting``. ``unless_down``: nothing if its record already says so."""
        worker = self.router.workers.get(name)
        if worker is None or (unless_down and worker.state is WorkerState.DOWN):
            return []
        self.timers_moved = True
        return self.router.worker_down(worker, how, now, restarting=restarting)

    def stop_children(self, names: list[str], timeout: float | None) -> list[Action]:
        """Ask children to finish what they hold and exit (``timeout``: None, no limit)."""
        self.timers_moved = True
        actions: list[Action] = []
        for name in names:
            worker = self.router.workers.get(name)
            if worker is not None:  # not forgotten meanwhile
                actions += self.router.stop_worker(worker, timeout if timeout is not None else -1.0)
        return actions

    def fail_all(self, code: ErrorCode, message: str) -> list[Action]:
        """Fail every request still held (the mesh is shutting down)."""
        self.timers_moved = True
        return self.router.fail_all(code, message)


def _refuse(peer: Peer, msg: Hello, why: str) -> list[Action]:
    """Close a peer whose Hello is not the truth (it knew the key: its owner should hear)."""
    claim = f"pid {msg.pid}, name {msg.name!r}" if msg.name else f"pid {msg.pid}"
    return [Close(peer.id, f"Hello refused: {why}"),
            Notify(WARNING, {"message": f"refused a Hello ({claim}): {why}"})]
