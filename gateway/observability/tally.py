"""The request path's view of a metric child: one callable per child, made once.

A labelled child's public inc/observe takes a lock and re-checks on every call what holds from
its creation on (labels complete, amount not negative), and walks the buckets in Python. The
request path moves ~15 of them per request, so it never calls them: ``HotPath`` gives it, per
child, a callable made once.

In one process (the usual case) that callable adds to a plain tally (``_Tally``,
``_HistogramTally``); ``HotPath``, registered as a collector ahead of the metrics, hands the
tallies to their children whenever the whole registry is collected, so every scrape is exact.
The request path runs on the event loop's thread; collecting may run on any (publishing only
reads the tallies). With several workers another process reads this one's files, so there the
callable moves the child's own value at once (``adder``, ``observer``), writing its slot of the
worker's file without prometheus_client's per-call lock and pid check.
"""
from __future__ import annotations

import threading
from bisect import bisect_left
from typing import Callable

from prometheus_client import Counter, Gauge, Histogram


def adder(child: Counter | Gauge) -> Callable[[float], None]:
    """``child.inc`` for amounts the caller knows are valid (> 0 for a counter)."""
    value = getattr(child, "_value", None)
    return _mmap_adder(value) or (value.inc if callable(getattr(value, "inc", None)) else child.inc)


def _mmap_adder(value) -> Callable[[float], None] | None:
    """With several workers, a value lives in this process' mmap file: its own inc takes the module
    lock and checks the pid on every call (~2.5 us, ~17 times a request). The request path only
    runs on the event loop's thread of the worker that made the value, so it writes the value's
    slot directly (~0.4 us). None when this client keeps its values otherwise."""
    write, key = getattr(getattr(value, "_file", None), "write_value", None), getattr(value, "_key", None)
    if write is None or key is None or not isinstance(getattr(value, "_value", None), float):
        return None

    def add(amount: float) -> None:
        value._value += amount
        write(key, value._value, 0.0)

    return add


def _histogram_parts(child: Histogram) -> tuple[tuple, tuple, Callable] | None:
    """(upper bounds, each bucket's inc, the sum's inc), or None if this client keeps them elsewhere."""
    try:
        bounds = tuple(child._upper_bounds)
        buckets = tuple(_mmap_adder(b) or b.inc for b in child._buckets)
        add_sum = _mmap_adder(child._sum) or child._sum.inc
    except AttributeError:
        return None
    if len(bounds) != len(buckets) or bounds[-1] != float("inf"):
        return None
    return bounds, buckets, add_sum


def observer(child: Histogram) -> Callable[[float], None]:
    """``child.observe``: the sum, and the first bucket whose upper bound is >= the amount."""
    parts = _histogram_parts(child)
    if parts is None:
        return child.observe
    bounds, buckets, add_sum = parts

    def observe(amount: float) -> None:
        add_sum(amount)
        buckets[bisect_left(bounds, amount)](1)

    return observe


class _Tally:
    """What the request path added to one counter or gauge child, until ``publish``."""

    __slots__ = ("total", "_published", "_inc")

    def __init__(self, child: Counter | Gauge) -> None:
        self.total = 0
        self._published = 0
        self._inc = adder(child)

    def add(self, amount: float) -> None:
        self.total += amount

    def publish(self) -> None:
        total = self.total  # read once; what is added meanwhile goes with the next publish
        if total != self._published:
            self._inc(total - self._published)
            self._published = total


class _HistogramTally:
    """What the request path observed for one histogram child, until ``publish``."""

    __slots__ = ("_bounds", "counts", "sum", "_published_counts", "_published_sum", "_buckets", "_add_sum")

    def __init__(self, parts: tuple[tuple, tuple, Callable]) -> None:
        self._bounds, self._buckets, self._add_sum = parts
        self.counts = [0] * len(self._bounds)
        self._published_counts = [0] * len(self._bounds)
        self.sum = self._published_sum = 0.0

    def observe(self, amount: float) -> None:
        self.sum += amount
        self.counts[bisect_left(self._bounds, amount)] += 1

    def publish(self) -> None:
        for i, (n, published) in enumerate(zip(self.counts, self._published_counts)):
            if n != published:
                self._buckets[i](n - published)
                self._published_counts[i] = n
        total = self.sum
        if total != self._published_sum:
            self._add_sum(total - self._published_sum)
            self._published_sum = total


class HotPath:
    """Makes the request path's callables; in one process, also a collector with no metric of its
    own: register it before the metrics, and collecting the registry first hands every tally to
    its child."""

    def __init__(self, multiprocess: bool) -> None:
        self._multiprocess = multiprocess
        self._tally_of: dict[int, _Tally | _HistogramTally] = {}  # by id() of their child
        self._lock = threading.Lock()

    def counting(self, child: Counter | Gauge) -> Callable[[float], None]:
        """What the request path calls to add to ``child``."""
        if self._multiprocess:
            return adder(child)
        tally = self._tally_of.get(id(child))  # children live as long as their metric: ids stay theirs
        if tally is None:
            tally = self._tally_of[id(child)] = _Tally(child)
        return tally.add

    def observing(self, child: Histogram) -> Callable[[float], None]:
        """What the request path calls to observe into ``child``."""
        tally = None if self._multiprocess else self._tally_of.get(id(child))
        if tally is None:
            parts = None if self._multiprocess else _histogram_parts(child)
            if parts is None:
                return observer(child)
            tally = self._tally_of[id(child)] = _HistogramTally(parts)
        return tally.observe

    def publish(self) -> None:
        with self._lock:
            for tally in list(self._tally_of.values()):
                tally.publish()

    def describe(self) -> list:
        return []

    def collect(self) -> list:
        self.publish()
        return []
