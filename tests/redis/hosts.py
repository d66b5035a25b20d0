"""Simulated hosts for the tests of a mesh across hosts: each is a process of its own
with a private runtime directory (so its Master's socket and key are its own, as on
another machine) and its own Master on the test's Redis."""

from __future__ import annotations

import json
import os
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HOST_MAIN = str(Path(__file__).with_name("host_main.py"))
KEY = b"mesh-across-hosts-test-key"
READY_S = 30.0


class Host:
    """One simulated host (``host_main.py``) and what it printed."""

    def __init__(self, url: str, mesh: str, tag: str, *, group: str = "api", size: int = 1,
                 mode: str = "sequential") -> None:
        self.tag = tag
        self.dir = tempfile.mkdtemp(prefix="mpmh-")
        env = dict(os.environ, MPMESH_RUNTIME_DIR=self.dir, PYTHONUNBUFFERED="1")
        env.pop("MPMESH_BACKEND", None)
        self.proc = subprocess.Popen([sys.executable, HOST_MAIN, url, mesh, tag, group, str(size), mode],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env)
        self._buffer = b""
        self.lines: list[dict[str, Any]] = []
        ready = self.wait_line(lambda line: "iid" in line, READY_S)
        if ready is None:
            self.kill()
            raise RuntimeError(f"host {tag} did not start")
        self.iid: int = ready["iid"]
        self.pid: int = ready["pid"]

    def _read(self, timeout: float) -> None:
        assert self.proc.stdout is not None
        with selectors.DefaultSelector() as sel:
            sel.register(self.proc.stdout, selectors.EVENT_READ)
            if not sel.select(timeout):
                return
        chunk = os.read(self.proc.stdout.fileno(), 65536)
        if not chunk:
            return
        self._buffer += chunk
        while b"\n" in self._buffer:
            line, self._buffer = self._buffer.split(b"\n", 1)
            self.lines.append(json.loads(line))

    def wait_line(self, match: Any, timeout: float) -> dict[str, Any] | None:
        """The first line printed that ``match`` accepts, waiting up to ``timeout``."""
        deadline = time.monotonic() + timeout
        while True:
            for line in self.lines:
                if match(line):
                    return line
            left = deadline - time.monotonic()
            if left <= 0 or self.proc.poll() is not None:
                return None
            self._read(left)

    def left_events(self) -> list[int]:
        self._read(0)
        return [line["left"] for line in self.lines if "left" in line]

    def kill(self) -> None:
        """SIGKILL the host's Master: its children and brokers go with it."""
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> None:
        """End the host cleanly (its stdin closes)."""
        if self.proc.poll() is None:
            assert self.proc.stdin is not None
            self.proc.stdin.close()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.kill()

    def close(self) -> None:
        self.stop()
        for stream in (self.proc.stdin, self.proc.stdout):
            if stream is not None and not stream.closed:
                stream.close()
        shutil.rmtree(self.dir, ignore_errors=True)
