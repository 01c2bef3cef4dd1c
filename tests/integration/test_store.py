"""The store on every backend (memory, redis-server, 3-node Cluster), and Redis URLs for real."""
from __future__ import annotations

import asyncio
import subprocess
from functools import partial

import pytest

from gateway.limits import ledger
from gateway.limits.plan import limit_keys
from gateway.store import StoreError, connect
from tests.fixtures.gateway import wait_for
from tests.fixtures.redis import RedisServer, free_port


async def test_get_set_delete_ping(store):
    assert await store.get("gw:k") is None
    assert await store.set("gw:k", b"\x00bytes", ttl_s=60) is True
    assert await store.set("gw:k", b"other", ttl_s=60, only_if_absent=True) is False
    assert await store.get("gw:k") == b"\x00bytes"
    await store.delete("gw:k")
    assert await store.get("gw:k") is None
    await store.ping()
    assert store.healthy


async def test_get_ranges_reads_several_ranges_of_one_key_in_one_call(store):
    await store.set("gw:r", b"0123456789", ttl_s=60)
    assert await store.get_ranges("gw:r", [(2, 4), (0, 1), (8, 20)]) == [b"234", b"01", b"89"]
    assert await store.get_ranges("gw:absent", [(0, 3), (5, 9)]) == [b"", b""]
    await store.delete("gw:r")


async def test_scripts_reload_after_the_server_forgets_them(store):
    keys = [ledger.day_key("a", "2026-11-25")]
    assert await store.run_script("usage", keys, []) == [[]]
    await store.client.script_flush()
    assert await store.run_script("usage", keys, []) == [[]]


async def test_a_script_error_is_a_store_error(store):
    await store.set(ledger.day_key("b", "2026-11-25"), b"not a hash", ttl_s=60)
    with pytest.raises(StoreError):  # a ledger key holding the wrong type
        await store.run_script("usage", [ledger.day_key("b", "2026-11-25")], [])


@pytest.mark.parametrize("store_url", ["cluster"], indirect=True)
async def test_all_keys_of_a_team_share_one_cluster_slot(store, store_url):
    keys = [*limit_keys("design"), ledger.day_key("design", "2026-11-25"), ledger.month_key("design", "2026-11")]
    slots = {await store.client.cluster_keyslot(k) for k in keys}
    assert len(slots) == 1


async def test_password_and_db_in_the_url(tmp_path):
    server = RedisServer(tmp_path, password="s3cret")
    server.start()
    try:
        s = await connect(f"redis://:s3cret@127.0.0.1:{server.port}/3")
        wrong = await connect(f"redis://:nope@127.0.0.1:{server.port}/3")
        await s.set("gw:x", b"1", ttl_s=60)
        with pytest.raises(StoreError):
            await wrong.ping()
        # scripts and ranges go over the store's own connection (pipe.py): the same AUTH and db
        assert await s.run_script("cache_read", ["gw:x"], [0, 0, b""])
        assert await s.get_ranges("gw:x", [(0, 0)]) == [b"1"]
        with pytest.raises(StoreError) as refused:
            await wrong.run_script("cache_read", ["gw:x"], [0, 0, b""])
        assert refused.value.down is True
        with server.client() as c:
            assert c.get("gw:x") is None  # db 0
            c.select(3)
            assert c.get("gw:x") == b"1"
        await s.close()
        await wrong.close()
    finally:
        server.kill()


async def test_concurrent_scripts_each_get_their_own_answer(store):
    """On Redis these go out as one pipeline: each caller still gets its own result or error."""
    await store.set(ledger.day_key("c7", "2026-11-25"), b"not a hash", ttl_s=60)
    await store.client.script_flush()  # and every script has to be loaded again on the way

    async def read(i: int):
        return await store.run_script("usage", [ledger.day_key(f"c{i}", "2026-11-25")], [])

    got = await asyncio.gather(*(read(i) for i in range(20)), return_exceptions=True)
    assert isinstance(got[7], StoreError) and got[7].op == "usage"
    assert [g for i, g in enumerate(got) if i != 7] == [[[]]] * 19
    assert await read(0) == [[]] and store.healthy


