"""RedisStore against a real redis-server: keys, values and TTLs read back with redis-py."""

import dataclasses
import json

import pytest
import pytest_twisted
from twisted.internet import defer, reactor, task, threads
from zope.interface.verify import verifyObject

from chatgateway import config as configuration
from chatgateway.redisconn.connection import ConnectionError, TimeoutError
from chatgateway.redisconn.tls import TLSSettings
from chatgateway.redisconn.uri import ClusterAddress, RedisAddress, parse_uri
from chatgateway.store import ConnectionMeta, IConnectionStore, device_entry
from chatgateway.store.memory import MemoryStore
from chatgateway.store.redis import RedisStore
from support.processes import free_port
from support.redis import RedisServer, eventually

TTL = 600  # 2 × CONNECTION_TIMEOUT_SEC (300)


def make_config(uri, gateway_id="gw-a", **env):
    environ = {
        "CACHE_URI": uri,
        "JWT_SECRET": "test-secret-0123456789abcdef0123456789",
        "GATEWAY_ID": gateway_id,
        "CONNECTION_TIMEOUT_SEC": "300",
        "HEARTBEAT_INTERVAL_SEC": "30",
        **env,
    }
    return configuration.load(environ=environ)


def meta(profile="alice", device="phone", rooms=("r1", "r2"), gateway="gw-a", at=1000, heartbeat=None):
    return ConnectionMeta(
        profile_id=profile,
        device_id=device,
        room_ids=list(rooms),
        last_active=at,
        last_heartbeat=heartbeat if heartbeat is not None else at,
        connected=at,
        gateway_id=gateway,
    )


@pytest_twisted.async_yield_fixture
async def stores(redis_server):
    """make(gateway_id, **kwargs) -> a started RedisStore, ready; all stopped at teardown."""
    made = []

    async def make(gateway_id="gw-a", uri=None, wait=True, **kwargs):
        store = RedisStore(make_config(uri or redis_server.uri, gateway_id), reactor, **kwargs)
        made.append(store)
        await store.start()
        if wait:
            await eventually(lambda: store.ready, what="store ready")
        return store

    yield make
    for store in made:
        await store.stop()


def dump(client):
    """Every gateway:* key as plain Python values (sorted sets as lists, lowest score first)."""
    state = {}
    for key in client.keys("gateway:*"):
        kind = client.type(key)
        if kind == "string":
            state[key] = client.get(key)
        elif kind == "set":
            state[key] = client.smembers(key)
        elif kind == "zset":
            state[key] = client.zrange(key, 0, -1)
        else:
            raise AssertionError(f"unexpected {kind} at {key}")
    return state


def write_calls(client):
    """Calls per command so far, leaving out what tests and health checks send."""
    stats = client.info("commandstats")
    return {
        name[len("cmdstat_") :]: value["calls"]
        for name, value in stats.items()
        if name not in ("cmdstat_info", "cmdstat_ping", "cmdstat_keys", "cmdstat_type")
    }


def delta(before, after):
    return {k: after[k] - before.get(k, 0) for k in after if after[k] != before.get(k, 0)}


# ---------------------------------------------------------------- interface


@pytest_twisted.ensureDeferred
async def test_both_stores_provide_the_interface(stores):
    verifyObject(IConnectionStore, await stores())
    verifyObject(IConnectionStore, MemoryStore())


@pytest.mark.parametrize(
    "uri, address",
    [
        ("redis://localhost:6379", RedisAddress(host="localhost", port=6379, db=0)),
        ("redis://127.0.0.1", RedisAddress(host="127.0.0.1", port=6379, db=0)),
        ("redis://:s%40cret@redis:6380/3", RedisAddress(host="redis", port=6380, db=3, password="s@cret")),
        ("redis://gw:pw@redis/1", RedisAddress(host="redis", port=6379, db=1, username="gw", password="pw")),
        ("unix:///run/redis.sock?db=2", RedisAddress(path="/run/redis.sock", db=2)),
        ("unix:///run/redis.sock?password=pw", RedisAddress(path="/run/redis.sock", db=0, password="pw")),
        ("rediss://:pw@redis:6380/1", RedisAddress(host="redis", port=6380, db=1, password="pw", tls=TLSSettings())),
    ],
)
def test_parse_uri(uri, address):
    assert parse_uri(uri) == address
    assert "pw" not in str(parse_uri(uri)) and "cret" not in str(parse_uri(uri))


