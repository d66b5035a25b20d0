"""A mesh across hosts, on Redis (``Master(..., backend="redis://...")``).

Each host keeps its local broker for same-host work; what crosses hosts goes through
Redis: each process's node (``_node``: its registry entry, leader and reaper in
``_registry``, the serving end of requests between hosts in ``_serve``, the sending end
and its replies in ``_send``, what they share in ``_mail``), and mesh-wide shared state
(``_state``: cache, atomics, locks; ``_pubsub``). ``_link`` holds the connection, the
key names and the error mapping every other module uses. See ``docs/architecture.md`` ("Across hosts") for the design.
"""
