"""Sans-IO broker core: ``on_message(peer, msg, now)`` and friends return actions.

Nothing in this package does I/O, starts threads or reads a clock; time comes in as
``now`` and randomness from an injected ``random.Random``.
"""
