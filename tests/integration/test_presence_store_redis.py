"""The presence and GCRA scripts against a real redis-server (chatgateway.store.presence,
chatgateway.store.gcra): what each decides, atomically, with Redis's own clock."""

import pytest_twisted
from twisted.internet import defer, reactor, task
from zope.interface.verify import verifyObject

from chatgateway import config as configuration
from chatgateway.store import ConnectionMeta
from chatgateway.store.gcra import IRateChecks, MemoryGcra, RedisGcra, limit_key
from chatgateway.store.memory import MemoryStore
from chatgateway.store.memorypresence import MemoryPresence
from chatgateway.store.presence import (
    INDEX_KEY,
    IPresenceLeases,
    RedisPresence,
    holder,
    holder_leases_key,
    presence_key,
)
from chatgateway.store.redis import RedisStore
from support.chat import wait_until
from support.redis import eventually


@pytest_twisted.async_yield_fixture
async def store(redis_server):
    environ = {
        "CACHE_URI": redis_server.uri,
        "JWT_SECRET": "test-secret-0123456789abcdef0123456789",
        "GATEWAY_ID": "gw-a",
    }
    store = RedisStore(configuration.load(environ=environ), reactor)
    await store.start()
    await eventually(lambda: store.ready, what="store ready")
    yield store
    await store.stop()


GW_A, GW_DEAD, GW_LATE = holder("gw-a", "1"), holder("gw-dead", "1"), holder("gw-late", "1")


def connect(store, profile, device, rooms):
    meta = ConnectionMeta(profile, device, list(rooms), 1000, 1000, 1000, "gw-a")
    return store.open_connection(meta, f"s-{profile}-{device}", 5)


def test_both_implementations_provide_their_interfaces():
    assert verifyObject(IPresenceLeases, MemoryPresence(MemoryStore(), task.Clock()))
    assert verifyObject(IPresenceLeases, RedisPresence(None))
    assert verifyObject(IRateChecks, MemoryGcra(task.Clock()))
    assert verifyObject(IRateChecks, RedisGcra(None))


@pytest_twisted.ensureDeferred
async def test_online_once_offline_after_the_grace_and_the_rooms_to_tell_by_size(store, redis_server):
    await store.instance_alive("gw-a", {"started": 0, "addresses": [], "connections": 0})
    leases = RedisPresence(store.redis)
    for n in range(3):
        await connect(store, f"crowd{n}", "phone", ["big"])
    await connect(store, "bob", "phone", ["small", "big"])
    assert await leases.arrive("bob", "phone", "s1", GW_A, ["small", "big"], 3) == ["small"]  # big: 4 devices
    assert await leases.arrive("bob", "laptop", "s2", GW_A, ["small"], 3) is None  # online already
    assert await leases.arrive("bob", "laptop", "s2", GW_A, ["small"], 3) is None  # again: idempotent
    assert await leases.devices("bob") == {"phone", "laptop"}
    assert (await leases.sweep(3, GW_A)).offline == []  # live leases need no renewal
    await leases.depart("bob", "phone", "s1", GW_A, 0.3)
    assert await leases.devices("bob") == {"laptop"}
    await leases.depart("bob", "laptop", "s2", GW_A, 0.3)
    assert await leases.devices("bob") == set()
    sweep = await leases.sweep(3, GW_A)
    assert (sweep.online, sweep.offline) == (1, [])  # in the grace: still online
    client = redis_server.client()
    ttls = {k: client.ttl(k) for k in client.keys("gateway:presence*")}
    assert ttls and all(0 < t <= 86400 for t in ttls.values()), ttls  # nothing left behind without a gateway

    gone = []

    async def offline():
        gone[:] = (await leases.sweep(3, GW_A)).offline
        return bool(gone)

    await wait_until(lambda: defer.ensureDeferred(offline()), timeout=5)
    assert gone == [("bob", ["small"])]
    assert not client.exists(presence_key("bob"), "gateway:presence-rooms:bob", holder_leases_key(GW_A))
    assert client.zcard(INDEX_KEY) == 0 and client.scard("gateway:presence-online") == 0


