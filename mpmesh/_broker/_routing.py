"""Request lifecycle: queues, load-balancing strategies, the in-flight table, deadlines.

Theory of operation
-------------------
A *worker* is a place requests are delivered to: a child the master spawned (known by
name before its process connects), the master itself (target ``""``), or any other
connected peer (addressable only by instance id). A *group* is a named list of workers
with a strategy and an optional cap on in-flight requests.

Every request becomes a *job* with a broker-wide id (``brid``). A job waits in the
priority queue of its target (a worker's own queue, or its group's queue) until a
worker with spare capacity takes it; then it is RUNNING and listed in that worker's
``running`` table until the worker answers. Sequential workers have capacity 1, so the
broker, not the child, decides the order in which they see requests.

    submit ──► QUEUED ──(worker has capacity)──► RUNNING ──(Reply/Failure)──► DONE
                 │                                  │
                 └─(deadline)─► DONE (never runs)   ├─(deadline)─► ABANDONED ──(late answer)──► DONE
                                                    └─(worker lost)─► retry: QUEUED | DONE (WorkerLost)

An ABANDONED job still occupies its worker's capacity: the work really is still
running there, and the late answer is dropped when it arrives.

Workers coming and going (lost, down, stopping, forgotten) stay here: each of those
settles the jobs the worker held (retried, failed or dropped), which is this table's
business. The records themselves are in ``_jobs``; heartbeats in ``_health``.
"""

from __future__ import annotations

import heapq
import itertools
import random
from collections.abc import Callable
from typing import Final

from .._wire._messages import Cancel, ErrorCode, Failure, Reply, Request, Shutdown
from ._actions import Action, Notify, Send
from ._jobs import (
    J_ABANDONED, J_DELAYED, J_DONE, J_QUEUED, J_RUNNING, W_DOWN, W_LOST, W_READY, W_STARTING,
    W_STOPPING, Group, Job, JobQueue, Worker, describe, not_taking,
)
from ._limits import FOREVER, MAX_IN_FLIGHT_PER_PEER

__all__ = ["EMA_ALPHA", "LOST_GRACE_S", "STRATEGIES", "Router"]

STRATEGIES: Final = ("round-robin", "random", "least-busy")
# How long a worker whose connection dropped keeps its jobs while we wait to learn how
# its process ended (so WorkerLost can name the signal). Longer delays the error.
LOST_GRACE_S: Final = 0.5
# Smoothing factor of the response-time moving average: ~the last 10 requests dominate.
EMA_ALPHA: Final = 0.2


def _bad_times(req: Request) -> str:
    """What is wrong with a request's timeout or retry delay (NaN, infinite, negative), or "".

    Such a number would corrupt the order of the timer heaps: every later timer could stall.
    """
    if req.timeout != -1.0 and not 0.0 <= req.timeout < _FOREVER_S:
        return f"a request's timeout must be a finite number of seconds >= 0, not {req.timeout!r}"
    if not 0.0 <= req.retry_delay < _FOREVER_S:
        return f"a request's retry_delay must be a finite number of seconds >= 0, not {req.retry_delay!r}"
    return ""


_FOREVER_S: Final = 1e9  # ~32 years: longer is a mistake, or an attack on the timer heaps


