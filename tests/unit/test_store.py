"""The store boundary: URL parsing, error translation, bounded waits, and the embedded backend."""
from __future__ import annotations

import asyncio
import hashlib

import hiredis
import pytest
from redis.exceptions import (ClusterDownError, ConnectionError, MaxConnectionsError, NoScriptError,
                              RedisClusterException, ResponseError, TimeoutError)

from gateway.store import RedisStore, StoreError, connect, script
from gateway.store.url import _cluster_nodes


@pytest.fixture
async def memory():
    s = await connect("memory://")
    yield s
    await s.close()


async def test_memory_is_its_own_kind_and_healthy(memory):
    # get/set/delete are checked on every backend in tests/integration/test_store.py
    await memory.ping()
    assert memory.healthy and memory.kind == "memory"


async def test_memory_get_ranges_reads_several_ranges_of_one_key(memory):
    await memory.set("k", b"0123456789", ttl_s=60)
    assert await memory.get_ranges("k", [(2, 4), (0, 1), (8, 20)]) == [b"234", b"01", b"89"]
    assert await memory.get_ranges("absent", [(0, 3), (5, 9)]) == [b"", b""]


async def test_memory_stores_are_separate():
    a, b = await connect("memory://"), await connect("memory://")
    await a.set("k", b"1", ttl_s=60)
    assert await b.get("k") is None


async def test_script_is_loaded_again_after_the_cache_is_flushed(memory):
    assert await memory.run_script("usage", ["gw:{team:a}:x"], []) == [[]]
    await memory.client.script_flush()
    assert await memory.run_script("usage", ["gw:{team:a}:x"], []) == [[]]


class FailingClient:
    def __init__(self, exc):
        self.exc, self.calls = exc, 0

    async def evalsha(self, *args):
        self.calls += 1
        if self.exc is not None:
            raise self.exc
        return "ok"

    async def get(self, key):
        return await self.evalsha()


@pytest.mark.parametrize("exc", [
    ConnectionError("refused"), TimeoutError("read timed out"), RedisClusterException("no slots"),
    ClusterDownError("CLUSTERDOWN"), OSError("reset"), AttributeError("'NoneType' has no 'writelines'"),
])
async def test_a_store_really_down_is_one_store_error_that_says_down(exc):
    """Refused, reset, a connection silent for ``socket_timeout`` (redis-py's TimeoutError), a
    cluster without its slots: the store is down, the case for ``on_error``."""
    ops = []
    client = FailingClient(exc)
    s = RedisStore(client, kind="redis", on_error=ops.append)
    with pytest.raises(StoreError) as e:
        await s.run_script("admit", ["k"], [])
    assert e.value.op == "admit" and e.value.down is True and ops == ["admit"]
    assert s.healthy is False and type(exc).__name__ in s.last_error
    client.exc = None
    assert await s.run_script("admit", ["k"], []) == "ok"  # the probe succeeds: healthy again
    assert s.healthy is True


@pytest.mark.parametrize("exc", [ResponseError("ERR boom"), MaxConnectionsError("Too many connections")])
async def test_an_error_from_a_store_that_is_up_is_not_an_outage(exc):
    ops = []
    s = RedisStore(FailingClient(exc), kind="redis", on_error=ops.append)
    with pytest.raises(StoreError) as e:
        await s.run_script("admit", ["k"], [])
    assert e.value.down is False and type(exc).__name__ in str(e.value) and ops == ["admit"]
    assert s.healthy is True and s.last_error is None


class FailingPipelineClient:
    def pipeline(self, transaction=True):
        assert transaction is False
        client = self

        class Pipe:
            def getrange(self, *args):
                pass

            async def execute(self):
                raise client.exc

        return Pipe()

    exc: Exception = ConnectionError("refused")


