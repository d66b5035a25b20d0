"""``mpmesh.connect()`` from unrelated processes, standalone brokers, and the CLI.

Every standalone broker a test starts is stopped by the test (``python -m mpmesh stop``),
and the autouse leak guard checks that its process and socket files are gone.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

import mpmesh
from tests.conftest import wait_for

ROOT = Path(__file__).resolve().parents[2]
WAIT_S = 30.0


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "mpmesh", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=WAIT_S)


@pytest.fixture
def name() -> Iterator[str]:
    mesh = f"t-{uuid.uuid4().hex[:8]}"
    yield mesh
    cli("stop", "--name", mesh)  # whatever the test left running


def test_connect_autospawns_a_broker_that_the_cli_stops(name: str) -> None:
    assert cli("status", "--name", name).returncode == 1
    with mpmesh.connect(name) as first:
        assert first.spawned
        first.cache("c")["k"] = [1, 2]
        with mpmesh.connect(name) as second:
            assert not second.spawned
            assert second.cache("c")["k"] == [1, 2]
            names = {n.instance_id: n for n in second.nodes()}
            assert names[second.instance_id].is_self and len(names) == 3
        status = cli("status", "--name", name)
        assert status.returncode == 0 and "standalone" in status.stdout
        stats = json.loads(cli("stats", "--name", name, "--json").stdout)
        assert stats["caches"]["c"]["size"] == 1 and stats["connections"] >= 2
        assert stats["broker_memory_bytes"] > 0
        assert "cache_ops" in cli("stats", "--name", name).stdout
    stop = cli("stop", "--name", name)
    assert stop.returncode == 0, stop.stderr
    assert cli("status", "--name", name).returncode == 1
    assert cli("stop", "--name", name).returncode == 1


def test_connect_without_autospawn_fails_fast(name: str) -> None:
    with pytest.raises(mpmesh.BrokerUnavailable):
        mpmesh.connect(name, autospawn=False)
    with pytest.raises(ValueError):
        mpmesh.connect("a/b")


def test_a_named_master_is_joined_with_its_authkey(name: str) -> None:
    key = os.urandom(16)
    with mpmesh.Master(name=name, authkey=key) as m:
        m.cache("shared")["from"] = "master"
        with pytest.raises(mpmesh.AuthenticationError):
            mpmesh.connect(name, authkey=b"wrong key", autospawn=False)
        with mpmesh.connect(name, authkey=key, autospawn=False) as h:
            assert h.cache("shared")["from"] == "master"
            m.register("double", lambda x: 2 * x)
            assert h.call("double", 21) == 42
            assert not h.spawned
        refused = cli("stop", "--name", name)
        assert refused.returncode == 2 and "Master" in refused.stderr
        assert cli("status", "--name", name).returncode == 0
        assert m.cache("shared")["from"] == "master"  # still serving


def test_serve_from_the_cli_and_join_from_an_unrelated_process(name: str) -> None:
    server = subprocess.Popen([sys.executable, "-m", "mpmesh", "serve", "--name", name], cwd=ROOT,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        assert server.stderr is not None
        assert "listening" in server.stderr.readline()
        script = textwrap.dedent(f"""
            import mpmesh
            with mpmesh.connect({name!r}, autospawn=False) as h:
                h.cache("c").incr("runs")
                with h.lock("l", ttl=5) as grant:
                    print(grant.token)
        """)
        for _ in range(2):
            out = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True,
                                 text=True, timeout=WAIT_S)
            assert out.returncode == 0, out.stderr
        with mpmesh.connect(name, autospawn=False) as h:
            assert h.cache("c")["runs"] == 2
        assert cli("stop", "--name", name).returncode == 0
        assert server.wait(WAIT_S) == 0
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()
        if server.stderr is not None:
            server.stderr.close()


def test_a_process_that_autospawned_a_broker_exits_cleanly_and_leaves_it_serving(name: str) -> None:
    # The broker is detached on purpose: the process that started it neither waits for it
    # nor warns at exit that a subprocess is still running.
    script = textwrap.dedent(f"""
        import mpmesh
        with mpmesh.connect({name!r}) as h:
            assert h.spawned
            h.cache("c")["k"] = "v"
    """)
    out = subprocess.run([sys.executable, "-X", "dev", "-W", "error", "-c", script], cwd=ROOT,
                         capture_output=True, text=True, timeout=WAIT_S)
    assert out.returncode == 0, out.stderr
    assert "Warning" not in out.stderr, out.stderr
    with mpmesh.connect(name, autospawn=False) as h:
        assert h.cache("c")["k"] == "v"
    assert cli("stop", "--name", name).returncode == 0
    assert wait_for(lambda: cli("status", "--name", name).returncode == 1, WAIT_S)


def test_concurrent_autospawns_start_one_broker(name: str) -> None:
    script = textwrap.dedent(f"""
        import os, mpmesh
        with mpmesh.connect({name!r}) as h:
            h.cache("c").incr("joined")
            print(h.spawned)
    """)
    procs = [subprocess.Popen([sys.executable, "-c", script], cwd=ROOT, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(3)]
    outs = [p.communicate(timeout=WAIT_S) for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    assert sorted(o.strip() for o, _ in outs) == ["False", "False", "True"]
    with mpmesh.connect(name, autospawn=False) as h:
        assert h.cache("c")["joined"] == 3
    assert cli("stop", "--name", name).returncode == 0
    assert wait_for(lambda: cli("status", "--name", name).returncode == 1, WAIT_S)


@pytest.mark.timeout(60)
def test_a_request_to_the_master_of_a_standalone_broker_fails_at_once(name: str) -> None:
    with mpmesh.connect(name) as h:
        with pytest.raises(mpmesh.NoHandler, match="no master"):
            h.send_request("anything", "", None, timeout=20)
        assert h.cache("c").get("k") is None  # and it keeps serving
    assert cli("stop", "--name", name).returncode == 0
