"""A worker process of ``run_cpython.py``: runs some of CPython's tests against mpmesh.

It imports ``cpython_suite`` before anything else, and so does every child started with
``spawn`` (which re-imports this file as ``__mp_main__``): the factories are swapped in
every process before CPython's test module is imported.

    python conformance/cpython_worker.py --start-method spawn WithProcessesTestPool
"""

import cpython_suite

if __name__ == "__main__":
    cpython_suite.main()
