"""The authkey on disk and in child processes: key files are written atomically and never
through a planted symlink, read only when they are ours and private; a Master that finds
its name taken leaves the running mesh's files alone; a script child's key does not
reach the processes it starts.

Key-file tests use a private temporary directory of their own (``read_key`` looks for
``<address minus .sock>.key``); mesh tests use the suite's runtime directory, which the
autouse leak guard in ``tests/conftest.py`` checks.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import textwrap
import threading
import uuid
from pathlib import Path
from typing import Any

import pytest

import mpmesh
from mpmesh._client._binding import read_key
from mpmesh._host._inproc import write_key
from mpmesh._io import _paths
from mpmesh._state._shared import state_address
from tests.integration import workers

ROOT = Path(__file__).resolve().parents[2]
WAIT_S = 30.0

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def keydir(tmp_path: Path) -> Path:
    """A private directory (0700) as the runtime directory is, for key files."""
    path = tmp_path / "rt"
    path.mkdir(mode=0o700)
    return path


def _address(keydir: Path) -> str:
    return str(keydir / "m.sock")


def _key_path(keydir: Path) -> Path:
    return keydir / "m.key"


# -- writing --------------------------------------------------------------------------------

def test_write_key_replaces_a_planted_symlink_instead_of_following_it(keydir: Path, tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious")
    _key_path(keydir).symlink_to(victim)
    key = os.urandom(32)
    write_key(str(_key_path(keydir)), key)
    assert victim.read_bytes() == b"precious"
    info = os.lstat(_key_path(keydir))
    assert stat.S_ISREG(info.st_mode) and stat.S_IMODE(info.st_mode) == 0o600
    assert _key_path(keydir).read_bytes() == key
    assert read_key(_address(keydir)) == key
    assert sorted(os.listdir(keydir)) == ["m.key"]  # no temporary file left beside it


def test_readers_never_see_a_partial_key_while_it_is_rewritten(keydir: Path) -> None:
    keys = [bytes([i]) * 4096 for i in range(1, 5)]
    write_key(str(_key_path(keydir)), keys[0])
    rewrites = 500
    done = threading.Event()
    seen: list[bytes] = []

    def writer() -> None:
        try:
            for i in range(rewrites):
                write_key(str(_key_path(keydir)), keys[i % len(keys)])
        finally:
            done.set()

    def reader() -> None:
        while not done.is_set():
            got = read_key(_address(keydir))
            if got not in keys:
                seen.append(got)
                return

    threads = [threading.Thread(target=writer)] + [threading.Thread(target=reader) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(WAIT_S)
    assert not any(t.is_alive() for t in threads)
    assert not seen, f"a reader saw {len(seen[0])} bytes instead of a whole key"
    assert sorted(os.listdir(keydir)) == ["m.key"]


# -- reading --------------------------------------------------------------------------------

def test_read_key_refuses_a_key_file_others_can_read(keydir: Path) -> None:
    write_key(str(_key_path(keydir)), os.urandom(32))
    os.chmod(_key_path(keydir), 0o644)
    with pytest.raises(mpmesh.AuthenticationError, match="group or others can access it"):
        read_key(_address(keydir))


def test_read_key_refuses_a_key_file_owned_by_someone_else(keydir: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    write_key(str(_key_path(keydir)), os.urandom(32))
    ino = os.lstat(_key_path(keydir)).st_ino
    real_fstat = os.fstat

    def fstat(fd: int) -> os.stat_result:
        info = real_fstat(fd)
        if info.st_ino != ino:
            return info
        fields = list(info)
        fields[stat.ST_UID] = os.getuid() + 1
        return os.stat_result(fields)

    monkeypatch.setattr(os, "fstat", fstat)
    with pytest.raises(mpmesh.AuthenticationError, match=f"owned by uid {os.getuid() + 1}"):
        read_key(_address(keydir))


def test_read_key_refuses_a_symlink(keydir: Path, tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere.key"
    fd = os.open(elsewhere, os.O_WRONLY | os.O_CREAT, 0o600)
    os.write(fd, os.urandom(32))
    os.close(fd)
    _key_path(keydir).symlink_to(elsewhere)
    with pytest.raises(mpmesh.AuthenticationError, match="symbolic link"):
        read_key(_address(keydir))


def test_read_key_refuses_a_fifo_without_blocking(keydir: Path) -> None:
    os.mkfifo(_key_path(keydir), 0o600)
    with pytest.raises(mpmesh.AuthenticationError, match="not a regular file"):
        read_key(_address(keydir))


# -- a second Master with a taken name --------------------------------------------------------

def _identity(path: str) -> tuple[int, int]:
    info = os.lstat(path)
    return info.st_dev, info.st_ino


@pytest.mark.parametrize("probe", [True, False], ids=["probed", "raced"])
@pytest.mark.parametrize(("first", "second"), [("process", "thread"), ("thread", "process"),
                                               ("process", "process")])
def test_a_second_master_with_a_taken_name_leaves_the_first_alone(first: str, second: str,
                                                                  probe: bool) -> None:
    """``raced``: the second Master's early check is skipped, as when it ran just before the
    first bound the socket; binding then fails, after its zygote and state broker exist."""
    name = f"k-{uuid.uuid4().hex[:8]}"
    with mpmesh.Master(name=name, broker=first, timeout=WAIT_S) as m:
        m.spawn_child("c", workers.basic)
        files = [m.address, _paths.key_path(name)]
        if first == "process":
            files += [state_address(m.address), _paths.key_path(f"{name}.state")]
        before = {path: _identity(path) for path in files}
        key = Path(_paths.key_path(name)).read_bytes()

        # In this process, then in a fresh one (which forks its zygote while it is still
        # single-threaded, and stops it on failure).
        if probe:
            with pytest.raises(ValueError, match="already listening"):
                mpmesh.Master(name=name, broker=second)
        script = textwrap.dedent(f"""
            import mpmesh
            if not {probe}:
                import mpmesh._mesh._master
                mpmesh._mesh._master._listening = lambda address: False
            try:
                mpmesh.Master(name={name!r}, broker={second!r})
            except ValueError as exc:
                print("refused:", exc)
            else:
                print("started")
        """)
        out = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True,
                             timeout=WAIT_S)
        assert out.returncode == 0, out.stderr
        assert out.stdout.startswith("refused:") and "already listening" in out.stdout, out.stdout

        assert {path: _identity(path) for path in files} == before
        assert Path(_paths.key_path(name)).read_bytes() == key
        assert m.send_request("square", "c", 7) == 49
        m.cache("k")["x"] = 1  # the state broker still serves
        joined = textwrap.dedent(f"""
            import mpmesh
            with mpmesh.connect({name!r}, autospawn=False, timeout={WAIT_S}) as h:
                print(h.send_request("square", "c", 9), h.cache("k")["x"])
        """)
        out = subprocess.run([sys.executable, "-c", joined], cwd=ROOT, capture_output=True, text=True,
                             timeout=WAIT_S)
        assert out.returncode == 0, out.stderr
        assert out.stdout.split() == ["81", "1"]


# -- a script child's environment ---------------------------------------------------------------

ENV_SCRIPT = """
import os
import subprocess
import sys

