"""A mesh across hosts, on Redis (``Master(..., backend="redis://...")``).

Each host keeps its local broker for same-host work; what crosses hosts goes through
Redis: the node registry (``_node``), requests between hosts and their replies
(``_node``), and mesh-wide shared state (``_state``: cache, atomics, locks;
``_pubsub``). ``_link`` holds the connection, the key names and the error mapping every
other module uses. See ``docs/architecture.md`` ("Across hosts") for the design.
"""