def test_parse_cluster_uri():
    address = parse_uri("rediss+cluster://gw:pw@10.0.0.1:7000,10.0.0.2:7001", TLSSettings(ca_file="/ca.pem"))
    tls = TLSSettings(ca_file="/ca.pem")
    assert address == ClusterAddress(
        (
            RedisAddress(host="10.0.0.1", port=7000, username="gw", password="pw", tls=tls),
            RedisAddress(host="10.0.0.2", port=7001, username="gw", password="pw", tls=tls),
        )
    )
    assert str(address) == "rediss+cluster://10.0.0.1:7000,10.0.0.2:7001"


@pytest.mark.parametrize(
    "uri, problem",
    [
        ("redis+cluster://a:7000,b/0", "must be host:port"),
        ("redis+cluster://a:7000/2", "only database 0"),
        ("redis://redis:6379/x", "invalid literal"),
        ("redis://redis:99999/0", "out of range"),
        ("unix://", "socket path"),
        ("memcached://x", "not a Redis URI"),
    ],
)
def test_parse_uri_refuses_clearly(uri, problem):
    with pytest.raises(ValueError, match=problem):
        parse_uri(uri)


@pytest_twisted.ensureDeferred
async def test_unix_socket_uri_and_database_number(redis_server, stores):
    store = await stores(uri=redis_server.unix_uri(db=3))
    await store.connected(meta())
    assert redis_server.client(db=3).exists("gateway:conn:alice:phone")
    assert not redis_server.client(db=0).exists("gateway:conn:alice:phone")


# ---------------------------------------------------------------- connection keys


@pytest_twisted.ensureDeferred
async def test_connected_writes_the_spec_keys_with_their_ttls(redis_server, stores):
    store = await stores()
    await store.connected(meta(rooms=["r1", "r2"]))
    r = redis_server.client()
    assert json.loads(r.get("gateway:conn:alice:phone")) == {
        "profile_id": "alice",
        "device_id": "phone",
        "room_ids": ["r1", "r2"],
        "last_active": 1000,
        "last_heartbeat": 1000,
        "connected": 1000,
        "gateway_id": "gw-a",
    }
    assert TTL - 5 < r.ttl("gateway:conn:alice:phone") <= TTL
    for room in ("r1", "r2"):
        assert r.type(f"gateway:room:{room}") == "set"
        assert r.smembers(f"gateway:room:{room}") == {"alice:phone"}
        assert TTL - 5 < r.ttl(f"gateway:room:{room}") <= TTL
    assert r.smembers("gateway:instance:gw-a:conns") == {"alice:phone"}
    assert r.smembers("gateway:instance:gw-a:rooms") == {"r1", "r2"}
    assert r.ttl("gateway:instance:gw-a:conns") > TTL and r.ttl("gateway:instance:gw-a:rooms") > TTL


@pytest_twisted.ensureDeferred
async def test_open_connection_is_connected_and_claim_device_in_one_command(redis_server, stores):
    separate, combined = await stores(), await stores()
    r = redis_server.client()
    await combined.open_connection(meta(profile="warm-up"), "s0", 1)  # Redis caches the script
    r.flushdb()
    await separate.connected(meta(rooms=["r1", "r2"]))
    await separate.claim_device("alice", "phone", "gw-a", "s1", 1)
    expected = dump(r)
    r.flushdb()
    before = write_calls(r)
    assert await combined.open_connection(meta(rooms=["r1", "r2"]), "s1", 1) == []
    calls = delta(before, write_calls(r))
    assert calls["evalsha"] == 1 and "eval" not in calls  # one script; what it runs inside is counted too
    assert dump(r) == expected
    # the metadata JSON: the fields in their declared order, as dataclasses.asdict gives them
    assert r.get("gateway:conn:alice:phone") == json.dumps(
        dataclasses.asdict(meta(rooms=["r1", "r2"])), separators=(",", ":")
    )
    for key in ("gateway:conn:alice:phone", "gateway:room:r1", "gateway:room:r2", "gateway:device:alice:phone"):
        assert TTL - 5 < r.ttl(key) <= TTL
    assert r.ttl("gateway:instance:gw-a:conns") > TTL and r.ttl("gateway:instance:gw-a:rooms") > TTL
    # a newer session of the device evicts the older one, as claim_device does
    assert await combined.open_connection(meta(rooms=[], at=2000), "s2", 1) == [("gw-a", "s1")]
    assert r.zrange("gateway:device:alice:phone", 0, -1) == [device_entry("gw-a", "s2")]
    assert json.loads(r.get("gateway:conn:alice:phone"))["room_ids"] == []