async def test_a_failed_get_ranges_is_one_store_error():
    ops = []
    s = RedisStore(FailingPipelineClient(), kind="redis", on_error=ops.append)
    with pytest.raises(StoreError) as e:
        await s.get_ranges("k", [(0, 9), (0, 3)])
    assert e.value.op == "get_range" and ops == ["get_range"] and s.healthy is False


class HungClient:
    """Never answers; ``called`` is set once a command reached it."""

    def __init__(self):
        self.called = asyncio.Event()

    async def evalsha(self, *args):
        self.called.set()
        await asyncio.sleep(3600)

    async def get(self, key):
        self.called.set()
        await asyncio.sleep(3600)


async def test_a_slow_store_costs_a_caller_its_own_patience_and_is_not_down():
    ops = []
    s = RedisStore(HungClient(), kind="redis", timeout_s=3600, on_error=ops.append)
    with pytest.raises(StoreError) as e:  # the caller's patience, not the store's default
        await asyncio.wait_for(s.run_script("admit", ["k"], [], timeout_s=0.1), 5)
    assert e.value.down is False and "slow" in str(e.value) and ops == ["admit"]
    assert s.healthy is True and s.last_error is None
    with pytest.raises(StoreError) as e:  # the store's default patience otherwise
        await asyncio.wait_for(RedisStore(HungClient(), kind="redis", timeout_s=0.1).get("k"), 5)
    assert e.value.down is False


async def test_a_slow_store_answers_a_patient_caller():
    s = RedisStore(SlowClient(), kind="redis", timeout_s=0.01)
    assert await s.get("k", timeout_s=5) == b"v"  # 0.3 s, well past the store's default
    assert s.healthy is True


async def test_while_down_one_operation_probes_and_the_others_fail_at_once():
    ops = []
    client = HungClient()
    s = RedisStore(client, kind="redis", timeout_s=0.5, on_error=ops.append)
    s.healthy = False
    probe = asyncio.create_task(s.get("k"))
    await client.called.wait()  # the probe is out
    for _ in range(5):  # answered at once, without waiting on the hung store
        with pytest.raises(StoreError) as e:
            await asyncio.wait_for(s.get("k"), 0.1)
        assert e.value.down is True  # known down
    with pytest.raises(StoreError):
        await probe
    assert ops == ["get"] * 6


async def test_redis_url_carries_password_db_and_timeouts():
    s = await connect("redis://:s%40cret@127.0.0.1:6390/3?timeout=0.3&socket_timeout=0.2&max_connections=8")
    kw = s.client.connection_pool.connection_kwargs
    assert (kw["password"], kw["db"], kw["socket_timeout"], kw["socket_connect_timeout"]) == ("s@cret", 3, 0.2, 0.2)
    assert s.timeout_s == 0.3 and s.kind == "redis"
    await s.close()


async def test_defaults_wait_for_a_slow_store_and_never_retry():
    s = await connect("redis://127.0.0.1:6390/0")
    kw = s.client.connection_pool.connection_kwargs
    assert s.timeout_s == 30.0 and kw["socket_timeout"] == 5.0 and kw["socket_connect_timeout"] == 2.0
    assert kw["retry"].get_retries() == 0
    await s.close()


async def test_memory_serves_2000_concurrent_scripts():
    """A burst of scripts at once: each answered, none refused for want of a connection."""
    s = await connect("memory://")
    keys = [[f"gw:{{team:t{i}}}:day"] for i in range(2000)]
    got = await asyncio.gather(*(s.run_script("usage", k, []) for k in keys), return_exceptions=True)
    assert got == [[[]]] * 2000 and s.healthy
    await s.close()


def test_cluster_url_lists_nodes_and_credentials():
    nodes, user, password = _cluster_nodes("app:pw@10.0.0.1:7000,10.0.0.2:7001")
    assert [(n.host, n.port) for n in nodes] == [("10.0.0.1", 7000), ("10.0.0.2", 7001)]
    assert (user, password) == ("app", "pw")


