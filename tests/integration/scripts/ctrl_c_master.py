"""A master for the Ctrl-C test: ``python ctrl_c_master.py idle|busy``.

It spawns a group of two children and a single child, waits until each answers, prints
``{"master": pid, "children": {name: pid}}`` as one JSON line, then waits: ``idle`` on an
Event, ``busy`` in ``m.send_request`` to ``solo``, whose handler is inside a 0.5 s job
when the line is printed (from the master's ``checkin`` handler). The test sends
SIGINT (to this process, or to its whole process group as a terminal's Ctrl-C does). The
KeyboardInterrupt leaves the ``with`` block, which shuts the mesh down; the script then
prints ``{"interrupted": true, "exits": [...], "handled": {name: requests_handled}}``
(every ``child-exit`` event) and exits with status 130.
"""

from __future__ import annotations

import json
import os
import sys
import threading
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(ROOT))

import mpmesh  # noqa: E402
from tests.integration import supervision_workers  # noqa: E402

WAIT_S = 10.0


BUSY_S = 0.5


def main(how: str) -> int:
    exits: list[dict[str, Any]] = []
    all_exited = threading.Condition()

    def on_exit(info: dict[str, Any]) -> None:
        with all_exited:
            exits.append(info)
            all_exited.notify_all()

    def ready() -> None:
        print(json.dumps({"master": os.getpid(),
                          "children": {n: m.process_stats(n).pid for n in m.children()}}),
              flush=True)

    def checkin(info: dict[str, Any]) -> tuple[str, float]:
        ready()  # the child is inside its handler now
        return ("sleep", BUSY_S)

    m = mpmesh.Master(timeout=WAIT_S)
    try:
        with m:
            m.on("child-exit", on_exit)
            m.register_handler("checkin", checkin)
            m.spawn_group("g", supervision_workers.worker, size=2, mode="sequential")
            m.spawn_child("solo", supervision_workers.worker)
            assert sorted(m.broadcast("whoami", "g")) == ["g-0", "g-1"]
            assert m.send_request("echo", "solo", 1) == 1
            if how == "busy":
                m.send_request("task", "solo", "interrupted")  # Ctrl-C arrives in here
            else:
                ready()
            threading.Event().wait()  # until Ctrl-C
    except KeyboardInterrupt:
        with all_exited:  # child-exit callbacks run on a helper thread, maybe just after
            all_exited.wait_for(lambda: len(exits) >= 3, WAIT_S)
        print(json.dumps({"interrupted": True,
                          "exits": [{k: e[k] for k in ("name", "pid", "exitcode", "signal")} for e in exits],
                          "handled": {n: m.process_stats(n).requests_handled for n in ("g-0", "g-1", "solo")}}),
              flush=True)
        return 130
    print(json.dumps({"interrupted": False}), flush=True)
    return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
