"""Targets and handlers for integration tests (importable, so every start method works)."""

from __future__ import annotations

import os
import time

import mpmesh


def start_stdlib_helpers() -> None:
    """Start the process-wide helpers ``multiprocessing`` keeps for the life of this
    process (the resource tracker that ``spawn`` starts, the ``forkserver`` server).

    They are the standard library's singletons, not processes a mesh owns, so tests
    start them up front: the leak guard then sees them as already there.
    """
    from multiprocessing import forkserver, resource_tracker

    resource_tracker.ensure_running()
    forkserver.ensure_running()


class CustomError(Exception):
    """A picklable exception with extra state."""

    def __init__(self, message: str, code: int) -> None:
        super().__init__(message, code)
        self.code = code


class Unpicklable(Exception):
    def __reduce__(self):  # type: ignore[no-untyped-def]
        raise TypeError("not today")


def basic(child: mpmesh.Child) -> None:
    """A worker with a handler for every behaviour the tests need."""

    @child.handler("square")
    def square(x: int) -> int:
        return x * x

    @child.handler("echo")
    def echo(x: object) -> object:
        return x

    @child.handler("whoami")
    def whoami(_: object) -> dict[str, object]:
        return {"name": child.name, "group": child.group, "pid": os.getpid(),
                "instance_id": child.instance_id}

    @child.handler("cwd")
    def cwd(_: object) -> str:
        return os.getcwd()

    @child.handler("sleep")
    def sleep(seconds: float) -> float:
        time.sleep(seconds)
        return seconds

    @child.handler("raise")
    def raise_(message: str) -> None:
        raise CustomError(message, 42)

    @child.handler("raise-unpicklable")
    def raise_unpicklable(_: object) -> None:
        raise Unpicklable("boom")

    @child.handler("unpicklable-result")
    def unpicklable_result(_: object) -> object:
        return (x for x in range(3))

    @child.handler("ask-master")
    def ask_master(data: object) -> object:
        return child.send_request("master-echo", data)

    @child.handler("kill-self")
    def kill_self(sig: int) -> None:
        os.kill(os.getpid(), sig)
        time.sleep(10)

    @child.handler("exit")
    def exit_(code: int) -> None:
        os._exit(code)

    @child.handler("async-square")
    async def async_square(x: int) -> int:
        import asyncio

        await asyncio.sleep(0)
        return x * x

    @child.handler("call-master")
    def call_master(data: tuple[str, object]) -> object:
        """Run the master's handler ``data[0]`` on ``data[1]`` and return its result."""
        action, payload = data
        return child.send_request(action, payload)

    @child.handler("async-call-master")
    async def async_call_master(data: tuple[str, object]) -> object:
        """``call-master`` from an ``async def`` handler, through ``child.arequest``."""
        action, payload = data
        return await child.arequest(action, payload)

    @child.handler("raise-if-name")
    def raise_if_name(name: str) -> str:
        """Fail only in the child called ``name`` (for broadcasts)."""
        if child.name == name:
            raise CustomError(f"{name} refuses", 7)
        return child.name

    @child.handler("enter-then-sleep")
    def enter_then_sleep(seconds: float) -> float:
        """Tell the master (handler "entered") that we are inside, then stay busy."""
        child.send_request("entered", {"name": child.name, "pid": os.getpid()})
        time.sleep(seconds)
        return seconds

    child.run()


def last_words(child: mpmesh.Child) -> None:
    """Answers one ``last-words`` request, then its process exits (code 0)."""

    def once(x: object) -> object:
        child._stopping = True  # run() returns once this reply is sent
        return x

    child.register_handler("last-words", once)
    child.run()