@pytest.mark.parametrize("url", ["mysql://x", "redis://h:1/0?timeout=soon", "redis+cluster://nohostport"])
async def test_bad_urls_are_refused(url):
    with pytest.raises(ValueError):
        await connect(url)


class SlowClient:
    async def get(self, key):
        await asyncio.sleep(0.3)
        return b"v"


class GatedClient:
    """Each get holds its connection until ``gate`` is set; ``called`` once one reached it."""

    def __init__(self):
        self.gate, self.called = asyncio.Event(), asyncio.Event()

    async def get(self, key):
        self.called.set()
        await self.gate.wait()
        return b"v"


async def test_waiting_for_a_free_connection_is_not_an_outage():
    client = GatedClient()
    s = RedisStore(client, kind="redis", timeout_s=5, max_inflight=1)
    holder = asyncio.create_task(s.get("k"))
    await client.called.wait()  # it holds the one connection
    waiting = asyncio.create_task(s.get("k"))
    with pytest.raises(StoreError) as e:  # its patience ran out while waiting for the connection
        await s.get("k", timeout_s=0.1)
    assert "busy" in str(e.value) and e.value.down is False
    client.gate.set()
    assert [await holder, await waiting] == [b"v", b"v"]  # the second waited for the connection: fine
    assert s.healthy is True and s.last_error is None


# --- auto-pipelining (one Redis node): a fake node that sees each write as one pipeline ----------


class FakeNode:
    """Answers like one Redis node: EVALSHA of an unknown script is NOSCRIPT, EVAL loads it, a
    script touching a key in ``broken`` fails (as a script error on a wrong-type key would);
    every write is recorded as one pipeline (the command names in it)."""

    def __init__(self):
        self.scripts: set[str] = set()
        self.pipelines: list[list[str]] = []
        self.broken: set[str] = set()
        self.send_error: Exception | None = None
        self.read_delay_s = 0.0
        self.sent = asyncio.Event()  # set once a pipeline was written
        self.closed = False  # the store closed its connection
        self.answering = asyncio.Event()  # cleared: every answer waits until it is set again
        self.answering.set()

    def answer(self, cmd: tuple[str, ...]):
        name, body, nkeys = cmd[0], cmd[1], int(cmd[2])
        keys, args = cmd[3:3 + nkeys], cmd[3 + nkeys:]
        if name == "EVAL":
            self.scripts.add(hashlib.sha1(body.encode()).hexdigest())
        elif body not in self.scripts:
            return NoScriptError("No matching script. Please use EVAL.")
        if self.broken.intersection(keys):
            return ResponseError("WRONGTYPE Operation against a key holding the wrong kind of value")
        return [*keys, *args]


class FakePipe:
    """The store's script connection (gateway/store/pipe.py) to the fake node: each exchange is
    one pipeline; replies as the real pipe gives them (a script's error as a value)."""

    def __init__(self, node: FakeNode):
        self.node = node

    def close(self):
        self.node.closed = True

    async def exchange(self, packed):
        if self.node.send_error is not None:
            raise self.node.send_error
        reader = hiredis.Reader()
        for chunk in packed:
            reader.feed(chunk)
        cmds = []
        while (cmd := reader.gets()) is not False:
            cmds.append(tuple(x.decode() for x in cmd))
        self.node.pipelines.append([c[0] for c in cmds])
        self.node.sent.set()
        await asyncio.sleep(self.node.read_delay_s)
        await self.node.answering.wait()
        return [self.node.answer(c) for c in cmds]


class FakeRedis:
    """redis-py's client, for what a pipelined store still asks of it (closing idle connections)."""

    class connection_pool:
        @staticmethod
        async def disconnect(inuse_connections=True):
            pass


def pipelined(**kw) -> tuple[RedisStore, FakeNode, list[str]]:
    """A pipelined store on a fake node that already knows our scripts."""
    ops: list[str] = []
    node = FakeNode()
    node.scripts.update(script(name)[1] for name in ("admit", "settle", "usage"))
    return RedisStore(FakeRedis(), kind="redis", pipelined=True, pipe=FakePipe(node), on_error=ops.append, **kw), node, ops


