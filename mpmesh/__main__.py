"""``python -m mpmesh serve|status|stats|stop --name NAME`` (see ``_cli``)."""

from __future__ import annotations

import sys

from ._mesh._cli import main

if __name__ == "__main__":
    sys.exit(main())
