"""The ``Pool`` typeid: a process pool hosted by the manager, used through a PoolProxy
(``apply_async``/``map_async`` return AsyncResult proxies, ``imap`` an Iterator proxy)."""

from __future__ import annotations

from typing import Any

import pytest

from . import _workers
from .conftest import FORK_WARNING


@pytest.mark.filterwarnings(FORK_WARNING)  # the hosting process forks the pool's workers
def test_pool_typeid(manager: Any) -> None:
    pool = manager.Pool(2)
    try:
        assert pool.apply(_workers.square, (7,)) == 49
        assert pool.map(_workers.square, range(5)) == [0, 1, 4, 9, 16]
        assert pool.starmap(pow, [(2, 3), (3, 2)]) == [8, 9]
        result = pool.apply_async(_workers.square, (8,))
        assert result.get(60) == 64 and result.ready() and result.successful()
        assert pool.map_async(_workers.square, [3]).get(60) == [9]
        assert list(pool.imap(_workers.square, range(3))) == [0, 1, 4]
        assert sorted(pool.imap_unordered(_workers.square, range(3))) == [0, 1, 4]
    finally:
        pool.terminate()
        pool.join()
