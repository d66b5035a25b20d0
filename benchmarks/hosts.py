"""hosts: a mesh across hosts on Redis, against bare redis-py on the same server.

The suite starts its own ``redis-server`` on a free loopback port (skipped, with a
note, where there is none) and a second "host": a process with a runtime directory of
its own and its own Master on that Redis, serving a group of one sequential child.
Every process inherits the mode's CPU affinity, the server included.

Scenarios:

1. **cross-host request**: ``m.send_request("echo", "api", i)`` from this host's Master
   to the other host's group (through Redis both ways, and through that host's broker
   to its child), against a bare redis-py request/reply pair on the same server: the
   client ``LPUSH``es a request and ``BLPOP``s the reply that a server process (one
   ``BLPOP`` + ``LPUSH`` loop) sends back. Bar: time <= 2.5x the bare pair.
2. **cross-host cache get**: ``cache.get(k)`` of a mesh cache (Redis-backed) against
   redis-py's ``GET`` of the same size of value. Bar: time <= 1.5x.
3. **same-host request**: ``m.send_request("echo", group, i)`` to a group of this host,
   with the Redis backend on vs a Master without one (alternating). Bar: <= 1.10x.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Final

import mpmesh

from ._harness import Config, Row, alternate, bar_check, loop_time, relate
from .core import closing_all, echo_worker

__all__ = ["TITLE", "budget", "run"]

TITLE: Final = "a mesh across hosts on Redis vs bare redis-py"
KEY: Final = b"benchmark-hosts-key"
MESH: Final = "bench-hosts"

S1, S2, S3 = "1 cross-host request", "2 cross-host cache get", "3 same-host request"
BARE_PAIR = "redis-py LPUSH + BLPOP pair (bare)"
CROSS = "mpmesh send_request, other host's group"
BARE_GET = "redis-py GET"
CACHE_GET = "mpmesh cache.get (Redis backend)"
LOCAL_OFF = "Master without backend"
LOCAL_ON = "Master with Redis backend"

_BARE_SERVER = """
import sys, redis
r = redis.Redis(port=int(sys.argv[1]), socket_timeout=None)
while True:
    _, v = r.blpop(["bench:req"], timeout=0)
    if v == b"stop":
        break
    r.lpush("bench:rep", v)
"""

_OTHER_HOST = """
import sys, mpmesh
from benchmarks.core import echo_worker
with mpmesh.Master(sys.argv[2], backend=sys.argv[1], authkey=sys.argv[3].encode()) as m:
    m.spawn_group("api", echo_worker, 1, mode="sequential")
    print("ready", flush=True)
    sys.stdin.read()