@pytest_twisted.ensureDeferred
async def test_rooms_changed_adds_and_removes_room_entries(redis_server, stores):
    store = await stores()
    await store.connected(meta(rooms=["r1", "r2"]))
    await store.connected(meta(profile="bob", rooms=["r1"]))
    await store.rooms_changed(meta(rooms=["r2", "r3"]), added=["r3"], removed=["r1"])
    r = redis_server.client()
    assert json.loads(r.get("gateway:conn:alice:phone"))["room_ids"] == ["r2", "r3"]
    assert r.smembers("gateway:room:r1") == {"bob:phone"}
    assert r.smembers("gateway:room:r3") == {"alice:phone"}
    assert TTL - 5 < r.ttl("gateway:room:r3") <= TTL
    await store.rooms_changed(meta(profile="bob", rooms=[]), added=[], removed=["r1"])
    assert not r.exists("gateway:room:r1")  # an empty set is no key


@pytest_twisted.ensureDeferred
async def test_refresh_rewrites_metadata_and_renews_room_ttls_every_few_refreshes(redis_server, stores):
    store = await stores()
    assert store.renew_every == 6  # floor(600 / (3 × 30))
    m = meta(rooms=["r1"])
    await store.connected(m)
    await store.claim_device("alice", "phone", "gw-a", "s1", 1)
    r = redis_server.client()
    keys = ("gateway:conn:alice:phone", "gateway:room:r1", "gateway:device:alice:phone")
    for refresh in range(2 * store.renew_every + 1):
        for key in keys:
            r.expire(key, 50)
        await store.refresh([meta(rooms=["r1"], heartbeat=1000 + 30 * refresh)])
        rewritten = refresh % 2 == 0  # conn keys on every other refresh
        last = refresh if rewritten else refresh - 1
        assert json.loads(r.get(keys[0]))["last_heartbeat"] == 1000 + 30 * last
        assert (r.ttl(keys[0]) > 50) == rewritten, refresh
        renewed = refresh % store.renew_every == 0
        assert (r.ttl(keys[1]) > 50) == renewed, refresh
        assert (r.ttl(keys[2]) > 50) == renewed, refresh


@pytest_twisted.ensureDeferred
async def test_refresh_costs_less_than_one_write_per_connection_in_steady_state(redis_server, stores):
    store = await stores()
    r = redis_server.client()
    rooms = [f"r{i}" for i in range(5)]
    metas = [meta(profile=f"p{i}", rooms=[rooms[i % 5], rooms[(i + 1) % 5]]) for i in range(50)]
    for m in metas:
        await store.connected(m)
        await store.claim_device(m.profile_id, m.device_id, "gw-a", "s", 1)
    await store.refresh(metas)  # a renewal refresh
    per_refresh = []
    for _ in range(store.renew_every):
        before = write_calls(r)
        await store.refresh(metas)
        per_refresh.append(delta(before, write_calls(r)))
    # refresh 0 renewed and rewrote; now odd refreshes write nothing, even ones rewrite,
    # and refresh 6 (the renew_every-th) renews the device and room TTLs too
    # (Redis counts the commands a script runs; the scripts themselves are left out here.)
    scripts = [{k: d.pop(k) for k in ("eval", "evalsha") if k in d} for d in per_refresh]
    steady, renewal = per_refresh[:-1], per_refresh[-1]
    assert steady == [{}, {"set": 50}, {}, {"set": 50}, {}]
    assert renewal == {"set": 50, "expire": 50 + 5}  # 50 device keys, 5 rooms once each
    assert [sum(s.values()) for s in scripts] == [0, 1, 0, 1, 0, 2]  # one script per kind of write
    average = sum(sum(d.values()) for d in per_refresh) / (len(metas) * store.renew_every)
    assert average == (3 * 50 + 55) / (50 * 6)  # about 0.68
    assert average <= 1


@pytest_twisted.ensureDeferred
async def test_disconnected_removes_the_connection(redis_server, stores):
    store = await stores()
    await store.connected(meta(rooms=["r1", "r2"]))
    await store.connected(meta(profile="bob", rooms=["r2"]))
    await store.disconnected(meta(rooms=["r1", "r2"]))
    r = redis_server.client()
    assert not r.exists("gateway:conn:alice:phone")
    assert not r.exists("gateway:room:r1")
    assert r.smembers("gateway:room:r2") == {"bob:phone"}
    assert r.smembers("gateway:instance:gw-a:conns") == {"bob:phone"}


