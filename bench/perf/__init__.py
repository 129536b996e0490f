"""Benchmarks behind ``make perf``: numbers go to ``results/perf/``, never into unit tests."""