# -- latency is not an outage: a real Redis paused (SIGSTOP) or killed --------------------------


async def test_a_cancelled_caller_never_goes_on(store):
    """A client that leaves cancels its handler; a cancellation lost inside the store client would
    let the handler go on (it once served a cache hit to nobody, and could call the provider)."""
    async def caller():
        while not asyncio.current_task().cancelling():  # a lost cancellation ends it quietly
            await store.set("gw:test:lock", b"x", ttl_s=5, only_if_absent=True)

    for ticks in range(200):
        task = asyncio.create_task(caller())
        for _ in range(ticks % 20):  # cancel at every point of the call, one loop turn at a time
            await asyncio.sleep(0)
        task.cancel()
        await asyncio.wait([task])
        assert task.cancelled(), f"cancellation lost after {ticks % 20} loop turns"


async def test_a_paused_redis_is_waited_for_then_answers(fresh_redis_server):
    store = await connect(fresh_redis_server.url)
    await store.set("gw:w", b"v", ttl_s=60)
    fresh_redis_server.pause()
    try:
        pending = asyncio.create_task(store.get("gw:w"))
        await wait_for(lambda: fresh_redis_server.unread_bytes() > 0)  # the GET waits in Redis' socket
        await asyncio.sleep(1.5)  # the stall lasts: longer than the old backstop, short of down
        fresh_redis_server.resume()
        assert await pending == b"v"
        assert store.healthy and store.last_error is None
    finally:
        fresh_redis_server.resume()
        await store.close()


async def test_a_caller_that_gives_up_on_a_paused_redis_is_told_it_is_slow_not_down(fresh_redis_server):
    errors: list[str] = []
    store = await connect(fresh_redis_server.url, on_error=errors.append)
    await store.ping()
    fresh_redis_server.pause()
    try:
        with pytest.raises(StoreError) as e:
            await store.run_script("usage", [ledger.day_key("p", "2026-11-25")], [], timeout_s=0.2)
        assert e.value.down is False and errors == ["usage"] and store.healthy
    finally:
        fresh_redis_server.resume()
    assert await store.run_script("usage", [ledger.day_key("p", "2026-11-25")], []) == [[]]
    await store.close()


async def test_a_redis_silent_for_socket_timeout_is_down_then_recovers(fresh_redis_server):
    store = await connect(fresh_redis_server.url + "?socket_timeout=0.2")
    await store.ping()
    fresh_redis_server.pause()
    try:
        with pytest.raises(StoreError) as e:
            await store.get("gw:s")
        assert e.value.down is True and not store.healthy and "TimeoutError" in store.last_error
    finally:
        fresh_redis_server.resume()
    assert await store.get("gw:s") is None and store.healthy  # the next call probes, and gets through
    await store.close()


async def test_a_killed_redis_is_down_at_once_then_recovers_on_the_same_port(fresh_redis_server):
    store = await connect(fresh_redis_server.url)
    await store.set("gw:k", b"1", ttl_s=60)
    fresh_redis_server.kill()
    got = await asyncio.gather(*(store.get("gw:k") for _ in range(10)), return_exceptions=True)
    assert all(isinstance(e, StoreError) and e.down is True for e in got) and not store.healthy
    fresh_redis_server.start()
    assert await store.get("gw:k") is None and store.healthy  # a new, empty Redis
    await store.close()


