"""A module-name target (``python -m tests.integration.script_module``).

It imports ``tests.integration.workers`` by its package path, which only works when
the master's working directory (the repository root) is on the child's ``sys.path``.
"""

from __future__ import annotations

import os
import sys

import mpmesh


def main() -> None:
    from tests.integration.workers import CustomError

    child = mpmesh.Child(mode="concurrent", max_concurrency=4)

    @child.handler("info")
    def info(_: object) -> dict[str, object]:
        return {"name": child.name, "pid": os.getpid(), "main": __name__,
                "module": __spec__.name if __spec__ is not None else None,
                "mode": child.mode, "cwd_on_path": any(
                    os.path.abspath(p or os.curdir) == os.getcwd() for p in sys.path)}

    @child.handler("raise")
    def raise_(message: str) -> None:
        raise CustomError(message, 3)

    child.register_handler("square", lambda x: x * x)
    child.run()


if __name__ == "__main__":
    main()
