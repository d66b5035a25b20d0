"""The owner of a standalone Pool, for the SIGKILL test: ``python pool_owner_victim.py METHOD DIR``.

Both workers start a task that blocks (``DIR/running-N`` marks it started); the script
then prints ``{"owner": pid}`` as one JSON line and waits on stdin until the test kills
it with SIGKILL.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(ROOT))

import mpmesh
from tests.integration import pool_workers


def main(method: str, directory: str) -> None:
    pool = mpmesh.Pool(2, context=multiprocessing.get_context(method))
    markers = [os.path.join(directory, f"running-{i}") for i in range(2)]
    never = os.path.join(directory, "never")
    for marker in markers:
        pool.apply_async(pool_workers.mark_and_block, (marker, never))
    deadline = time.monotonic() + 30
    while not all(os.path.exists(m) for m in markers):
        if time.monotonic() > deadline:
            sys.exit("the tasks never started")
        time.sleep(0.01)
    print(json.dumps({"owner": os.getpid()}), flush=True)
    sys.stdin.read()  # until SIGKILL (or the test closes our stdin)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
