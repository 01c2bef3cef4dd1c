"""Reading the config file again while serving: which keys need a restart, and watching the file.

A reload applies everything but the keys in ``RESTART_ONLY``: they shape what was opened at
start-up (the listening socket, the store connection, the upstream client, the routes, the
lease renewal tick, the file watcher itself), so a changed value is reported and the running
one kept. The watcher polls the file's ``stat`` (cheap) through its symlinks, so it also sees
the swap Kubernetes does for a mounted ConfigMap (``..data`` pointed at a new directory).
"""
from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
from collections.abc import Awaitable, Callable

from gateway.config import Config, ConfigError, load

log = logging.getLogger(__name__)

WATCH_INTERVAL_S = 1.0
RESTART_ONLY = (
    "server.host", "server.port", "server.max_body_mb", "server.metrics_path", "server.metrics",
    "server.metrics_port", "server.read_timeout_s", "server.watch_config",
    "upstream.base_url", "upstream.api_key", "upstream.connect_timeout_s", "upstream.max_retries",
    "store.url", "store.lease_ttl_s", "images.storage", "images.s3", "tracing",
)


def _value(config: Config, key: str):
    value = config
    for name in key.split("."):
        value = getattr(value, name)
    return value


def keep_restart_only(running: Config, new: Config) -> tuple[Config, list[str]]:
    """``new`` with the running values of the restart-only keys, and the keys that differed."""
    changed = [key for key in RESTART_ONLY if _value(running, key) != _value(new, key)]
    kept: dict = {}
    for key in changed:
        section, _, name = key.partition(".")
        if name:  # one key of a section
            kept[section] = dataclasses.replace(kept.get(section, getattr(new, section)), **{name: _value(running, key)})
        else:  # a whole section
            kept[section] = _value(running, key)
    return (dataclasses.replace(new, **kept) if kept else new), changed


def read_again(path: str, running: Config) -> tuple[Config, list[str]]:
    """The file's config to apply now, and the restart-only keys it changed; raises
    ``ConfigError`` (every problem by key path) when the file is not a valid config."""
    try:
        new = load(path)
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError([f"{path}: cannot read: {getattr(e, 'strerror', None) or e}"]) from None
    return keep_restart_only(running, new)


class FileWatcher:
    """Calls ``on_change`` when the file at ``path`` (its symlinks followed) changes."""

    def __init__(self, path: str, interval_s: float = WATCH_INTERVAL_S) -> None:
        self.path, self.interval_s = path, interval_s

    def _signature(self) -> tuple | None:
        try:
            st = os.stat(self.path)  # follows symlinks: a swapped ..data shows as another inode
        except OSError:
            return None  # mid-swap or removed: wait for it to come back
        return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns

    async def run(self, on_change: Callable[[], Awaitable[object]]) -> None:
        last = self._signature()
        while True:
            await asyncio.sleep(self.interval_s)
            now = self._signature()
            if now is not None and now != last:
                last = now
                log.info("config file %s changed; reloading", self.path)
                try:
                    await on_change()
                except Exception:  # a failed reload must not end the watching: the next change may be good
                    log.exception("config reload after a change of %s failed", self.path)
