"""A process's side of its broker connection: the clients (in-process and socket), the
futures callers wait on, request handlers, which connection a process uses, and near
copies of shared state read without a round trip."""