@pytest_twisted.ensureDeferred
async def test_a_dead_gateways_devices_go_offline_once_however_many_gateways_sweep(store, redis_server):
    await store.instance_alive("gw-a", {"started": 0, "addresses": [], "connections": 0})
    leases = RedisPresence(store.redis)
    await leases.arrive("carol", "phone", "s1", GW_DEAD, ["r1"], 10)  # gw-dead: no registration
    await leases.arrive("carol", "laptop", "s2", GW_A, ["r1"], 10)
    await leases.arrive("erin", "phone", "s3", GW_DEAD, ["r1"], 10)
    sweeps = await defer.gatherResults(
        [leases.sweep(10, gw) for gw in (GW_A, holder("gw-b", "1"), holder("gw-c", "1"))]
    )  # racing from three gateways
    assert [p for s in sweeps for p, _ in s.offline] == ["erin"]  # carol is still on gw-a
    assert [s.online for s in sweeps] == [1, 1, 1]
    assert await leases.devices("carol") == {"laptop"}
    client = redis_server.client()
    assert client.smembers("gateway:presence-gateways") == {GW_A}
    assert not client.exists(holder_leases_key(GW_DEAD))


@pytest_twisted.ensureDeferred
async def test_a_room_answers_its_online_members_or_their_count(store):
    await store.instance_alive("gw-a", {"started": 0, "addresses": [], "connections": 0})
    leases = RedisPresence(store.redis)
    await connect(store, "alice", "phone", ["r1"])
    await connect(store, "dave", "phone", ["r1"])
    await leases.arrive("alice", "phone", "s-alice-phone", GW_A, ["r1"], 10)
    await leases.arrive("dave", "phone", "s-dave-phone", GW_DEAD, ["r1"], 10)
    await leases.sweep(10, GW_A)
    found = await leases.room("r1", 10)
    assert (found.count, found.profile_ids) == (1, ["alice"])  # dave's gateway is dead
    counted = await leases.room("r1", 1)
    assert (counted.count, counted.profile_ids) == (2, None)  # above the size: the devices, counted


@pytest_twisted.ensureDeferred
async def test_gcra_in_redis_lets_the_burst_in_and_counts_a_command_against_both_limits_or_neither(store, redis_server):
    gcra = RedisGcra(store.redis)
    limits = [("profile", "alice", 0.5, 2), ("room", "r1", 0.5, 3)]  # one event per 2 s
    assert [await gcra.check(limits) for _ in range(2)] == [(None, 0.0), (None, 0.0)]
    kind, wait = await gcra.check(limits)
    assert kind == "profile" and 1.5 < wait <= 2.0
    # Refused by the profile: the room's third slot is still there.
    assert await gcra.check([("room", "r1", 0.5, 3)]) == (None, 0.0)
    kind, _ = await gcra.check([("room", "r1", 0.5, 3)])
    assert kind == "room"
    client = redis_server.client()
    assert 0 < client.pttl(limit_key("profile", "alice")) <= 4000  # expires once full again


@pytest_twisted.ensureDeferred
async def test_a_gateway_that_was_only_late_learns_its_leases_were_lapsed(store):
    leases = RedisPresence(store.redis)
    await leases.arrive("frank", "phone", "s1", GW_LATE, ["r1"], 10)  # its registration has expired
    assert (await leases.sweep(10, GW_LATE)).offline == []  # never its own sweep's victim
    first = await leases.sweep(10, GW_A)
    assert ([p for p, _ in first.offline], first.reaped) == (["frank"], False)
    late = await leases.sweep(10, GW_LATE)  # back: the mark tells it
    assert late.reaped and not (await leases.sweep(10, GW_LATE)).reaped  # once
    assert await leases.arrive("frank", "phone", "s1", GW_LATE, ["r1"], 10) == ["r1"]  # online again


@pytest_twisted.ensureDeferred
async def test_a_gateway_restarted_under_the_same_id_lapses_its_earlier_incarnations_leases(store):
    await store.instance_alive("gw-a", {"started": 0, "addresses": [], "connections": 0})
    leases = RedisPresence(store.redis)
    earlier, now = holder("gw-a", "0"), GW_A
    await leases.arrive("gina", "phone", "s1", earlier, ["r1"], 10)  # before a SIGKILL
    await leases.arrive("hank", "phone", "s2", now, ["r1"], 10)
    assert (await leases.sweep(10, holder("gw-b", "1"))).offline == []  # gw-a is registered: alive to others
    sweep = await leases.sweep(10, now)  # its own sweep knows better
    assert ([p for p, _ in sweep.offline], sweep.reaped) == (["gina"], False)