@pytest_twisted.ensureDeferred
async def test_disconnected_leaves_a_device_another_gateway_holds_now(redis_server, stores):
    a, b = await stores("gw-a"), await stores("gw-b")
    await a.connected(meta(rooms=["r1", "r2"], gateway="gw-a"))
    newer = meta(rooms=["r2", "r3"], gateway="gw-b", at=2000)
    await b.connected(newer)
    await a.disconnected(meta(rooms=["r1", "r2"], gateway="gw-a"))
    r = redis_server.client()
    assert r.get("gateway:conn:alice:phone") == newer.to_json()
    assert not r.exists("gateway:room:r1")  # only gw-a's connection listed r1
    assert r.smembers("gateway:room:r2") == r.smembers("gateway:room:r3") == {"alice:phone"}
    assert not r.exists("gateway:instance:gw-a:conns")
    assert r.smembers("gateway:instance:gw-b:conns") == {"alice:phone"}


# ---------------------------------------------------------------- devices


@pytest_twisted.ensureDeferred
async def test_racing_claims_from_two_gateways_leave_exactly_the_limit(redis_server, stores):
    a, b = await stores("gw-a"), await stores("gw-b")
    claims = [((a, "gw-a") if i % 2 == 0 else (b, "gw-b")) + (f"s{i}",) for i in range(20)]
    results = await defer.gatherResults(
        [store.claim_device("alice", "phone", gateway, session, 1) for store, gateway, session in claims]
    )
    r = redis_server.client()
    (survivor,) = r.zrange("gateway:device:alice:phone", 0, -1)
    evicted = [pair for result in results for pair in result]
    everyone = {(gateway, session) for _, gateway, session in claims}
    assert len(evicted) == 19 and len(set(evicted)) == 19  # each evicted exactly once
    assert set(evicted) | {tuple(json.loads(survivor))} == everyone
    assert TTL - 5 < r.ttl("gateway:device:alice:phone") <= TTL


@pytest_twisted.ensureDeferred
async def test_claim_keeps_the_newest_and_release_removes(redis_server, stores):
    store = await stores()
    assert await store.claim_device("alice", "phone", "gw-a", "s1", 2) == []
    assert await store.claim_device("alice", "phone", "gw-b", "s2", 2) == []
    assert await store.claim_device("alice", "phone", "gw-a", "s3", 2) == [("gw-a", "s1")]
    assert await store.claim_device("alice", "phone", "gw-a", "s3", 2) == []  # a retry changes nothing
    r = redis_server.client()
    key = "gateway:device:alice:phone"
    assert r.zrange(key, 0, -1) == [device_entry("gw-b", "s2"), device_entry("gw-a", "s3")]
    await store.release_device("alice", "phone", "gw-b", "s2")
    assert r.zrange(key, 0, -1) == [device_entry("gw-a", "s3")]
    await store.release_device("alice", "phone", "gw-a", "s3")
    assert not r.exists(key)


# ---------------------------------------------------------------- instances


@pytest_twisted.ensureDeferred
async def test_instance_alive_registers_and_stop_unregisters(redis_server, stores):
    store = await stores()
    info = {"started": 1000, "addresses": ["10.0.0.1:80"], "connections": 0}
    await store.instance_alive("gw-a", info)
    r = redis_server.client()
    assert json.loads(r.get("gateway:instance:gw-a")) == {"gateway_id": "gw-a", **info}
    assert 80 < r.ttl("gateway:instance:gw-a") <= 90  # max(10, 3 × 30)
    assert r.smembers("gateway:instances") == {"gw-a"}
    d = store.stop()
    assert isinstance(d, defer.Deferred)
    await d
    assert not store.ready
    assert not r.exists("gateway:instance:gw-a") and not r.exists("gateway:instances")


@pytest_twisted.ensureDeferred
async def test_stop_with_connections_left_leaves_them_to_the_reaper(redis_server, stores):
    store = await stores()
    await store.instance_alive("gw-a", {"started": 1, "addresses": [], "connections": 1})
    await store.connected(meta())
    await store.stop()
    r = redis_server.client()
    assert not r.exists("gateway:instance:gw-a")
    assert r.smembers("gateway:instances") == {"gw-a"}
    other = await stores("gw-b")
    assert await other.reap_dead_instances("gw-b") == ["gw-a"]
    assert not r.exists("gateway:conn:alice:phone") and not r.exists("gateway:instances")


