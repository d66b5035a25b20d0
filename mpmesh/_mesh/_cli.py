"""``python -m mpmesh serve|status|stats|stop --name NAME``: run and inspect a broker.

Exit status: 0 on success (for ``status``: a broker answers), 1 when no broker answers
(or the authkey is refused), 2 for a refused request (``stop`` on a Master's mesh) or bad
usage.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from typing import Any, Final

from .._broker._payload import pack
from .._client._base import make_hello
from .._client._binding import read_key
from .._client._socket import SocketClient
from .._errors import AuthenticationError, MeshError
from .._io import _deadline
from .._io import _paths
from .._wire._messages import Role

__all__ = ["main"]

CONNECT_TIMEOUT_S: Final = 5.0
STOP_TIMEOUT_S: Final = 10.0
NO_BROKER: Final = 1
REFUSED: Final = 2


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m mpmesh", description="Run and inspect an mpmesh broker.")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command, text in (("serve", "run a standalone broker in the foreground until stopped"),
                          ("status", "exit 0 if a broker answers for the mesh, 1 otherwise"),
                          ("stats", "print the broker's statistics"),
                          ("stop", "stop a standalone broker (and wait until it has exited)")):
        cmd = sub.add_parser(command, help=text, description=text)
        cmd.add_argument("--name", default="default", help="the mesh's name (default: %(default)s)")
        if command in ("status", "stats"):
            cmd.add_argument("--json", action="store_true", help="print JSON, for scripts")
        if command == "stop":
            cmd.add_argument("--timeout", type=float, default=STOP_TIMEOUT_S,
                             help="seconds to wait for the broker to exit (default: %(default)s)")
        if command == "serve":
            cmd.add_argument("--authkey-stdin", action="store_true",
                             help="read the mesh's authkey (hex) from the first line of stdin")
            cmd.add_argument("--detached", action="store_true", help=argparse.SUPPRESS)
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "serve":
            return _serve(args)
        return {"status": _status, "stats": _stats, "stop": _stop}[args.command](args)
    except KeyboardInterrupt:
        return 130


def _say(text: str) -> None:
    print(f"mpmesh: {text}", file=sys.stderr)


# -- serve --------------------------------------------------------------------------------------

def _serve(args: argparse.Namespace) -> int:
    from ._connect import READY_PREFIX, serve

    authkey = None
    if args.authkey_stdin:
        try:
            authkey = bytes.fromhex(sys.stdin.readline().strip())
        except ValueError:
            _say("--authkey-stdin: expected the key as hex on the first line")
            return REFUSED
    if args.detached:
        os.chdir("/")  # a broker started for connect() keeps no directory busy
    else:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")

    def ready() -> None:
        if args.detached:
            sys.stdout.write(f"{READY_PREFIX} {os.getpid()}\n")
            sys.stdout.flush()
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, 1)  # nobody reads our stdout any more
            os.close(devnull)
        else:
            _say(f"mesh {args.name!r} listening at {_paths.socket_path(args.name)} (pid {os.getpid()}); "
                 f"stop it with `python -m mpmesh stop --name {args.name}`")

    try:
        return serve(args.name, authkey, ready=ready)
    except ValueError as exc:  # another broker already listens there
        _say(str(exc))
        return REFUSED


# -- clients ------------------------------------------------------------------------------------

def _client(name: str) -> SocketClient | None:
    address = _paths.socket_path(name)
    try:
        if not os.path.exists(address):
            raise MeshError(f"no mesh named {name!r} (no socket at {address})")
        return SocketClient(address, read_key(address), make_hello(Role.CLIENT, name=""),
                            connect_timeout=CONNECT_TIMEOUT_S)
    except AuthenticationError as exc:
        _say(f"mesh {name!r}: {exc}")
    except MeshError as exc:
        _say(f"no broker answers for mesh {name!r}: {exc}")
    return None


def _ask(client: SocketClient, op: str) -> Any:
    return client.wait(client.op("admin", op, payload=pack(())), _deadline.after(CONNECT_TIMEOUT_S))


def _status(args: argparse.Namespace) -> int:
    client = _client(args.name)
    if client is None:
        return NO_BROKER
    try:
        info = _ask(client, "ping")
    except MeshError as exc:
        _say(f"mesh {args.name!r} did not answer: {exc}")
        return NO_BROKER
    finally:
        client.close()
    if args.json:
        print(json.dumps({"name": args.name, "running": True, **info}, sort_keys=True))
    else:
        kind = "standalone broker" if info["standalone"] else "hosted by a Master"
        print(f"mesh {args.name!r}: running ({kind}, pid {info['broker_pid']})")
    return 0


def _stats(args: argparse.Namespace) -> int:
    from .._io._usage import process_usage

    client = _client(args.name)
    if client is None:
        return NO_BROKER
    try:
        snapshot = _ask(client, "stats")
    except MeshError as exc:
        _say(f"mesh {args.name!r} did not answer: {exc}")
        return NO_BROKER
    finally:
        client.close()
    snapshot.update(process_usage(int(snapshot["broker_pid"])))
    if args.json:
        print(json.dumps(snapshot, sort_keys=True, default=str))
    else:
        for key in sorted(snapshot):
            value = snapshot[key]
            print(f"{key:24} {json.dumps(value, sort_keys=True, default=str) if isinstance(value, dict) else value}")
    return 0


def _stop(args: argparse.Namespace) -> int:
    _deadline.check_timeout(args.timeout)
    client = _client(args.name)
    if client is None:
        return NO_BROKER
    try:
        info = _ask(client, "ping")
        if not info["standalone"]:
            _say(f"mesh {args.name!r} is hosted by a Master (pid {info['broker_pid']}); shut it down there")
            return REFUSED
        _ask(client, "stop")
        deadline = _deadline.after(args.timeout)
        client.wait_until(lambda: client._closed is not None, deadline)  # the broker hangs up
    except MeshError as exc:
        _say(f"mesh {args.name!r}: {exc}")
        return NO_BROKER
    finally:
        client.close()
    pid = int(info["broker_pid"])
    address = _paths.socket_path(args.name)
    while _alive(pid) or os.path.exists(address):  # only the OS can tell us when it is gone
        if _deadline.expired(deadline):
            _say(f"the broker of mesh {args.name!r} (pid {pid}) did not exit within {args.timeout:g} s")
            return NO_BROKER
        time.sleep(0.02)
    print(f"mesh {args.name!r}: stopped")
    return 0


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # pragma: no cover - someone else's pid reused it
        return False
    try:  # a zombie (our own child, not yet reaped) has exited
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0] != b"Z"
    except OSError:
        return True
