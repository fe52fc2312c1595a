"""The template's benchmarks (benchmark.py, scale.py) and GPU checks (gpu_check.sh); not part of the test suite."""