"""


def budget(cfg: Config) -> float:
    return 120.0 if cfg.quick and not cfg.repeat else 300.0 + 20.0 * (cfg.repeat or 0)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def redis_server() -> Iterator[tuple[str, Any]]:
    """A fresh ``redis-server`` on a free loopback port: (its URL, a redis-py client)."""
    import redis

    port = _free_port()
    workdir = tempfile.mkdtemp(prefix="mpmesh-bench-redis-")
    proc = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                             "--appendonly", "no", "--dir", workdir],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    client = redis.Redis(port=port)
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                client.ping()
                break
            except redis.ConnectionError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.02)  # the server is starting: nothing to wait on but its port
        yield f"redis://127.0.0.1:{port}/0", client
    finally:
        client.close()
        proc.terminate()
        proc.wait(10)
        shutil.rmtree(workdir, ignore_errors=True)


@contextlib.contextmanager
def other_host(url: str) -> Iterator[None]:
    """A second host: a process with its own runtime directory and Master."""
    workdir = tempfile.mkdtemp(prefix="mpmh-")
    env = dict(os.environ, MPMESH_RUNTIME_DIR=workdir,
               PYTHONPATH=str(Path(__file__).resolve().parent.parent))
    proc = subprocess.Popen([sys.executable, "-c", _OTHER_HOST, url, MESH, KEY.decode()],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env, text=True)
    try:
        assert proc.stdout is not None
        if proc.stdout.readline().strip() != "ready":
            raise RuntimeError("the other host did not start")
        yield
    finally:
        assert proc.stdin is not None
        proc.stdin.close()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()
        shutil.rmtree(workdir, ignore_errors=True)


def _wait_for_group(m: mpmesh.Master, group: str) -> None:
    deadline = time.monotonic() + 30
    while not any(n.group == group for n in m.nodes()):
        if time.monotonic() > deadline:
            raise TimeoutError(f"group {group!r} of the other host never showed up")
        time.sleep(0.05)  # the other host registers on its next beat


def cross_host(cfg: Config, url: str, client: Any) -> list[Row]:
    n, reps = cfg.size(1000, 200), cfg.reps(7, 3)
    cfg.log(f"  {S1}: {n} round trips x {reps} repetitions")
    port = client.connection_pool.connection_kwargs["port"]
    bare = subprocess.Popen([sys.executable, "-c", _BARE_SERVER, str(port)])
    payload = b"x" * 64
    try:
        with other_host(url), closing_all() as held:
            m = mpmesh.Master(MESH, backend=url, authkey=KEY)
            held.append(m)
            _wait_for_group(m, "api")
            send = m.send_request
            lpush, blpop = client.lpush, client.blpop

            def pair() -> None:
                lpush("bench:req", payload)
                blpop(["bench:rep"], timeout=0)

            for fn in (pair, lambda: send("echo", "api", payload)):
                loop_time(max(n // 10, 20), fn)  # warm-up
            samples = alternate([(BARE_PAIR, lambda: loop_time(n, pair)),
                                 (CROSS, lambda: loop_time(n, lambda: send("echo", "api", payload)))],
                                reps, log=cfg.log, label=S1)
    finally:
        client.lpush("bench:req", b"stop")
        bare.wait(10)
    rows = [Row(S1, impl, samples[impl], n) for impl in (BARE_PAIR, CROSS)]
    relate(rows, BARE_PAIR)
    bar_check(rows[1], "<=", 2.5)
    return rows


def cache_get(cfg: Config, url: str, client: Any) -> list[Row]:
    n, reps = cfg.size(5000, 1000), cfg.reps(7, 3)
    cfg.log(f"  {S2}: {n} gets x {reps} repetitions")
    value = {"user": "ada", "visits": 42, "tags": ["a", "b"]}
    with closing_all() as held:
        m = mpmesh.Master(MESH, backend=url, authkey=KEY)
        held.append(m)
        cache = m.cache("bench")
        cache.set("k", value)
        client.set("bench:plain", cache_bytes(client, m))
        get, plain = cache.get, client.get
        samples = alternate([(BARE_GET, lambda: loop_time(n, lambda: plain("bench:plain"))),
                             (CACHE_GET, lambda: loop_time(n, lambda: get("k")))],
                            reps, log=cfg.log, label=S2)
    rows = [Row(S2, impl, samples[impl], n) for impl in (BARE_GET, CACHE_GET)]
    relate(rows, BARE_GET)
    bar_check(rows[1], "<=", 1.5)
    return rows


def cache_bytes(client: Any, m: mpmesh.Master) -> bytes:
    """As many bytes as the cache entry holds in Redis (its biggest value key)."""
    biggest = b""
    for key in client.scan_iter(match=f"mpmesh:{{{MESH}}}:*"):
        if client.type(key) == b"string":
            blob = client.get(key) or b""
            if len(blob) > len(biggest):
                biggest = blob
    return biggest


def same_host(cfg: Config, url: str) -> list[Row]:
    n, reps = cfg.size(3000, 500), cfg.reps(7, 3)
    cfg.log(f"  {S3}: {n} round trips x {reps} repetitions")
    samples: dict[str, list[float]] = {LOCAL_OFF: [], LOCAL_ON: []}
    for rep in range(reps):
        # A pair of fresh Masters per repetition, made in turn in either order: the
        # second Master of a process starts its children from a zygote it could not
        # fork (threads were running), and that alone moves the figure by ~10 %.
        order = [LOCAL_OFF, LOCAL_ON] if rep % 2 == 0 else [LOCAL_ON, LOCAL_OFF]
        with closing_all() as held:
            masters: dict[str, mpmesh.Master] = {}
            for label in order:
                m = mpmesh.Master(MESH, backend=url, authkey=KEY) if label == LOCAL_ON else mpmesh.Master()
                held.append(m)
                m.spawn_group("g", echo_worker, 1, mode="sequential")
                loop_time(max(n // 10, 50), lambda m=m: m.send_request("echo", "g", 1))  # warm-up
                masters[label] = m
            for label in order:
                send = masters[label].send_request
                samples[label].append(loop_time(n, lambda send=send: send("echo", "g", 1)))
        cfg.log(f"  {S3} repetition {rep + 1}/{reps} done")
    rows = [Row(S3, impl, samples[impl], n) for impl in (LOCAL_OFF, LOCAL_ON)]
    relate(rows, LOCAL_OFF)
    bar_check(rows[1], "<=", 1.10)
    return rows


def run(cfg: Config) -> list[Row]:
    if shutil.which("redis-server") is None:
        cfg.notes.append("redis-server not found: install it (Debian/Ubuntu: apt-get install redis-server)")
        return []
    with redis_server() as (url, client):
        rows = cross_host(cfg, url, client)
        client.flushdb()
        rows += cache_get(cfg, url, client)
        client.flushdb()
        rows += same_host(cfg, url)
    return rows
