"""mpmesh benchmarks: each suite against its standard-library peer, side by side.

Run from the repository root::

    python -m benchmarks core            # pinned and unpinned, one table
    python -m benchmarks all --quick     # every suite written so far, a fast smoke run
    python -m benchmarks core --write    # also update benchmarks/RESULTS.md

A suite is a module ``benchmarks/<suite>.py`` exposing ``TITLE: str``,
``budget(cfg) -> float`` (seconds one mode may take before it counts as hung) and
``run(cfg) -> list[Row]``; see ``_harness`` for ``Config``, ``Row`` and the timing
helpers. The harness runs every mode (pinned to one CPU, unpinned) in a fresh
subprocess, so CPU affinity and interpreter state never leak from one mode to the other.
"""

from __future__ import annotations

__all__ = ["SUITES"]

# In the order ``all`` runs them; a suite whose module does not exist yet is skipped.
SUITES = ("core", "supervision", "shared", "manager", "pool", "near", "hosts")
