"""Benchmark scripts (run from a source checkout): `python -m benchmarks.decode`, or `fmstack bench`."""
