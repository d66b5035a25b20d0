"""The only package that touches sockets, selectors, processes and the clock."""
