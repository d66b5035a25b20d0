"""Shared state as every process of a mesh sees it: the cache, counters, locks, pub/sub
and RPC proxies, over a broker connection (or, across hosts, over Redis)."""
