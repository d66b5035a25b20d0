"""Sans-IO wire protocol: bytes <-> typed messages, the handshake, per-peer state.

Nothing in this package does I/O, starts threads or reads a clock.
"""
