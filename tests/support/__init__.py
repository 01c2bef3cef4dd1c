"""Test-only helper programs (run as ``python -m tests.support.<name>``); never shipped."""