import mpmesh

GRANDCHILD = '''
import json, os, stat
found = []
for fd in map(int, os.listdir("/proc/self/fd")):
    try:
        info = os.fstat(fd)
    except OSError:
        continue
    if stat.S_ISREG(info.st_mode):
        found.append(os.pread(fd, 1 << 20, 0).hex())
print(json.dumps({"environ": dict(os.environ), "files": found}))
'''


def grandchild(_):
    # close_fds=False: the grandchild gets every descriptor this process lets it inherit.
    out = subprocess.run([sys.executable, "-c", GRANDCHILD], capture_output=True, text=True,
                         close_fds=False, check=True)
    return out.stdout


child = mpmesh.Child()
child.register_handler("environ", lambda _: dict(os.environ))
child.register_handler("grandchild", grandchild)
child.run()
"""


def test_a_script_child_keeps_its_key_out_of_its_environment_and_its_grandchildren(tmp_path: Path) -> None:
    script = tmp_path / "env_worker.py"
    script.write_text(ENV_SCRIPT)
    with mpmesh.Master(timeout=WAIT_S) as m:
        m.spawn_child("s", str(script), env={"MPMESH_TEST_TAG": "kept"})
        secret = m.authkey.hex()

        environ: Any = m.send_request("environ", "s")
        assert environ.get("MPMESH_TEST_TAG") == "kept"  # the user's own variables stay
        assert not [k for k in environ if k.startswith("MPMESH_CHILD")], sorted(environ)
        assert not [k for k, v in environ.items() if secret in v.lower()]

        report = json.loads(str(m.send_request("grandchild", "s")))
        assert report["environ"].get("MPMESH_TEST_TAG") == "kept"
        assert not [k for k, v in report["environ"].items() if secret in v.lower()]
        assert not [k for k in report["environ"] if k.startswith("MPMESH_CHILD")]
        assert not [blob for blob in report["files"] if secret in blob]