async def test_callers_giving_up_on_a_paused_redis_leave_the_pool_whole(fresh_redis_server):
    """Each caller that gives up cancels its command inside redis-py; 120 of them, 4 at a time,
    must not use up the pool (24 connections for max_connections=4)."""
    store = await connect(fresh_redis_server.url + "?max_connections=4")
    fresh_redis_server.pause()
    try:
        for _ in range(30):
            gave_up = await asyncio.gather(*(store.get(f"gw:{i}", timeout_s=0.02) for i in range(4)),
                                           return_exceptions=True)
            assert all(isinstance(e, StoreError) and e.down is False for e in gave_up)
    finally:
        fresh_redis_server.resume()
    assert await asyncio.gather(*(store.get(f"gw:{i}") for i in range(40))) == [None] * 40
    assert store.healthy
    await store.close()


async def test_answers_stay_in_order_after_callers_gave_up_on_a_paused_redis(fresh_redis_server):
    """Callers whose patience ran out while their scripts were in flight leave replies that come
    later on the shared connection: each of the next callers still gets its own answer."""
    store = await connect(fresh_redis_server.url)
    await store.set("gw:order:0", b"zero", ttl_s=60)
    fresh_redis_server.pause()
    try:
        gave_up = await asyncio.gather(*(store.get_ranges(f"gw:order:{i}", [(0, -1)], timeout_s=0.05)
                                         for i in range(3)), return_exceptions=True)
        assert all(isinstance(e, StoreError) and e.down is False for e in gave_up)
    finally:
        fresh_redis_server.resume()
    for i in range(1, 4):
        await store.set(f"gw:order:{i}", str(i).encode(), ttl_s=60)
    got = await asyncio.gather(*(store.get_ranges(f"gw:order:{i}", [(0, -1)]) for i in range(4)))
    assert got == [[b"zero"], [b"1"], [b"2"], [b"3"]]
    await store.close()


def _certificates(directory) -> tuple[str, str, str]:
    """A CA and a server certificate for 127.0.0.1 it signed (openssl): (ca, cert, key) paths."""
    ca, cert, key = (str(directory / name) for name in ("ca.crt", "server.crt", "server.key"))
    run = partial(subprocess.run, check=True, capture_output=True, cwd=directory)
    run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", ca, "-days", "2",
         "-subj", "/CN=gateway-test-ca"])
    run(["openssl", "req", "-newkey", "rsa:2048", "-nodes", "-keyout", key, "-out", "server.csr",
         "-subj", "/CN=127.0.0.1"])
    (directory / "ext.cnf").write_text("subjectAltName=IP:127.0.0.1\n")
    run(["openssl", "x509", "-req", "-in", "server.csr", "-CA", ca, "-CAkey", "ca.key", "-CAcreateserial",
         "-out", cert, "-days", "2", "-extfile", "ext.cnf"])
    return ca, cert, key


async def test_tls_in_the_url(tmp_path):
    """rediss://: redis-py's commands, and the scripts and range reads on the store's own
    connection, all over TLS, the server checked against the URL's CA; a server the client
    cannot verify is a store that is down."""
    ca, cert, key = _certificates(tmp_path)
    tls_port = free_port()
    server = RedisServer(tmp_path, extra=("--tls-port", str(tls_port), "--tls-cert-file", cert, "--tls-key-file", key,
                                          "--tls-ca-cert-file", ca, "--tls-auth-clients", "no"))
    server.start()
    try:
        s = await connect(f"rediss://127.0.0.1:{tls_port}/0?ssl_ca_certs={ca}&ssl_cert_reqs=required")
        await s.set("gw:tls", b"over tls", ttl_s=60)
        assert await s.get_ranges("gw:tls", [(0, 3), (5, -1)]) == [b"over", b"tls"]
        assert (await s.run_script("cache_read", ["gw:tls"], [0, -1, b""]))[0] == b"over tls"
        untrusted = await connect(f"rediss://127.0.0.1:{tls_port}/0?ssl_cert_reqs=required")  # no CA: not verified
        with pytest.raises(StoreError) as refused:
            await untrusted.run_script("cache_read", ["gw:tls"], [0, -1, b""])
        assert refused.value.down is True
        await s.close()
        await untrusted.close()
    finally:
        server.kill()
