"""mpmesh.Pool as a drop-in for multiprocessing.Pool, and what it does that the stdlib cannot.

Run: python examples/pool_dropin.py
"""

from __future__ import annotations

import os
import signal

import mpmesh


def square(x: int) -> int:
    return x * x


def crash(_: object) -> None:
    os.kill(os.getpid(), signal.SIGKILL)  # the standard Pool would wait forever for this task


def slow(seconds: float) -> float:
    import time

    time.sleep(seconds)
    return seconds


def main() -> None:
    # The same code as with multiprocessing.Pool: only the import changed.
    with mpmesh.Pool(4) as pool:
        print("map:", pool.map(square, range(10)))
        print("imap:", list(pool.imap(square, range(5))))
        print("apply_async:", pool.apply_async(square, (12,)).get(timeout=10))
        print("lambda:", pool.map(lambda x: x + 0.5, range(3)))  # pickle alone cannot do this

        # A worker dies mid-task: that task fails, the pool replaces the worker and goes on.
        try:
            pool.apply(crash, (None,))
        except mpmesh.WorkerLost as exc:
            print("lost:", exc)
        print("still working:", pool.map(square, range(3)))

    # A task that runs too long is failed and its worker killed and replaced.
    with mpmesh.Pool(2, task_timeout=0.5) as pool:
        try:
            pool.apply(slow, (5.0,))
        except mpmesh.RequestTimeout as exc:  # also a multiprocessing.TimeoutError
            print("timed out:", exc)
        print("and on:", pool.apply(slow, (0.01,)))

    # Inside a Master, the pool's workers are a group of the mesh.
    with mpmesh.Master() as m:
        pool = m.Pool(2)
        print("m.Pool:", pool.map(square, range(4)), "on", m.children())
        pool.close()
        pool.join()


if __name__ == "__main__":
    main()
