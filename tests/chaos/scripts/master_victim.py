"""A master for the SIGKILL test: ``python master_victim.py START_METHOD``.

It spawns a group of 2 children and a child stuck in a long handler, prints
``{"master", "children", "address", "key"}`` as one JSON line on stdout, then waits on
stdin until the test kills it with SIGKILL.
"""

from __future__ import annotations

import json
import os
import sys
import threading
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(ROOT))

import mpmesh
from mpmesh._io import _paths
from tests.integration import workers


def main(method: str) -> None:
    entered = threading.Event()
    with mpmesh.Master(start_method=method, timeout=60) as m:
        m.register_handler("entered", lambda info: entered.set())
        m.spawn_group("g", workers.basic, 2)
        m.spawn_child("busy", workers.basic, auto_restart=False)
        m.request("enter-then-sleep", "busy", 120)
        if not entered.wait(30):
            sys.exit("the busy child never entered its handler")
        assert sorted(m.broadcast("whoami", "g")) == ["g-0", "g-1"]
        print(json.dumps({
            "master": os.getpid(),
            "children": {n: m.process_stats(n).pid for n in m.children()},
            "address": m.address,
            "key": _paths.key_path(m.name),
        }), flush=True)
        sys.stdin.read()  # until SIGKILL (or the test closes our stdin)


if __name__ == "__main__":
    main(sys.argv[1])
