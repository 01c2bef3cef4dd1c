"""The store on every backend (memory, redis-server, 3-node Cluster), and Redis URLs for real."""
from __future__ import annotations

import asyncio

import pytest

from gateway.limits import ledger
from gateway.limits.limiter import limit_keys
from gateway.store import StoreError, connect
from tests.fixtures.redis import RedisServer


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
