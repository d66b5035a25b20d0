"""One mesh over several machines, on Redis.

Every machine names the same Redis and the same key (install with
``pip install 'mpmesh[redis]'``)::

    export MPMESH_BACKEND=redis://db.example:6379/0 MPMESH_AUTHKEY=change-me
    python examples/across_hosts.py serve    # on machine B: a group of workers
    python examples/across_hosts.py ask      # on machine A: requests to them

``serve`` runs until Ctrl-C (or SIGTERM); ``ask`` waits for the group to show up, sends
it requests, and lists every process of the mesh, on every machine.
"""

from __future__ import annotations

import os
import signal
import socket
import sys
import time

import mpmesh

MESH = "example-across"


def worker(child: mpmesh.Child) -> None:
    @child.handler("square")
    def square(n: int) -> dict[str, object]:
        child.cache("counts").incr(socket.gethostname())   # mesh-wide, in Redis
        return {"square": n * n, "host": socket.gethostname(), "pid": os.getpid()}

    child.run()


def serve() -> None:
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # leave the mesh cleanly
    with mpmesh.Master(MESH) as m:                           # backend and key from the environment
        m.spawn_group("squares", worker, size=2)
        print(f"serving as node {m.instance_id} on {socket.gethostname()}", flush=True)
        try:
            while True:
                signal.pause()
        except KeyboardInterrupt:
            pass


def ask() -> None:
    with mpmesh.connect(MESH) as mesh:                       # no Master here: through Redis alone
        deadline = time.monotonic() + 30
        while not any(n.group == "squares" for n in mesh.nodes()):
            if time.monotonic() > deadline:
                sys.exit("no 'squares' group in the mesh: is `across_hosts.py serve` running?")
            time.sleep(0.2)                                   # the serving machine beats every second
        for n in range(5):
            print(mesh.send_request("square", "squares", n, timeout=10))
        for node in mesh.nodes():
            print(f"  node {node.instance_id}: {node.role} {node.name!r} pid {node.pid} on {node.hostname}")
        print("requests served per host:", dict(mesh.cache("counts").items()))


if __name__ == "__main__":
    {"serve": serve, "ask": ask}.get(sys.argv[1] if len(sys.argv) > 1 else "", lambda: sys.exit(__doc__))()
