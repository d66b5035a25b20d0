"""The zygote: a single-threaded process that forks a Master's children.

Forking a process that runs threads can deadlock the child (a lock held by another
thread is copied locked; Python 3.12+ warns). A Master runs threads (its broker, its
handler pool), so it never forks a child itself. It starts the zygote first — by
``os.fork()`` while it is still single-threaded (fast: modules stay imported), otherwise
as a fresh interpreter (``python -m mpmesh._io._zygote``) — and asks it to fork. A
forked child runs the entry function the fork command names (pickled by reference), so
this module knows nothing of what a child does.

Channels between the two carry pickles in the wire's frames (``_wire._frames``; both ends
are ours)::

    master ──ctl──► zygote     ("fork", token, config, entry) | ("exec", token, argv, env, cwd, config_blob)
                               | ("init", ...) | ("cleanup", files)
    master ◄─report─ zygote    ("started", token, pid, connected) | ("exited", pid, status) | ("failed", token, text)
    master ──life──► zygote    never written: EOF means the master is gone

``report`` is a Unix socket: a child forked to join a mesh gets one end of a socketpair
made for it (``config["socket_fd"]``), and its "started" report carries the other end
(SCM_RIGHTS) for the broker to serve. No handshake is needed on it: nothing but this
zygote and the master ever holds either end.

When the master goes away (``ctl`` or ``life`` reaches EOF) the zygote terminates every
child it forked, removes the mesh's socket and key files, and exits: a master killed
with SIGKILL leaves nothing behind. It removes a file only if it is still the one the
master named (same device and inode): not one that another mesh of the same name has
put in its place since.

An exec'd (script) child gets its config, authkey included, in an unlinked file whose
descriptor it inherits (``MPMESH_CHILD_FD``), not in its environment: ``take_config``
reads and closes it, and removes the variable, so no process it starts inherits the key.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import pickle
import selectors
import signal
import socket
import sys
import time
from collections.abc import Iterator
from typing import Any, Final, NoReturn

from .._wire._frames import HEADER, FrameDecoder
from ._forking import TERM_GRACE_S, stop_in_turn

__all__ = ["CONFIG_FD_ENV", "FileId", "channel", "identify", "main", "read_frames", "read_report",
           "serve", "take_config", "write_frame"]

# The kind byte of a zygote frame: its body is one pickled command or report.
PICKLED: Final = 0
# Names the descriptor an exec'd child reads its config from: "fd:device:inode".
CONFIG_FD_ENV: Final = "MPMESH_CHILD_FD"
# A file to remove at the end, as it was when named: (path, device, inode).
FileId = tuple[str, int, int]


@contextlib.contextmanager
def _socket_over(fd: int) -> Iterator[socket.socket]:
    """A socket object over ``fd`` that leaves ``fd`` open when it is done."""
    sock = socket.socket(fileno=fd)
    try:
        yield sock
    finally:
        sock.detach()


def write_frame(fd: int, obj: object, pass_fd: int = -1) -> None:
    """Write ``obj`` as one frame; ``pass_fd`` (a Unix socket ``fd`` only) travels with
    its first byte."""
    data = pickle.dumps(obj, 5)
    view = memoryview(HEADER.pack(len(data), PICKLED) + data)
    while view:
        try:
            if pass_fd >= 0:
                with _socket_over(fd) as sock:
                    n = socket.send_fds(sock, [view], [pass_fd])
                pass_fd = -1
            else:
                n = os.write(fd, view)
        except InterruptedError:
            continue
        except BlockingIOError:
            import select
            select.select([], [fd], [])
            continue
        view = view[n:]


def read_report(fd: int) -> tuple[bytes, list[int]]:
    """One read from the report socket: the bytes, and the descriptors that came with
    them (not inheritable)."""
    with _socket_over(fd) as sock:
        data, fds, _, _ = socket.recv_fds(sock, 65536, 16)
    for passed in fds:
        os.set_inheritable(passed, False)
    return data, fds


def channel() -> tuple[int, int]:
    """A connected pair of Unix socket descriptors, for the report channel."""
    a, b = socket.socketpair()
    return a.detach(), b.detach()


def read_frames(decoder: FrameDecoder, data: bytes) -> list[Any]:
    """Feed ``data`` to ``decoder``; return every complete object it now holds."""
    decoder.feed(data)
    return [pickle.loads(body) for _, body in decoder.frames()]


class _Zygote:
    def __init__(self, ctl: int, report: int, life: int) -> None:
        self.ctl, self.report, self.life = ctl, report, life
        self.children: set[int] = set()
        self.cleanup: list[FileId] = []
        self.decoder = FrameDecoder()
        self.sig_r, self.sig_w = os.pipe()
        os.set_blocking(self.sig_r, False)
        os.set_blocking(self.sig_w, False)

    def serve(self) -> NoReturn:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGCHLD, lambda *_: None)
        signal.set_wakeup_fd(self.sig_w)
        sel = selectors.DefaultSelector()
        sel.register(self.ctl, selectors.EVENT_READ, "ctl")
        sel.register(self.life, selectors.EVENT_READ, "life")
        sel.register(self.sig_r, selectors.EVENT_READ, "sig")
        try:
            while True:
                for key, _ in sel.select():
                    if key.data == "sig":
                        self._drain_signals()
                    elif key.data == "life" or not self._read_commands():
                        self._finish()
        except BaseException:  # pragma: no cover - last resort: never leave orphans
            self._finish()

    def _drain_signals(self) -> None:
        try:
            while os.read(self.sig_r, 256):
                pass
        except BlockingIOError:
            pass
        self._reap()

    def _reap(self) -> None:
        while self.children:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                self.children.clear()
                return
            if pid == 0:
                return
            self.children.discard(pid)
            write_frame(self.report, ("exited", pid, os.waitstatus_to_exitcode(status)))

    def _read_commands(self) -> bool:
        try:
            data = os.read(self.ctl, 65536)
        except InterruptedError:
            return True
        if not data:
            return False
        for cmd in read_frames(self.decoder, data):
            self._command(cmd)
        return True

    def _command(self, cmd: tuple[Any, ...]) -> None:
        kind = cmd[0]
        if kind == "init":
            _, path, cwd, cleanup = cmd
            sys.path[:] = path
            if cwd:
                try:
                    os.chdir(cwd)
                except OSError:
                    pass
            self.cleanup = list(cleanup)
        elif kind == "cleanup":
            self.cleanup = list(cmd[1])
        elif kind in ("fork", "exec"):
            token = cmd[1]
            # A forked child of a mesh gets its broker connection from here, ready to use.
            pair = socket.socketpair() if kind == "fork" and "address" in cmd[2] else None
            try:
                pid = os.fork()
            except OSError as exc:
                if pair is not None:
                    pair[0].close()
                    pair[1].close()
                write_frame(self.report, ("failed", token, f"fork failed: {exc}"))
                return
            if pid == 0:
                if pair is not None:
                    pair[0].close()
                    cmd[2]["socket_fd"] = pair[1].detach()
                self._in_child(cmd)
            self.children.add(pid)
            if pair is None:
                write_frame(self.report, ("started", token, pid, False))
                return
            pair[1].close()
            try:
                write_frame(self.report, ("started", token, pid, True), pair[0].fileno())
            finally:
                pair[0].close()

    def _in_child(self, cmd: tuple[Any, ...]) -> NoReturn:
        code = 1
        try:
            signal.set_wakeup_fd(-1)
            signal.signal(signal.SIGCHLD, signal.SIG_DFL)
            for fd in (self.ctl, self.report, self.sig_r, self.sig_w):
                os.close(fd)
            if cmd[0] == "exec":
                _, _, argv, env, cwd, config = cmd
                os.closerange(3, self.life)
                os.closerange(self.life + 1, 1 << 16)
                if config is not None:
                    env = {**env, CONFIG_FD_ENV: _config_fd(config)}
                if cwd:
                    os.chdir(cwd)
                # Children ignore Ctrl-C (the master stops them in order); the
                # disposition survives exec.
                signal.signal(signal.SIGINT, signal.SIG_IGN)
                os.execve(argv[0], argv, env)
            os.close(self.life)
            code = cmd[3](cmd[2])  # the entry the master named, by reference: run_target
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
        except BaseException:
            import traceback

            traceback.print_exc()
        finally:
            try:
                sys.stdout.flush()
                sys.stderr.flush()
            finally:
                os._exit(code)

    def _finish(self) -> NoReturn:
        """The master is gone or done: no child outlives it."""
        stop_in_turn(self._signal_children, self._reap_children, kill_wait=TERM_GRACE_S)
        for path, dev, ino in self.cleanup:
            try:
                info = os.lstat(path)
                if (info.st_dev, info.st_ino) == (dev, ino):
                    os.unlink(path)
            except OSError:
                pass
        os._exit(0)


    def _signal_children(self, sig: int) -> None:
        for pid in list(self.children):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                self.children.discard(pid)

    def _reap_children(self, timeout: float) -> bool:
        """Reap children for up to ``timeout``; whether none is left."""
        deadline = time.monotonic() + timeout
        while self.children and time.monotonic() < deadline:
            try:
                pid, _ = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                self.children.clear()
                break
            if pid:
                self.children.discard(pid)
            else:
                time.sleep(0.01)
        return not self.children


def identify(paths: list[str]) -> list[FileId]:
    """``paths`` as the zygote's clean-up list takes them: each with the identity of the
    file there now (missing ones are left out: they are not ours to remove)."""
    found = []
    for path in paths:
        try:
            info = os.lstat(path)
        except FileNotFoundError:
            continue
        found.append((path, info.st_dev, info.st_ino))
    return found


def _config_fd(data: bytes) -> str:
    """In a child about to exec: an inheritable descriptor of an unlinked file holding
    ``data``, read from its start; its ``CONFIG_FD_ENV`` value."""
    if hasattr(os, "memfd_create"):
        fd = os.memfd_create("mpmesh-child-config", 0)  # no MFD_CLOEXEC: exec keeps it
    else:
        import tempfile

        fd, path = tempfile.mkstemp()
        os.unlink(path)
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]
    os.lseek(fd, 0, os.SEEK_SET)
    os.set_inheritable(fd, True)
    info = os.fstat(fd)
    return f"{fd}:{info.st_dev}:{info.st_ino}"


def take_config() -> bytes | None:
    """In an exec'd child: the config its zygote left it, or None if there is none.

    Afterwards the variable is gone, and the descriptor is closed: processes this one
    starts inherit neither. A variable inherited from a process that did not read it
    names a descriptor that is not that file (or none): it is dropped, and that
    descriptor left alone.
    """
    value = os.environ.pop(CONFIG_FD_ENV, None)
    if value is None:
        return None
    try:
        fd, dev, ino = (int(part) for part in value.split(":"))
        info = os.fstat(fd)
    except (ValueError, OSError):
        return None
    if (info.st_dev, info.st_ino) != (dev, ino):
        return None
    try:
        chunks = []
        while chunk := os.read(fd, 1 << 16):
            chunks.append(chunk)
    finally:
        os.close(fd)
    return b"".join(chunks)


def serve(ctl: int, report: int, life: int, cleanup: list[FileId]) -> NoReturn:
    """Run the zygote in this process (called right after ``os.fork()``)."""
    zygote = _Zygote(ctl, report, life)
    zygote.cleanup = list(cleanup)
    zygote.serve()


def main() -> NoReturn:
    """``python -c "...main()" CTL REPORT LIFE``: a freshly started zygote."""
    ctl, report, life = (int(arg) for arg in sys.argv[-3:])
    # Children unpickle by-value targets and tasks with dill: import it once here, not
    # in every child (~30 ms each).
    importlib.import_module("dill")
    _Zygote(ctl, report, life).serve()


if __name__ == "__main__":
    main()
