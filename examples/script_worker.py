"""A child that is a plain script: the master starts ``script_worker_child.py`` by path.

The script builds ``mpmesh.Child()`` itself; the connection details travel in its
environment. Run: python examples/script_worker.py
"""

from __future__ import annotations

import os

import mpmesh

HERE = os.path.dirname(os.path.abspath(__file__))


def main() -> None:
    with mpmesh.Master() as m:
        m.register_handler("config", lambda _: {"greeting": "hello from the master"})
        m.spawn_child("script", os.path.join(HERE, "script_worker_child.py"))
        print(m.send_request("greet", "script", "Ada"))
        print("the script runs as pid", m.process_stats("script").pid)


if __name__ == "__main__":
    main()