@pytest_twisted.ensureDeferred
async def test_reap_cleans_up_after_a_gateway_whose_registration_expired(redis_server, stores):
    dead = await stores("gw-a", instance_ttl_sec=1)
    b, c = await stores("gw-b"), await stores("gw-c")
    info = {"started": 1, "addresses": [], "connections": 3}
    await dead.instance_alive("gw-a", info)
    held = [
        meta(rooms=["r1", "r2"]),
        meta(profile="bob", device="laptop", rooms=["r2"]),
        meta(profile="carol", device="tab", rooms=["r3"]),
    ]
    for m in held:
        await dead.connected(m)
        await dead.claim_device(m.profile_id, m.device_id, "gw-a", f"sa-{m.profile_id}", 2)
    # carol's device moved to gw-b, which holds it now
    carol = meta(profile="carol", device="tab", rooms=["r3"], gateway="gw-b", at=2000)
    await b.connected(carol)
    await b.claim_device("carol", "tab", "gw-b", "sb", 2)
    await b.instance_alive("gw-b", info)
    await c.instance_alive("gw-c", info)
    assert await b.reap_dead_instances("gw-b") == []  # gw-a still registered

    r = redis_server.client()
    await eventually(lambda: not r.exists("gateway:instance:gw-a"), what="gw-a registration expired")
    results = await defer.gatherResults([b.reap_dead_instances("gw-b"), c.reap_dead_instances("gw-c")])
    assert sorted(gw for result in results for gw in result) == ["gw-a"]  # one of them did it, once

    assert not r.exists("gateway:conn:alice:phone") and not r.exists("gateway:conn:bob:laptop")
    assert not r.exists("gateway:room:r1") and not r.exists("gateway:room:r2")
    assert not r.exists("gateway:device:alice:phone") and not r.exists("gateway:device:bob:laptop")
    assert r.get("gateway:conn:carol:tab") == carol.to_json()
    assert r.smembers("gateway:room:r3") == {"carol:tab"}
    assert r.zrange("gateway:device:carol:tab", 0, -1) == [device_entry("gw-b", "sb")]
    assert not r.exists("gateway:instance:gw-a:conns") and not r.exists("gateway:reap:gw-a")
    assert r.smembers("gateway:instances") == {"gw-b", "gw-c"}
    assert await c.reap_dead_instances("gw-c") == []


@pytest_twisted.ensureDeferred
async def test_reap_removes_room_entries_whose_metadata_expired_first(redis_server, stores):
    dead = await stores("gw-a", instance_ttl_sec=1)
    alive = await stores("gw-b")
    await dead.instance_alive("gw-a", {"started": 1, "addresses": [], "connections": 1})
    await dead.connected(meta(rooms=["busy", "quiet"]))
    await alive.connected(meta(profile="bob", rooms=["busy"], gateway="gw-b"))
    r = redis_server.client()
    r.delete("gateway:conn:alice:phone")  # its TTL ran out before anyone reaped gw-a
    await eventually(lambda: not r.exists("gateway:instance:gw-a"), what="gw-a registration expired")
    assert await alive.reap_dead_instances("gw-b") == ["gw-a"]
    assert r.smembers("gateway:room:busy") == {"bob:phone"}  # kept alive by bob, but alice is gone
    assert not r.exists("gateway:room:quiet")
    assert not r.exists("gateway:instance:gw-a:rooms") and not r.exists("gateway:instance:gw-a:conns")


# ---------------------------------------------------------------- same behaviour as MemoryStore


@pytest_twisted.ensureDeferred
async def test_memory_store_leaves_the_same_keys_and_values(redis_server, stores):
    redis_store, memory = await stores("gw-a"), MemoryStore()
    other = await stores("gw-b")
    info = {"started": 5, "addresses": ["a:1"], "connections": 2}

    async def scenario(store, other_store):
        evicted = []
        await store.instance_alive("gw-a", info)
        await store.connected(meta(rooms=["r1", "r2"]))
        await store.connected(meta(profile="bob", rooms=["r2"]))
        await store.connected(meta(profile="carol", rooms=["r9"]))
        await store.rooms_changed(meta(rooms=["r2", "r3"]), ["r3"], ["r1"])
        await store.refresh([meta(rooms=["r2", "r3"], heartbeat=1030), meta(profile="bob", rooms=["r2"], heartbeat=9)])
        for session in ("s1", "s2", "s3"):
            evicted += await store.claim_device("alice", "phone", "gw-a", session, 2)
        await store.release_device("alice", "phone", "gw-a", "s3")
        evicted += await store.open_connection(meta(profile="dave", rooms=["r2", "r5"]), "s4", 1)
        evicted += await store.open_connection(meta(profile="dave", rooms=["r5"], at=1100), "s5", 1)
        await other_store.connected(meta(profile="bob", rooms=["r2", "r4"], gateway="gw-b"))
        await store.disconnected(meta(profile="bob", rooms=["r2"]))
        await store.disconnected(meta(profile="carol", rooms=["r9"]))
        return evicted

    evicted_redis = await scenario(redis_store, other)
    evicted_memory = await scenario(memory, memory)
    assert evicted_redis == evicted_memory == [("gw-a", "s1"), ("gw-a", "s4")]
    memory_state = {**memory.values, **memory.sets, **memory.devices}
    assert dump(redis_server.client()) == memory_state
    await redis_store.stop()
    await memory.stop()
    assert dump(redis_server.client()) == {**memory.values, **memory.sets, **memory.devices}


