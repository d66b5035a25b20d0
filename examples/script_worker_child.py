"""The worker script started by ``script_worker.py``; it could be any program's entry point."""

from __future__ import annotations

import mpmesh

child = mpmesh.Child()
greeting = child.send_request("config")["greeting"]  # ask the master before serving


@child.handler("greet")
def greet(name: str) -> str:
    return f"{greeting}, {name} (from {child.name})"


child.run()
