"""One module per system under test; each runs in its own subprocess (see benchmarks/worker.py)."""
