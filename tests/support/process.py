"""Ending a process a test started: SIGTERM (or SIGKILL), a grace period, then SIGKILL."""
from __future__ import annotations

import subprocess


def stop_process(proc: subprocess.Popen, *, grace_s: float = 10, kill: bool = False) -> None:
    """Stop ``proc`` if it still runs; it is reaped either way."""
    if proc.poll() is not None:
        return
    (proc.kill if kill else proc.terminate)()
    try:
        proc.wait(grace_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)
