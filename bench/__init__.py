"""The benchmarks: one script per question, sharing :mod:`bench.harness`.

Run one from the repository root as ``python -m bench.<name>`` (``python
bench/<name>.py`` works too: see the bootstrap line in :mod:`bench.harness`).
"""
