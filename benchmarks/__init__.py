"""Benchmarks of the template against a hand-written PyTorch loop; run `python -m benchmarks.benchmark`.

Not part of the test suite (pytest collects `tests/` only).
"""
