"""mpmesh.Manager() as a drop-in for multiprocessing.Manager().

The program below is ordinary multiprocessing code; only the line that creates the
manager changed. It then shows what the standard library cannot do: a worker killed
while holding the shared lock does not leave it locked forever.

Run: python examples/manager_dropin.py
"""

from __future__ import annotations

import multiprocessing
import os
import signal
from typing import Any

import mpmesh


def count_words(text: str, counts: Any, lock: Any, done: Any) -> None:
    """A worker: add its words to the shared dict under the shared lock."""
    for word in text.split():
        with lock:
            counts[word] = counts.get(word, 0) + 1
    done.put(os.getpid())


def hold_and_hang(lock: Any, ready: Any) -> None:
    lock.acquire()
    ready.put("holding the lock")
    signal.pause()  # until it is killed


def main() -> None:
    texts = ["the quick brown fox", "jumps over the lazy dog", "the end"]
    ctx = multiprocessing.get_context("spawn")
    # was: with multiprocessing.Manager() as manager:
    with mpmesh.Manager() as manager:
        counts, lock, done = manager.dict(), manager.Lock(), manager.Queue()
        workers = [ctx.Process(target=count_words, args=(t, counts, lock, done)) for t in texts]
        for p in workers:
            p.start()
        finished = sorted(done.get(timeout=60) for _ in workers)
        for p in workers:
            p.join()
        print(f"{len(finished)} workers counted {sum(counts.values())} words; "
              f"'the' appears {counts['the']} times")

        ready = manager.Queue()
        holder = ctx.Process(target=hold_and_hang, args=(lock, ready))
        holder.start()
        print("worker:", ready.get(timeout=60))
        os.kill(holder.pid, signal.SIGKILL)
        holder.join()
        # With multiprocessing.Manager() this acquire would fail: the lock stays held.
        print("lock free again after its holder was killed:", lock.acquire(timeout=10))
        lock.release()


if __name__ == "__main__":
    main()