async def test_scripts_in_one_tick_share_one_pipeline_each_caller_its_own_answer():
    s, node, _ = pipelined()
    calls = [s.run_script("admit", [f"gw:{{team:{i}}}:rpm"], [i, b"x"]) for i in range(5)]
    assert await asyncio.gather(*calls) == [[f"gw:{{team:{i}}}:rpm", str(i), "x"] for i in range(5)]
    assert node.pipelines == [["EVALSHA"] * 5]
    assert await s.run_script("admit", ["k"], []) == ["k"]  # a later tick: its own pipeline
    assert len(node.pipelines) == 2


async def test_noscript_reloads_just_the_scripts_the_node_lacks():
    s, node, ops = pipelined()
    node.scripts = {script("settle")[1]}  # the node restarted: it lost admit
    got = await asyncio.gather(s.run_script("admit", ["a"], [1]), s.run_script("settle", ["b"], [2]),
                               s.run_script("admit", ["c"], [3]))
    assert got == [["a", "1"], ["b", "2"], ["c", "3"]]
    assert node.pipelines == [["EVALSHA"] * 3, ["EVAL", "EVAL"]]
    await asyncio.gather(s.run_script("admit", ["a"], []), s.run_script("settle", ["b"], []))
    assert node.pipelines[-1] == ["EVALSHA", "EVALSHA"] and ops == [] and s.healthy


async def test_a_script_error_fails_its_own_caller_only():
    s, node, ops = pipelined()
    node.broken.add("bad")
    got = await asyncio.gather(s.run_script("usage", ["ok1"], []), s.run_script("usage", ["bad"], []),
                               s.run_script("settle", ["ok2"], []), return_exceptions=True)
    assert got[0] == ["ok1"] and got[2] == ["ok2"]
    assert isinstance(got[1], StoreError) and got[1].op == "usage" and "WRONGTYPE" in str(got[1])
    assert ops == ["usage"]  # counted once, for the caller that failed


async def test_an_argument_that_cannot_be_sent_fails_its_own_caller_only():
    s, node, ops = pipelined()
    got = await asyncio.gather(s.run_script("usage", ["a"], [bytearray(b"fine")]),
                               s.run_script("usage", ["b"], [object()]), return_exceptions=True)
    assert got[0] == ["a", "fine"]
    assert isinstance(got[1], StoreError) and "DataError" in str(got[1]) and ops == ["usage"]
    assert node.pipelines[0] == ["EVALSHA"]  # the bad one never left


async def test_a_failed_pipeline_fails_each_caller_once_then_recovers():
    s, node, ops = pipelined()
    node.send_error = ConnectionError("Connection reset by peer")
    got = await asyncio.gather(*(s.run_script("admit", [f"k{i}"], []) for i in range(3)), return_exceptions=True)
    assert all(isinstance(e, StoreError) and "ConnectionError" in str(e) for e in got)
    assert ops == ["admit"] * 3 and s.healthy is False and "ConnectionError" in s.last_error
    node.send_error = None
    assert await s.run_script("admit", ["k"], []) == ["k"]  # the probe gets through: healthy again
    assert s.healthy is True


async def test_a_hung_pipeline_costs_its_callers_their_patience_and_is_not_down():
    s, node, ops = pipelined(timeout_s=0.2)
    node.read_delay_s = 3600
    got = await asyncio.wait_for(asyncio.gather(*(s.run_script("admit", [f"k{i}"], []) for i in range(4)),
                                                return_exceptions=True), 5)
    assert all(isinstance(e, StoreError) and e.down is False for e in got) and ops == ["admit"] * 4
    assert s.healthy is True


