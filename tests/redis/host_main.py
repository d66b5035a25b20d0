"""A simulated host of a mesh across hosts: run as a script with its own runtime
directory, it starts a Master on the test's Redis with a group of workers, prints one
JSON line when ready, then one line per ``node-left`` it hears of, and ends when its
stdin closes.

``python host_main.py URL MESH TAG GROUP SIZE MODE``
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time

import mpmesh

KEY = b"mesh-across-hosts-test-key"


def worker(child: mpmesh.Child, tag: str) -> None:
    served = child.cache("served")

    @child.handler("where")
    def where(_: object) -> dict[str, object]:
        served.incr(tag)
        return {"host": tag, "iid": child.instance_id, "pid": os.getpid()}

    @child.handler("sleep")
    def sleep(seconds: float) -> str:
        served.incr(tag)
        time.sleep(seconds)  # the work: a handler that takes this long
        return tag

    @child.handler("cache_get")
    def cache_get(key: str) -> object:
        return child.cache("shared").get(key)

    @child.handler("lock_token")
    def lock_token(name: str) -> int:
        with child.lock(name, ttl=10) as grant:
            return grant.token

    @child.handler("hold_lock")
    def hold_lock(name: str) -> int:
        grant = child.lock(name)  # no TTL: held while this process lives
        return grant.token

    @child.handler("publish")
    def publish(args: tuple[str, object]) -> int:
        return child.publish(*args)

    @child.handler("register")
    def register(name: str) -> bool:
        child.register(name, lambda *a: (tag, a))
        return True

    child.run()


def main() -> None:
    url, mesh, tag, group, size, mode = sys.argv[1:7]
    with mpmesh.Master(mesh, backend=url, authkey=KEY, timeout=10) as m:
        lock = threading.Lock()

        def left(node: object) -> None:
            with lock:
                print(json.dumps({"left": node.instance_id}), flush=True)  # type: ignore[attr-defined]

        m.on("node-left", left)
        names = m.spawn_group(group, worker, int(size), mode=mode, args=(tag,)) if int(size) else []
        print(json.dumps({"iid": m.instance_id, "pid": os.getpid(), "children": names}), flush=True)
        sys.stdin.read()


if __name__ == "__main__":
    main()
