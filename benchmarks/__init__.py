"""Speed and overhead benchmarks, run on demand (never as timed tests): ``python benchmarks/run.py``."""