async def test_a_caller_giving_up_leaves_the_pipeline_to_the_others():
    s, node, ops = pipelined()
    node.read_delay_s = 0.2
    got = await asyncio.gather(s.run_script("admit", ["hasty"], [], timeout_s=0.05),
                               s.run_script("admit", ["patient"], [], timeout_s=5), return_exceptions=True)
    assert isinstance(got[0], StoreError) and got[0].down is False and got[1] == ["patient"]
    assert node.pipelines == [["EVALSHA", "EVALSHA"]] and ops == ["admit"] and s.healthy


async def test_pipelined_while_down_one_batch_probes_and_the_others_fail_at_once():
    s, node, ops = pipelined(timeout_s=0.5)
    node.read_delay_s = 3600
    s.healthy, s.last_error = False, "ConnectionError"
    probe = asyncio.gather(s.run_script("admit", ["a"], []), s.run_script("admit", ["b"], []),
                           return_exceptions=True)
    await node.sent.wait()  # the probe is out
    for _ in range(5):  # answered at once, without waiting on the hung node
        with pytest.raises(StoreError) as e:
            await asyncio.wait_for(s.run_script("settle", ["c"], []), 0.1)
        assert e.value.down is True
    assert all(isinstance(e, StoreError) for e in await probe)
    assert node.pipelines == [["EVALSHA", "EVALSHA"]]  # only the probe went out
    assert sorted(ops) == ["admit", "admit"] + ["settle"] * 5


async def test_a_caller_gone_before_the_pipeline_leaves_is_not_sent():
    s, node, _ = pipelined()
    gone = asyncio.create_task(s.run_script("admit", ["gone"], []))
    stays = asyncio.create_task(s.run_script("admit", ["stays"], []))
    await asyncio.sleep(0)  # both queued, the pipeline not yet written
    gone.cancel()
    assert await stays == ["stays"]
    assert node.pipelines == [["EVALSHA"]]
    with pytest.raises(asyncio.CancelledError):
        await gone


async def test_pipelined_waiting_for_a_free_connection_is_not_an_outage():
    s, node, _ = pipelined(timeout_s=5, max_inflight=1)
    node.answering.clear()
    first = asyncio.create_task(s.run_script("usage", ["a"], []))
    await node.sent.wait()  # it holds the one connection
    second = asyncio.create_task(s.run_script("usage", ["b"], []))
    with pytest.raises(StoreError) as e:  # its patience ran out while waiting for the connection
        await s.run_script("usage", ["c"], [], timeout_s=0.1)
    assert "busy" in str(e.value) and e.value.down is False
    node.answering.set()
    assert [await first, await second] == [["a"], ["b"]]  # the second waited for the connection: fine
    assert s.healthy is True and s.last_error is None


async def test_close_lets_the_pipelines_in_flight_answer():
    s, node, _ = pipelined()
    node.read_delay_s = 0.05
    s.client.aclose = lambda: asyncio.sleep(0)
    pending = asyncio.ensure_future(s.run_script("usage", ["a"], []))
    await node.sent.wait()  # in flight: written, not yet answered
    await s.close()
    assert pending.done() and pending.result() == ["a"]
    assert node.closed  # and then its connection


async def test_only_a_single_redis_node_is_pipelined():
    memory, redis_ = await connect("memory://"), await connect("redis://127.0.0.1:6390/0")
    cluster = await connect("redis+cluster://127.0.0.1:7000")
    assert (redis_.pipelined, cluster.pipelined) == (True, False)
    assert not isinstance(memory, RedisStore)  # the embedded store: no client, nothing to pipeline
    for s in (memory, redis_, cluster):
        await s.close()


async def test_giving_up_on_a_store_known_to_be_down_says_down():
    s = RedisStore(HungClient(), kind="redis")
    s.healthy, s.last_error = False, "ConnectionError: refused"
    with pytest.raises(StoreError) as e:  # this call is the probe; it gets no verdict in time
        await s.get("k", timeout_s=0.05)
    assert e.value.down is True and "refused" in str(e.value)
