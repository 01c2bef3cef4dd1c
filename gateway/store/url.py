"""store.url -> the redis-py client behind the store (none for memory://), and how long to wait on it.

    memory://                     the embedded store in this process (gateway/store/embedded.py)
    redis://[:pw@]host:port/db    one Redis node (rediss:// for TLS)
    redis+cluster://host:port[,host:port...]   Redis Cluster (rediss+cluster:// for TLS)

Our URL query options (``timeout``, ``socket_timeout``, ``socket_connect_timeout``,
``max_connections``; documented in gateway/store/__init__.py) are taken out before the URL
reaches redis-py. No I/O happens here.
"""
from __future__ import annotations

from typing import Any, NamedTuple
from urllib.parse import parse_qsl, unquote, urlencode, urlsplit, urlunsplit

import redis.asyncio as aioredis
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

_OUR_OPTIONS = ("timeout", "socket_timeout", "socket_connect_timeout", "max_connections")
TIMEOUT_S = 30.0  # generous: a slow store is waited for, not taken for down
SOCKET_TIMEOUT_S = 5.0
CONNECT_TIMEOUT_S = 2.0
MAX_INFLIGHT = 64


class Client(NamedTuple):
    client: Any  # None for memory://
    kind: str  # memory | redis | cluster
    timeout_s: float
    max_inflight: int


def open_client(url: str, *, timeout_s: float | None = None, socket_timeout_s: float | None = None) -> Client:
    """The client for ``url``; ``timeout_s``/``socket_timeout_s`` override the URL's."""
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    ours, query = _options(parts.query)
    timeout = timeout_s or ours.get("timeout", TIMEOUT_S)
    inflight = int(ours.get("max_connections", MAX_INFLIGHT))
    # The pool holds more than the store ever uses at once (it queues the rest itself), so
    # neither a burst nor a connection lost to a cancelled call inside redis-py can exhaust it:
    # an exhausted redis-py pool fails the call instead of waiting.
    pool_size = 2 * inflight + 16
    if scheme == "memory":  # no client: the embedded store holds its own data
        return Client(None, "memory", timeout, inflight)

    sock = socket_timeout_s or ours.get("socket_timeout", SOCKET_TIMEOUT_S)
    common: dict[str, Any] = {
        "socket_timeout": sock,
        "socket_connect_timeout": ours.get("socket_connect_timeout", min(CONNECT_TIMEOUT_S, sock)),
        "retry": Retry(NoBackoff(), 0),  # no hidden retries: one attempt, bounded by the timeouts
        "max_connections": pool_size,
    }
    if scheme in ("redis", "rediss"):
        client = aioredis.Redis.from_url(urlunsplit(parts._replace(query=query)), **common)
        kind = "redis"
    elif scheme in ("redis+cluster", "rediss+cluster"):
        nodes, user, password = _cluster_nodes(parts.netloc)
        extra = dict(parse_qsl(query))
        client = RedisCluster(
            startup_nodes=nodes,
            username=user,
            password=password,
            ssl=scheme.startswith("rediss"),
            ssl_cert_reqs=extra.get("ssl_cert_reqs", "required"),
            ssl_ca_certs=extra.get("ssl_ca_certs"),
            **common,
        )
        kind = "cluster"
    else:
        raise ValueError(f"store.url: unsupported scheme {parts.scheme!r} (memory, redis, rediss, redis+cluster)")
    return Client(client, kind, timeout, inflight)


def _options(query: str) -> tuple[dict[str, float], str]:
    """Split our options out of a URL query; return them and the query left for redis-py."""
    ours: dict[str, float] = {}
    rest = []
    for k, v in parse_qsl(query, keep_blank_values=True):
        if k in _OUR_OPTIONS:
            try:
                ours[k] = float(v)
            except ValueError:
                raise ValueError(f"store.url: {k} must be a number, got {v!r}") from None
        else:
            rest.append((k, v))
    return ours, urlencode(rest)


def _cluster_nodes(netloc: str) -> tuple[list[ClusterNode], str | None, str | None]:
    creds, _, hosts = netloc.rpartition("@")
    user, _, password = creds.partition(":") if creds else ("", "", "")
    nodes = []
    for part in hosts.split(","):
        host, _, port = part.strip().rpartition(":")
        if not host or not port.isdigit():
            raise ValueError(f"store.url: cluster node {part!r} must be host:port")
        nodes.append(ClusterNode(host.strip("[]"), int(port)))
    return nodes, unquote(user) or None, unquote(password) or None
