"""The ``multiprocessing.Pool`` drop-in (see ``_api.py``; how tasks move: ``_engine.py``)."""

from ._api import Pool as Pool

__all__ = ["Pool"]
