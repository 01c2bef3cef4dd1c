"""On-demand benchmark harness (never part of CI's pytest run): ``python -m tests.bench``."""