# ---------------------------------------------------------------- failures


@pytest_twisted.ensureDeferred
async def test_a_redis_that_stops_answering_fails_calls_within_the_timeout(redis_server, stores):
    store = await stores(timeout=1.0)
    ticks = []
    ticker = task.LoopingCall(lambda: ticks.append(reactor.seconds()))
    ticker.start(0.05)
    try:
        started = reactor.seconds()
        sleep = store.redis.execute("DEBUG", "SLEEP", "5")
        sleep.addErrback(lambda f: f.trap(TimeoutError, ConnectionError))
        # Sent after DEBUG SLEEP on the same connection: Redis answers it only after the sleep.
        with pytest.raises(TimeoutError):
            await store.connected(meta())
        failed_after = reactor.seconds() - started
        assert failed_after < 5, "the call waited for Redis instead of timing out"
        assert len(ticks) >= 5  # the reactor kept running while we waited
        assert not store.ready
        with pytest.raises(ConnectionError):
            await store.connected(meta())  # refused at once while the connection is re-established
        await eventually(lambda: store.ready, timeout=20, what="store back after DEBUG SLEEP")
        await store.connected(meta())
        assert redis_server.client().exists("gateway:conn:alice:phone")
    finally:
        ticker.stop()


@pytest_twisted.ensureDeferred
async def test_redis_unreachable_at_start_then_started(stores):
    server = RedisServer(port=free_port(), start=False)
    try:
        store = await stores(uri=server.uri, wait=False)
        back = []
        store.on_reconnect(lambda: back.append(True))
        assert not store.ready
        d = store.connected(meta())
        assert d.called  # failed at once, not queued
        with pytest.raises(ConnectionError):
            await d
        await threads.deferToThread(server.start)
        await eventually(lambda: store.ready, timeout=20, what="store connected once Redis started")
        assert back == [True]  # a write was refused: the gateway must rewrite its connections
        await store.connected(meta())
        assert server.client().exists("gateway:conn:alice:phone")
    finally:
        server.cleanup()


@pytest_twisted.ensureDeferred
async def test_redis_restart_reconnects_and_asks_for_a_rewrite(redis_server, stores):
    store = await stores()
    back = []
    store.on_reconnect(lambda: back.append(True))
    await store.connected(meta())
    await threads.deferToThread(redis_server.restart)
    await eventually(lambda: back, timeout=20, what="on_reconnect after the restart")
    assert store.ready and back == [True]
    r = redis_server.client()
    assert not r.exists("gateway:conn:alice:phone")  # the restarted Redis lost everything
    await store.connected(meta())  # what the gateway does on_reconnect
    assert r.exists("gateway:conn:alice:phone")


@pytest_twisted.ensureDeferred
async def test_a_large_refresh_is_a_few_scripts_not_a_command_per_connection(redis_server, stores):
    store = await stores()
    r = redis_server.client()
    metas = [meta(profile=f"p{i}", rooms=[f"r{i % 7}"], heartbeat=5000) for i in range(1234)]
    before = write_calls(r)
    await store.refresh(metas)  # the first refresh rewrites and renews
    calls = delta(before, write_calls(r))
    scripts = calls.get("eval", 0) + calls.get("evalsha", 0)
    assert scripts == 3 + 3  # ceil(1234 / 500) rewrites; 1234 devices + 7 rooms renewed in 3
    assert calls["set"] == 1234 and calls["expire"] == 1234 + 7
    assert json.loads(r.get("gateway:conn:p1233:phone"))["last_heartbeat"] == 5000
    assert r.ttl("gateway:conn:p1233:phone") > 50
