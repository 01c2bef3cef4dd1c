"""prometheus_client's multiprocess mode, for ``gateway serve --workers N``.

The parent calls ``prepare_multiprocess(dir)`` before forking; every worker then builds its own
``Metrics`` (it sees ``PROMETHEUS_MULTIPROC_DIR``) and any worker's exposition is the sum over
all workers, dead ones included, so counters never go backwards when a worker restarts.
"""
from __future__ import annotations

import os

from prometheus_client import multiprocess, values

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"


def prepare_multiprocess(directory: str) -> None:
    """Parent only, once, before any worker starts and before any metric exists.

    Empties ``directory`` of metric files (only ``*.db``: the path may be shared), exports it as
    ``PROMETHEUS_MULTIPROC_DIR`` so forked and spawned workers inherit it, and switches
    prometheus_client's value class, which it otherwise picks once, when first imported.
    Never call it on a worker restart: the dead worker's files keep the counters monotonic.
    """
    directory = os.path.abspath(directory)
    os.makedirs(directory, exist_ok=True)
    for entry in os.scandir(directory):
        if entry.name.endswith(".db") and entry.is_file():
            os.remove(entry.path)
    os.environ[MULTIPROC_ENV] = directory
    use_multiprocess_values(True)


def mark_worker_dead(pid: int) -> None:
    """Parent, when a worker exits: drop its share of the live gauges (in-flight requests)."""
    directory = os.environ.get(MULTIPROC_ENV)
    if directory:
        multiprocess.mark_process_dead(pid, directory)


def use_multiprocess_values(on: bool) -> None:
    """Metrics made from now on keep their values in the shared files (``on``) or in memory."""
    if getattr(values.ValueClass, "_multiprocess", False) != on:
        values.ValueClass = values.MultiProcessValue() if on else values.MutexValue
