"""The ``multiprocessing.Manager`` drop-in: the manager, its proxies and the proxy types
of the standard library's registered typeids."""
