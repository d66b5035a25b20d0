"""The records the router keeps: workers and groups, jobs and their queues.

A *worker* is a place requests are delivered to, a *group* a named list of workers with a
strategy and an optional cap on in-flight requests, a *job* one request on its way (see
``_routing`` for how they move). They are plain data; the router and the health check
change them.
"""

from __future__ import annotations

import collections
import enum
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Final

__all__ = [
    "J_ABANDONED", "J_DELAYED", "J_DONE", "J_QUEUED", "J_RUNNING", "UNLIMITED", "W_DOWN", "W_LOST",
    "W_READY", "W_STARTING", "W_STOPPING", "Group", "Job", "JobQueue", "JobState", "Worker",
    "WorkerState", "describe", "not_taking",
]

# The capacity of a worker that takes any number of requests at once (the master itself).
UNLIMITED: Final = 1 << 30


class WorkerState(enum.Enum):
    STARTING = "starting"   # declared, its process has not said Hello yet
    READY = "ready"
    STOPPING = "stopping"   # finishing what it holds; takes nothing new
    LOST = "lost"           # connection gone; waiting to learn how the process ended
    DOWN = "down"           # gone for good


class JobState(enum.Enum):
    DELAYED = "delayed"     # a retry waiting out its retry_delay
    QUEUED = "queued"
    RUNNING = "running"
    ABANDONED = "abandoned"
    DONE = "done"


# Reading an Enum member off its class costs ~0.1 us on CPython 3.11 (a descriptor), and
# the router does it a dozen times per request: these module names are plain globals.
W_STARTING, W_READY, W_STOPPING, W_LOST, W_DOWN = (
    WorkerState.STARTING, WorkerState.READY, WorkerState.STOPPING, WorkerState.LOST, WorkerState.DOWN)
J_DELAYED, J_QUEUED, J_RUNNING, J_ABANDONED, J_DONE = (
    JobState.DELAYED, JobState.QUEUED, JobState.RUNNING, JobState.ABANDONED, JobState.DONE)


def not_taking(state: WorkerState) -> bool:
    """A worker in ``state`` takes no new request (identity tests: an Enum's hash is Python
    code, and this runs on every request)."""
    return state is W_DOWN or state is W_STOPPING


@dataclass(eq=False, slots=True)
class Job:
    brid: int
    origin: int
    origin_rid: int
    action: str
    payload: bytes
    priority: int
    timeout: float | None
    target: str
    deadline: float
    where: Worker | Group | None = None
    retries_left: int = 0
    retry_delay: float = 0.0
    attempt: int = 1
    attempts: int = 1
    seq: int = 0
    state: JobState = J_QUEUED
    worker: Worker | None = None
    started: float = 0.0
    not_before: float = 0.0


class JobQueue:
    """Jobs by priority (higher first), FIFO among equals: one deque per priority.

    Jobs are ordered by ``seq``. Nearly all arrive with the highest yet and are appended
    in O(1) (a heap of thousands of queued jobs cost ~10% of a busy master's CPU); a
    retried job keeps its ``seq`` and goes back to where it stood. Jobs that left by
    another way (timeout, cancel) are dropped when they reach the front.
    """

    __slots__ = ("_lanes", "_order", "_entries", "live")

    def __init__(self) -> None:
        self._lanes: dict[int, collections.deque[Job]] = {}
        self._order: list[int] = []  # the lanes' priorities, highest first
        self._entries = 0            # jobs held, live or not
        self.live = 0

    def push(self, job: Job) -> None:
        lane = self._lanes.get(job.priority)
        if lane is None:
            lane = self._lanes[job.priority] = collections.deque()
            self._order.append(job.priority)
            self._order.sort(reverse=True)
        if not lane or lane[-1].seq < job.seq:
            lane.append(job)
        else:
            at = len(lane)
            while at and lane[at - 1].seq > job.seq:
                at -= 1
            lane.insert(at, job)
        self._entries += 1
        self.live += 1

    def peek(self) -> Job | None:
        order, lanes = self._order, self._lanes
        i = 0
        while i < len(order):
            lane = lanes[order[i]]
            while lane and lane[0].state is not J_QUEUED:
                lane.popleft()
                self._entries -= 1
            if lane:
                return lane[0]
            del lanes[order.pop(i)]
        return None

    def pop(self) -> Job:
        job = self.peek()
        if job is None:
            raise IndexError("pop from an empty JobQueue")
        lane = self._lanes[job.priority]
        lane.popleft()
        if not lane:
            del self._lanes[job.priority]
            self._order.remove(job.priority)
        self._entries -= 1
        self.live -= 1
        return job

    def discard(self, job: Job) -> None:
        """Account for a queued job that left by another way (timeout, cancel)."""
        self.live -= 1
        if self._entries > 64 and self._entries > 4 * self.live:
            for priority, lane in self._lanes.items():
                self._lanes[priority] = collections.deque(j for j in lane if j.state is J_QUEUED)
            self._entries = sum(map(len, self._lanes.values()))

    def drain(self) -> Iterator[Job]:
        while self.peek() is not None:
            yield self.pop()

    def __len__(self) -> int:
        return self.live


@dataclass(eq=False, slots=True)
class Worker:
    name: str
    group: Group | None
    capacity: int
    state: WorkerState = W_STARTING
    supervised: bool = True
    peer: int | None = None
    pid: int = 0
    instance_id: int = -1
    busy: int = 0
    running: dict[int, Job] = field(default_factory=dict)
    queue: JobQueue = field(default_factory=JobQueue)
    handled: int = 0
    errors: int = 0
    ema: float = 0.0
    restarts: int = 0
    lost_at: float = 0.0
    last_beat: float = 0.0
    healthy: bool = True
    down_reason: str = ""
    # The pid its supervisor started it as this time (0: not reported yet, or ended):
    # only that process may say Hello with a supervised worker's name.
    started_pid: int = 0

    @property
    def free(self) -> bool:
        return self.state is W_READY and self.busy < self.capacity


@dataclass(eq=False, slots=True)
class Group:
    name: str
    strategy: str
    members: list[Worker] = field(default_factory=list)
    queue: JobQueue = field(default_factory=JobQueue)
    max_concurrency: int | None = None
    busy: int = 0
    rr: int = 0

    @property
    def has_room(self) -> bool:
        return self.max_concurrency is None or self.busy < self.max_concurrency


def describe(worker: Worker) -> str:
    """How error messages name ``worker``."""
    return f"worker {worker.name!r} (pid {worker.pid})"
