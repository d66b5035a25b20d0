"""The operating system, for the layers above: the broker's event loop, forking and the
zygote, shared-memory segments, runtime paths and key files, the clock (deadlines).

Nothing below this package (``_wire``, ``_broker``) touches the OS; the packages above
use these pieces and own only the sockets of their own connections."""
