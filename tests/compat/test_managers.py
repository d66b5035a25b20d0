"""BaseManager / SyncManager API: lifecycle, register (AutoProxy, custom proxy types,
exposed, method_to_typeid), get_server + connect, start(initializer), address, authkey."""

from __future__ import annotations

import gc
import multiprocessing
import multiprocessing.managers
import os
import signal
import socket
import threading
from typing import Any

import pytest

import mpmesh.managers

from tests.conftest import wait_for

from . import _servers
from .conftest import Impl

LONG = 60.0


@pytest.fixture
def counters(impl: Impl) -> Any:
    m = _servers.MANAGERS[impl.name](ctx=multiprocessing.get_context("forkserver"))
    m.start()
    try:
        yield m
    finally:
        gc.collect()  # proxies caught in exception/traceback cycles hold connections
        m.shutdown()
        m.join()


def test_manager_lifecycle(impl: Impl) -> None:
    m = impl.Manager()
    assert m.address
    d = m.dict(a=1)
    assert d["a"] == 1
    with pytest.raises(multiprocessing.ProcessError):
        m.start()
    m.shutdown()
    m.join()
    m.shutdown()  # a second shutdown does nothing


def test_context_manager(impl: Impl) -> None:
    cls = multiprocessing.managers.SyncManager if not impl.is_mpmesh else impl.managers.SyncManager
    kwargs = {} if impl.is_mpmesh else {"ctx": multiprocessing.get_context("forkserver")}
    with cls(**kwargs) as m:
        lst = m.list([1])
        lst.append(2)
        assert lst[:] == [1, 2]
    with pytest.raises(multiprocessing.ProcessError):
        m.start()
    m.join()


def test_calls_after_shutdown_fail(impl: Impl) -> None:
    m = impl.Manager()
    d = m.dict()
    m.shutdown()
    m.join()
    with pytest.raises(Exception):
        d["x"] = 1
    del d


def test_register_autoproxy(counters: Any) -> None:
    c = counters.Counter(5)
    assert c.incr() == 6 and c.incr(by=4) == 10 and c.get() == 10
    assert type(c).__name__ == "AutoProxy[Counter]"
    with pytest.raises(ValueError, match="boom"):
        c.fail()
    with pytest.raises(AttributeError):
        c._private()
    assert "Counter object" in str(c)


def test_register_custom_proxytype(impl: Impl, counters: Any) -> None:
    c = counters.TypedCounter(1)
    assert isinstance(c, impl.managers.BaseProxy)
    assert type(c).__name__.endswith("CounterProxy")
    assert c.incr(2) == 3 and c.get() == 3
    with pytest.raises(multiprocessing.managers.RemoteError):
        c._callmethod("fail")  # not in the proxy type's _exposed_


def test_register_exposed_and_method_to_typeid(counters: Any) -> None:
    parent = counters.Parent(3)
    child = parent.make_child()
    assert child.get() == 30 and child.incr() == 31
    narrow = counters.Narrow(7)
    assert narrow.get() == 7
    assert not hasattr(narrow, "incr")
    with pytest.raises(multiprocessing.managers.RemoteError):
        narrow._callmethod("incr")


def test_register_with_a_registered_proxy_type(counters: Any) -> None:
    ns = counters.ns(a=1)
    ns.b = 2
    assert (ns.a, ns.b) == (1, 2)


def test_token_and_create(counters: Any) -> None:
    c = counters.Counter(0)
    token = c._token
    assert token.typeid == "Counter" and token.address == counters.address
    assert repr(token).startswith("Token(typeid='Counter', address=")


def test_server_in_another_process_and_connect(impl: Impl) -> None:
    ctx = multiprocessing.get_context("spawn")
    reader, writer = ctx.Pipe(duplex=False)
    authkey = b"parity-test"
    proc = ctx.Process(target=_servers.serve, args=(impl.name, None, authkey, writer))
    proc.start()
    writer.close()
    try:
        address = reader.recv()
        client = _servers.MANAGERS[impl.name](address=address, authkey=authkey)
        client.connect()
        c = client.TypedCounter(10)
        assert c.incr() == 11
        wrong = _servers.MANAGERS[impl.name](address=address, authkey=b"wrong key")
        with pytest.raises(multiprocessing.AuthenticationError):
            wrong.connect()
        del c
        if impl.is_mpmesh:
            client.shutdown()  # closes this process's connection; the server keeps serving
    finally:
        reader.close()
        os.kill(proc.pid, signal.SIGTERM)
        proc.join(LONG)
    assert proc.exitcode is not None


def test_start_with_initializer_runs_a_server_process(impl: Impl) -> None:
    m = _servers.MANAGERS[impl.name](ctx=multiprocessing.get_context("forkserver"))
    with pytest.raises(TypeError):
        m.start(initializer=42)
    m.start(_servers.ignore_sigint, (None,))
    try:
        assert m._process is not None and m._process.is_alive()
        assert m.Counter(1).incr() == 2
    finally:
        m.shutdown()
        m.join(LONG)
    assert m._process is None


def test_tcp_address(impl: Impl) -> None:
    m = _servers.MANAGERS[impl.name](address=("127.0.0.1", 0), authkey=b"tcp",
                                     ctx=multiprocessing.get_context("forkserver"))
    m.start()
    try:
        host, port = m.address
        assert host == "127.0.0.1" and port > 0
        other = _servers.MANAGERS[impl.name](address=(host, port), authkey=b"tcp")
        other.connect()
        c = other.Counter(41)
        assert c.incr() == 42
        del c
        if impl.is_mpmesh:
            other.shutdown()
    finally:
        m.shutdown()
        m.join()


def test_more_blocked_calls_than_server_threads_all_return(counters: Any) -> None:
    # The standard manager runs each client thread's calls on a thread of their own:
    # however many callers block in a method, the call that releases them still runs.
    box = counters.Box()
    n = 140  # more than mpmesh's pool of offload threads (128)
    got: list[object] = []
    consumers = [threading.Thread(target=lambda: got.append(box.get()), daemon=True) for _ in range(n)]
    for consumer in consumers:
        consumer.start()
    assert wait_for(lambda: box.waiting() == n, LONG)
    for i in range(n):
        box.put(i)
    for consumer in consumers:
        consumer.join(LONG)
    assert sorted(got) == list(range(n))  # type: ignore[type-var]


def test_a_server_closed_before_serving_frees_its_address() -> None:
    server = mpmesh.managers.SyncManager(address=("127.0.0.1", 0), authkey=b"k").get_server()
    host, port = server.address
    server.close()
    with socket.socket() as again:  # EADDRINUSE while the unserved listener stayed open
        again.bind((host, port))


def test_the_server_process_handle(impl: Impl) -> None:
    """``manager._process``: code written for the standard library reads its pid, and its
    exit code after shutdown()."""
    m = impl.Manager()
    proc = m._process
    assert proc.pid > 0 and proc.pid != os.getpid() and proc.is_alive()
    m.dict()["k"] = 1
    m.shutdown()
    assert not proc.is_alive()
    assert proc.exitcode in (0, -signal.SIGTERM)