class Router:
    """Owns workers, groups and jobs; every method returns the actions to perform."""

    def __init__(self, rng: random.Random) -> None:
        self._rng = rng
        self.workers: dict[str, Worker] = {}
        self.groups: dict[str, Group] = {}
        self.jobs: dict[int, Job] = {}          # brid -> job, QUEUED, DELAYED or RUNNING
        self._by_origin: dict[tuple[int, int], Job] = {}
        self._in_flight: dict[int, int] = {}    # origin -> its jobs in ``_by_origin``
        # (deadline, brid): the job is looked up in ``jobs`` (gone: finished). Without a
        # reference in it, the collector soon stops walking each of thousands of entries.
        self._timers: list[tuple[float, int]] = []
        self._delayed: list[tuple[float, int, Job]] = []      # retries waiting out retry_delay
        self._lost: list[tuple[float, int, Worker]] = []      # LOST workers' grace deadlines
        self._brids = itertools.count(1)
        self._seqs = itertools.count()
        self.host: Worker | None = None

    # -- declarations (from the mesh's owner) -----------------------------------------

    def declare_group(self, name: str, strategy: str, max_concurrency: int | None) -> Group:
        group = self.groups.get(name)
        if group is None:
            group = self.groups[name] = Group(name, strategy, max_concurrency=max_concurrency)
        return group

    def declare_worker(self, name: str, group: str | None, capacity: int) -> Worker:
        worker = Worker(name, self.groups[group] if group else None, capacity)
        self.workers[name] = worker
        if worker.group is not None:
            worker.group.members.append(worker)
        return worker

    def attach(self, worker: Worker, peer: int, pid: int, instance_id: int,
               capacity: int, now: float) -> list[Action]:
        """A worker's process has connected: it may now take requests."""
        worker.peer, worker.pid, worker.instance_id = peer, pid, instance_id
        worker.capacity = max(0, capacity)
        worker.last_beat = now
        worker.healthy = True
        if worker.state is W_STOPPING:
            return [Send(peer, Shutdown(-1.0))]  # shut down while it was starting
        worker.state = W_READY
        return self._pump_worker(worker, now)

    def set_capacity(self, worker: Worker, capacity: int, now: float) -> list[Action]:
        worker.capacity = max(0, capacity)
        actions = self._pump_worker(worker, now)
        if worker.group is not None:
            actions += self.pump_group(worker.group, now)
        return actions

    # -- requests ------------------------------------------------------------------------

    def resolve(self, target: str) -> Worker | Group | None:
        if not target:
            return self.host
        return self.workers.get(target) or self.groups.get(target)

    def submit(self, origin: int, req: Request, where: Worker | Group, now: float) -> list[Action]:
        bad = _bad_times(req)
        if bad:
            return [Send(origin, Failure(req.rid, ErrorCode.BAD_REQUEST, bad, b""))]
        timeout = req.timeout if req.timeout >= 0 else None
        retries = max(0, req.retries)
        job = Job(  # positional: with keywords it builds ~1.7x slower, on every request
            next(self._brids), origin, req.rid, req.action, req.payload, req.priority,
            timeout, req.target or where.name,
            now + timeout if timeout is not None else float("inf"),
            where, retries, req.retry_delay, 1, 1 + retries, next(self._seqs),
        )
        unavailable = self._unavailable(where)
        if unavailable:
            return [Send(origin, Failure(req.rid, ErrorCode.UNAVAILABLE, unavailable, b""))]
        key = (origin, req.rid)
        if key in self._by_origin:  # would orphan the first: its answer could never arrive
            return [Send(origin, Failure(req.rid, ErrorCode.BAD_REQUEST,
                                         f"request id {req.rid} is already in flight", b""))]
        in_flight = self._in_flight.get(origin, 0)
        if in_flight >= MAX_IN_FLIGHT_PER_PEER:
            return [Send(origin, Failure(req.rid, ErrorCode.BAD_REQUEST,
                                         f"too many requests in flight from one process (the limit is "
                                         f"{MAX_IN_FLIGHT_PER_PEER:,})", b""))]
        self._in_flight[origin] = in_flight + 1
        self.jobs[job.brid] = job
        self._by_origin[key] = job
        if timeout is not None:
            heapq.heappush(self._timers, (job.deadline, job.brid))
        return self._enqueue(job, where, now)

    def _unavailable(self, where: Worker | Group) -> str:
        if isinstance(where, Worker):
            if not_taking(where.state):
                return f"child {where.name!r} is not running ({where.down_reason or where.state.value})"
            return ""
        for w in where.members:  # on every request: a plain loop, no generator
            if not not_taking(w.state):
                return ""
        return f"group {where.name!r} has no running member"

    def _enqueue(self, job: Job, where: Worker | Group, now: float) -> list[Action]:
        job.state = J_QUEUED
        if not where.queue.live:
            # Fast path: nothing waits ahead of this job, so a free worker takes it now.
            if isinstance(where, Worker):
                group = where.group
                if where.free and (group is None or group.has_room):
                    return [self._start(job, where, now)]
            elif where.has_room:
                worker = self._pick(where)
                if worker is not None:
                    return [self._start(job, worker, now)]
        where.queue.push(job)
        if isinstance(where, Worker):
            return self._pump_worker(where, now)
        return self.pump_group(where, now)

    def pump_group(self, group: Group, now: float) -> list[Action]:
        """Start ``group``'s queued jobs on free members while it has room (also after its
        owner changed its strategy or cap)."""
        actions: list[Action] = []
        while group.queue.live and group.has_room:
            worker = self._pick(group)
            if worker is None:
                break
            actions.append(self._start(group.queue.pop(), worker, now))
        return actions

    def _pump_worker(self, worker: Worker, now: float) -> list[Action]:
        actions: list[Action] = []
        group = worker.group
        while worker.free and (group is None or group.has_room):
            own = worker.queue.peek()
            shared = group.queue.peek() if group is not None else None
            if own is None and shared is None:
                break
            if shared is None or (own is not None and (-own.priority, own.seq) < (-shared.priority, shared.seq)):
                job = worker.queue.pop()
            else:
                assert group is not None
                job = group.queue.pop()
            actions.append(self._start(job, worker, now))
        return actions

    def _pick(self, group: Group) -> Worker | None:
        members = group.members
        n = len(members)
        if group.strategy == "random":
            free = [w for w in members if w.free]
            return self._rng.choice(free) if free else None
        best: Worker | None = None
        for i in range(n):
            w = members[(group.rr + i) % n]
            if not w.free:
                continue
            if group.strategy == "round-robin":
                group.rr = (group.rr + i + 1) % n
                return w
            if best is None or w.busy < best.busy:
                best = w
        if best is not None:
            group.rr = (members.index(best) + 1) % n
        return best

    def _start(self, job: Job, worker: Worker, now: float) -> Action:
        job.state = J_RUNNING
        job.worker = worker
        job.started = now
        worker.busy += 1
        worker.running[job.brid] = job
        if worker.group is not None:
            worker.group.busy += 1
        timeout = -1.0 if job.timeout is None else max(0.0, job.deadline - now)
        assert worker.peer is not None
        return Send(worker.peer, Request(job.brid, job.priority, -1, 0, timeout, 0.0, job.action, "",
                                          job.payload))

    # -- answers ----------------------------------------------------------------------------

    def on_result(self, peer: int, msg: Reply | Failure, worker: Worker | None, now: float) -> list[Action]:
        if worker is None:
            return []
        job = worker.running.pop(msg.rid, None)
        if job is None:
            return []  # stale: the job was abandoned and already finished
        self._release(worker, job)
        if isinstance(msg, Failure) and msg.code == ErrorCode.CANCELLED:
            return self._pump_worker(worker, now)
        worker.handled += 1
        if isinstance(msg, Failure):
            worker.errors += 1
        elapsed = now - job.started
        worker.ema = elapsed if worker.handled == 1 else worker.ema + EMA_ALPHA * (elapsed - worker.ema)
        actions: list[Action] = []
        if job.state is J_RUNNING:
            self._finish(job)
            if isinstance(msg, Reply):
                actions.append(Send(job.origin, Reply(job.origin_rid, msg.payload)))
            else:
                actions.append(Send(job.origin, Failure(job.origin_rid, msg.code, msg.message, msg.payload)))
        else:
            self._finish(job)
        actions += self._pump_worker(worker, now)
        return actions

    def _release(self, worker: Worker, job: Job) -> None:
        worker.busy -= 1
        if worker.group is not None:
            worker.group.busy -= 1

    def _finish(self, job: Job) -> None:
        job.state = J_DONE
        self.jobs.pop(job.brid, None)
        if self._by_origin.get((job.origin, job.origin_rid)) is job:
            del self._by_origin[(job.origin, job.origin_rid)]
            left = self._in_flight.pop(job.origin, 1) - 1
            if left:
                self._in_flight[job.origin] = left

    def _fail(self, job: Job, code: ErrorCode, message: str) -> list[Action]:
        """Fail a job towards its origin; a RUNNING one becomes ABANDONED on its worker."""
        was_queued = job.state is J_QUEUED
        if was_queued:
            self._queue_of(job).discard(job)
        running = job.state is J_RUNNING and job.worker is not None and job.brid in job.worker.running
        self._finish(job)
        actions: list[Action] = [Send(job.origin, Failure(job.origin_rid, code, message, b""))]
        if running:
            assert job.worker is not None
            job.state = J_ABANDONED  # still occupies its worker until it answers
            if job.worker.peer is not None:  # a LOST worker has no connection to cancel on
                actions.append(Send(job.worker.peer, Cancel(job.brid)))
        return actions

    def _queue_of(self, job: Job) -> JobQueue:
        assert job.where is not None
        return job.where.queue

    def cancel(self, origin: int, rid: int) -> list[Action]:
        """The origin gave up on a request (its future was cancelled)."""
        job = self._by_origin.get((origin, rid))
        if job is None:
            return []
        actions = self._fail(job, ErrorCode.CANCELLED, "cancelled by the caller")
        return actions[1:]  # the origin already knows

    # -- time -----------------------------------------------------------------------------

    def next_deadline(self) -> float | None:
        """The earliest moment ``on_tick`` has something to do (cheap: heap heads only)."""
        timers = self._timers
        while timers and self._timer_job(*timers[0]) is None:
            heapq.heappop(timers)
        lost = self._lost
        while lost and (lost[0][2].state is not W_LOST or not lost[0][2].running):
            heapq.heappop(lost)
        best = FOREVER
        for heap in (timers, self._delayed, lost):
            if heap and heap[0][0] < best:
                best = heap[0][0]
        return None if best == FOREVER else best

    def _timer_job(self, deadline: float, brid: int) -> Job | None:
        """The job a timer entry stands for, if it is still waiting for that deadline."""
        job = self.jobs.get(brid)
        if job is None or job.deadline != deadline or job.state not in (J_QUEUED, J_RUNNING, J_DELAYED):
            return None
        return job

    def on_tick(self, now: float) -> list[Action]:
        actions: list[Action] = []
        timers = self._timers
        while timers and timers[0][0] <= now:
            job = self._timer_job(*heapq.heappop(timers))
            if job is not None:
                actions += self._timed_out(job, now)
        delayed = self._delayed
        while delayed and delayed[0][0] <= now:
            job = heapq.heappop(delayed)[2]
            if job.state is J_DELAYED and job.where is not None:
                unavailable = self._unavailable(job.where)
                if unavailable:
                    self._finish(job)
                    actions.append(Send(job.origin, Failure(job.origin_rid, ErrorCode.UNAVAILABLE,
                                                            unavailable, b"")))
                else:
                    actions += self._enqueue(job, job.where, now)
        lost = self._lost
        while lost and lost[0][0] <= now:
            worker = heapq.heappop(lost)[2]
            if worker.state is W_LOST and worker.running:
                actions += self._fail_running(worker, "closed its connection", now)
        return actions

    def _timed_out(self, job: Job, now: float) -> list[Action]:
        queued = job.state in (J_QUEUED, J_DELAYED)
        worker = job.worker
        where = "while queued" if queued else f"on {describe(worker)}" if worker else ""
        message = (f"request {job.action!r} to {job.target!r} timed out after {job.timeout:g} s "
                   f"{where} (attempt {job.attempt} of {job.attempts})")
        if job.retries_left > 0 and job.where is not None and not self._unavailable(job.where):
            actions: list[Action] = []
            if job.state is J_QUEUED:
                self._queue_of(job).discard(job)
            if queued:
                job.state = J_DONE  # the heap entry dies; a fresh job takes its place
            elif worker is not None:
                job.state = J_ABANDONED  # still occupies the worker until it answers
                if worker.peer is not None:
                    actions.append(Send(worker.peer, Cancel(job.brid)))
            self.jobs.pop(job.brid, None)
            retry = Job(next(self._brids), job.origin, job.origin_rid, job.action, job.payload,
                        job.priority, job.timeout, job.target, now, where=job.where,
                        retries_left=job.retries_left, retry_delay=job.retry_delay,
                        attempt=job.attempt, attempts=job.attempts, seq=job.seq)
            self.jobs[retry.brid] = retry
            self._by_origin[(retry.origin, retry.origin_rid)] = retry
            return actions + self._retry(retry, message, now)
        return self._fail(job, ErrorCode.TIMEOUT, message)

    # -- peers going away ---------------------------------------------------------------------

    def on_origin_lost(self, peer: int) -> list[Action]:
        """Jobs a vanished peer asked for: drop the queued ones, cancel the running ones."""
        actions: list[Action] = []
        for (origin, _), job in list(self._by_origin.items()):
            if origin == peer:
                actions += self._fail(job, ErrorCode.CANCELLED, "")[1:]
        return actions

    def on_worker_lost(self, worker: Worker, now: float) -> list[Action]:
        """The worker's connection closed; its process may not have been reaped yet."""
        worker.peer = None
        if not worker.supervised:
            return self.worker_down(worker, "closed its connection", now)
        if worker.state is not W_DOWN:
            worker.state = W_LOST
            worker.lost_at = now
            heapq.heappush(self._lost, (now + LOST_GRACE_S, next(self._seqs), worker))
        return []

    def worker_down(self, worker: Worker, how: str, now: float, *, restarting: bool = False) -> list[Action]:
        """The worker's process is gone (``how``: "died with SIGKILL", ...)."""
        worker.peer = None
        worker.started_pid = 0
        worker.down_reason = how
        worker.state = W_STARTING if restarting else W_DOWN
        actions = self._fail_running(worker, how, now)
        if not restarting:
            for job in worker.queue.drain():
                self._finish(job)
                actions.append(Send(job.origin, Failure(job.origin_rid, ErrorCode.UNAVAILABLE,
                                                        f"child {worker.name!r} {how}", b"")))
            group = worker.group
            if group is not None and self._unavailable(group):
                for job in group.queue.drain():
                    self._finish(job)
                    actions.append(Send(job.origin, Failure(job.origin_rid, ErrorCode.UNAVAILABLE,
                                                            self._unavailable(group), b"")))
        return actions

    def _fail_running(self, worker: Worker, how: str, now: float) -> list[Action]:
        actions: list[Action] = []
        for job in list(worker.running.values()):
            del worker.running[job.brid]
            self._release(worker, job)
            if job.state is not J_RUNNING:
                self._finish(job)
                continue
            actions += self._retry_or_fail(job, worker, how, now)
        return actions

    def _retry_or_fail(self, job: Job, worker: Worker, how: str, now: float) -> list[Action]:
        message = (f"{describe(worker)} {how} while handling {job.action!r} "
                   f"(request {job.origin_rid}, attempt {job.attempt} of {job.attempts})")
        if job.retries_left > 0 and job.where is not None and not self._unavailable(job.where):
            job.worker = None
            return self._retry(job, message, now)
        self._finish(job)
        return [Send(job.origin, Failure(job.origin_rid, ErrorCode.WORKER_LOST, message, b""))]

    def _retry(self, job: Job, reason: str, now: float) -> list[Action]:
        """Queue the next attempt of ``job`` (after its retry delay)."""
        assert job.where is not None
        job.retries_left -= 1
        job.attempt += 1
        job.state = J_QUEUED
        if job.timeout is not None:
            job.deadline = now + job.retry_delay + job.timeout
            heapq.heappush(self._timers, (job.deadline, job.brid))
        note = Notify("request-retry", {"action": job.action, "target": job.target,
                                        "attempt": job.attempt, "attempts": job.attempts,
                                        "reason": reason})
        if job.retry_delay > 0:
            job.state = J_DELAYED
            heapq.heappush(self._delayed, (now + job.retry_delay, next(self._seqs), job))
            return [note]
        return [note, *self._enqueue(job, job.where, now)]

    def stop_worker(self, worker: Worker, timeout: float) -> list[Action]:
        """Ask a worker to finish and exit; it takes no new requests meanwhile."""
        if not_taking(worker.state):
            return []
        peer = worker.peer
        worker.state = W_STOPPING
        worker.down_reason = "shut down"
        actions: list[Action] = []
        for job in worker.queue.drain():
            self._finish(job)
            actions.append(Send(job.origin, Failure(job.origin_rid, ErrorCode.UNAVAILABLE,
                                                    f"child {worker.name!r} is shutting down", b"")))
        if peer is not None:
            actions.append(Send(peer, Shutdown(timeout)))
        return actions

    def forget(self, worker: Worker) -> None:
        self.workers.pop(worker.name, None)
        if worker.group is not None and worker in worker.group.members:
            worker.group.members.remove(worker)

    def fail_all(self, code: ErrorCode, message: str) -> list[Action]:
        actions: list[Action] = []
        for job in list(self.jobs.values()):
            if job.state in (J_QUEUED, J_RUNNING, J_DELAYED):
                actions += self._fail(job, code, message)[:1]
        return actions

    def pending_count(self) -> int:
        return sum(1 for j in self.jobs.values() if j.state is J_QUEUED)

    def each_worker(self, pred: Callable[[Worker], bool]) -> list[Worker]:
        return [w for w in self.workers.values() if pred(w)]
