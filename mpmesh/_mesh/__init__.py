"""The mesh as a user drives it: ``Master``, ``connect()``, the command line, and the
statistics a Master reports."""
