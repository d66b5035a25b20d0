"""Long-running chaos soak of a whole mesh (``python -m tests.soak.soak --help``)."""
