"""Which of CPython's multiprocessing tests run against mpmesh, and which do not (and why).

Shared by ``run_cpython.py`` (the driver, which must not import the test module) and
``cpython_suite.py`` (the worker, which swaps the factories on import).
"""

from __future__ import annotations

__all__ = ["EXCLUDED", "HARNESS_SKIPS", "MANAGER_TESTS", "POOL_TESTS", "SELECTED",
           "START_METHOD_ENV", "TARGET_ENV"]

# The start method a worker's setUpModule sets; children inherit it through the environment.
START_METHOD_ENV = "MPMESH_CONFORMANCE_START_METHOD"
# "mpmesh" (the default) swaps the factories; "stdlib" runs the tests unchanged, a baseline.
TARGET_ENV = "MPMESH_CONFORMANCE_TARGET"

# -- what runs -----------------------------------------------------------------------------

MANAGER_TESTS: tuple[str, ...] = (
    # The generic shared-object tests, on objects of the manager (ManagerMixin).
    "WithManagerTestQueue",
    "WithManagerTestLock",
    "WithManagerTestSemaphore",
    "WithManagerTestCondition",
    "WithManagerTestEvent",
    "WithManagerTestBarrier",
    "WithManagerTestContainers",
    "WithManagerTestPool",  # manager.Pool(): a pool hosted by the manager, used by proxy
    # Manager-specific tests.
    "WithManagerTestMyManager",  # a BaseManager subclass with registered types
    "WithManagerTestRemoteManager",  # a TCP manager and a second one connect()ed to it
    "WithManagerTestManagerRestart",  # get_server(), then start() on the same address
    "TestSyncManagerTypes",  # every SyncManager type, used from a child process
    "TestInitializers.test_manager_initializer",  # SyncManager.start(initializer, args)
)

POOL_TESTS: tuple[str, ...] = (
    "WithProcessesTestPool",
    "WithProcessesTestPoolWorkerErrors",
    "WithProcessesTestPoolWorkerLifetime",
    "TestInitializers.test_pool_initializer",  # Pool(1, initializer, args)
    "TestStdinBadfiledescriptor.test_pool_in_process",  # a Pool made inside a child process
)

SELECTED: tuple[str, ...] = MANAGER_TESTS + POOL_TESTS

# Classes of the module that create managers or pools, and why they do not run here.
EXCLUDED: dict[str, str] = {
    "WithThreads*": "multiprocessing.dummy (threads), which mpmesh does not replace",
    "WithProcessesTestManagerRestart, WithThreadsTestManagerRestart":
        "the same test as WithManagerTestManagerRestart (it only uses multiprocessing.Process)",
    "TestPoolNotLeakOnFailure":
        "builds the class multiprocessing.pool.Pool with a mock context and counts the "
        "Process objects it makes: the standard Pool's internals, not a factory call",
    "WithProcessesTestSharedMemory":
        "SharedMemoryManager, which mpmesh does not provide",
}

# Tests that cannot reach mpmesh through the swap; they are reported as skipped.
HARNESS_SKIPS: dict[str, str] = {
    "WithProcessesTestPoolWorkerLifetime.test_worker_finalization_via_atexit_handler_of_multiprocessing":
        "runs `from multiprocessing import Pool` in a fresh, isolated interpreter (-I), "
        "which the harness does not patch; it would test the standard library",
}
