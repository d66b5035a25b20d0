"""Worker processes: the ``Child`` a process of a group runs as, and the supervisor that
forks, watches and restarts them."""
