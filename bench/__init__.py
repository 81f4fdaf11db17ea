"""Benchmarks: `python -m bench.<name>`; each writes bench/results-<name>.json."""
