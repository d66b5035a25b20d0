"""A script target: it builds its own ``mpmesh.Child()`` from what the master put in
the environment, as a user's standalone worker script would."""

from __future__ import annotations

import os
import sys

import mpmesh


def main() -> None:
    child = mpmesh.Child()
    child.register_handler("square", lambda x: x * x)
    child.register_handler("info", lambda _: {
        "name": child.name, "group": child.group, "pid": os.getpid(), "main": __name__,
        "tag": os.environ.get("MPMESH_TEST_TAG"), "script": os.path.abspath(sys.argv[0]),
    })
    child.register_handler("ask-master", lambda data: child.send_request("master-echo", data))
    child.run()


if __name__ == "__main__":
    main()
