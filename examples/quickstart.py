"""mpmesh quickstart: a group of workers, requests both ways, printed results.

Run: python examples/quickstart.py
"""

from __future__ import annotations

import os

import mpmesh


def worker(child: mpmesh.Child) -> None:
    """Each worker squares numbers, and can ask the master who it is."""

    @child.handler("square")
    def square(x: int) -> int:
        return x * x

    @child.handler("introduce")
    def introduce(_: object) -> str:
        # A request from the child back to the master, from inside a handler.
        master = child.send_request("whoami", {"pid": child.pid})
        return f"{child.name} (pid {child.pid}) serves master pid {master['master']}"

    child.run()  # serve until the master shuts this child down


def main() -> None:
    with mpmesh.Master() as m:
        m.register_handler("whoami", lambda data: {"master": os.getpid(), "asked_by": data["pid"]})
        m.spawn_group("api", worker, size=2, mode="concurrent", strategy="least-busy")

        print("square(7) =", m.send_request("square", "api", 7))
        futures = [m.request("square", "api", n) for n in range(10)]
        print("squares 0..9 =", [f.result() for f in futures])
        print(m.broadcast("introduce", "api"))
        try:
            m.send_request("no-such-action", "api", None)
        except mpmesh.NoHandler as exc:
            print("as expected:", exc)
    print("mesh shut down; no process left behind")


if __name__ == "__main__":
    main()
