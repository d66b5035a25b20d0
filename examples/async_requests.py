"""asyncio on both sides: ``await m.arequest(...)``, and ``async def`` handlers.

Run: python examples/async_requests.py
"""

from __future__ import annotations

import asyncio

import mpmesh


def worker(child: mpmesh.Child) -> None:
    @child.handler("fetch")
    async def fetch(n: int) -> str:
        await asyncio.sleep(0.05)  # stands in for I/O; many overlap on one event loop
        stamp = await child.arequest("stamp", n)  # an async request back to the master
        return f"item {n} ({stamp})"

    child.run()


async def main() -> None:
    with mpmesh.Master() as m:

        @m.handler("stamp")
        async def stamp(n: int) -> str:
            return f"stamped {n}"

        m.spawn_group("io", worker, size=2, mode="concurrent", max_concurrency=50)
        loop = asyncio.get_running_loop()
        started = loop.time()
        results = await asyncio.gather(*(m.arequest("fetch", "io", n) for n in range(20)))
        print(*results, sep="\n")
        print(f"20 requests of 50 ms each took {loop.time() - started:.2f} s")


if __name__ == "__main__":
    asyncio.run(main())
