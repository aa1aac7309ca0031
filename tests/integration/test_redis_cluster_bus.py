"""The bus on a real Redis Cluster (3 primaries, 3 replicas): sharded pub/sub, the publish
scripts in one slot each, a primary killed and its replica promoted."""

import pytest
import pytest_twisted
from twisted.internet import reactor

from chatgateway import config as configuration
from chatgateway.api import chat_pb2 as pb
from chatgateway.bus import channels, make_bus
from chatgateway.bus.cluster import ClusterBus
from chatgateway.redisconn.slots import key_slot
from support.redis import eventually
from support.rediscluster import RedisCluster


@pytest.fixture(scope="module")
def cluster():
    c = RedisCluster()
    yield c
    c.cleanup()


def make_config(uri, **env):
    environ = {"CACHE_URI": uri, "JWT_SECRET": "test-secret-0123456789abcdef0123456789", "GATEWAY_ID": "gw-c", **env}
    return configuration.load(environ=environ)


def rooms_on_every_shard(cluster, prefix, count=6):
    """Room ids whose channels are spread over every primary."""
    by_node = {}
    i = 0
    while len(by_node) < 3 or min(len(v) for v in by_node.values()) < count // 3:
        room = f"{prefix}-{i}"
        by_node.setdefault(cluster.node_of_slot(key_slot(channels.room(room))).port, []).append(room)
        i += 1
    return [room for rooms in by_node.values() for room in rooms[: count // 3]]


def event(text):
    room_event = pb.RoomEvent(id=text, room_id="r", sender_id="core", type=pb.RoomEvent.SYSTEM)
    room_event.payload.update({"text": text})
    return pb.ServerEvent(id=text, message=room_event).SerializeToString()


@pytest_twisted.async_yield_fixture
async def buses(cluster):
    made = []

    async def make():
        bus = make_bus(make_config(cluster.uri), reactor)
        assert isinstance(bus, ClusterBus)
        got = []
        bus.start(lambda channel, payload: got.append((channel, payload)))
        bus.got = got
        made.append(bus)
        await eventually(lambda: bus.ready, what="cluster bus ready")
        return bus

    yield make
    for bus in made:
        await bus.stop()


@pytest_twisted.ensureDeferred
async def test_room_events_cross_shards_between_two_buses(cluster, buses):
    a, b = await buses(), await buses()
    rooms = rooms_on_every_shard(cluster, "cross")
    for room in rooms:
        await b.subscribe(channels.room(room))
    for room in rooms:
        await a.publish_room_event(room, event(f"hello {room}"))
    await eventually(lambda: len(b.got) == len(rooms), what="every room's event")
    assert sorted(channel for channel, _ in b.got) == sorted(channels.room(r) for r in rooms)
    read = await a.read_room_stream(rooms[0], 0)
    assert read.top == 1 and len(read.events) == 1


@pytest_twisted.ensureDeferred
async def test_membership_changes_cache_and_control_channels_on_the_shards(cluster, buses):
    a, b = await buses(), await buses()
    profile = "alice-cluster"
    cached = await a.cached_memberships(profile)
    assert cached.rooms is None and cached.version is not None
    assert await a.cache_memberships(profile, ["r1", "r2"], cached.version, 600)
    assert (await b.cached_memberships(profile)).rooms == ["r1", "r2"]
    await b.subscribe(channels.profile(profile))
    await b.subscribe(channels.control("gw-b"))
    change = pb.ServerEvent(
        id="m1",
        subscription_event=pb.SubscriptionEvent(profile_id=profile, room_id="r3", change=pb.SubscriptionEvent.ADDED),
    ).SerializeToString()
    await a.publish_membership(profile, "r3", pb.SubscriptionEvent.ADDED, change)
    await a.publish(channels.control("gw-b"), b'{"evict": 1}')
    await eventually(lambda: len(b.got) == 2, what="the change and the control message")
    assert b.got == [(channels.profile(profile), change), (channels.control("gw-b"), b'{"evict": 1}')]
    assert (await a.cached_memberships(profile)).rooms == ["r1", "r2", "r3"]
    # The cache's keys are tagged with the profile's channel: one slot, on its shard.
    r = cluster.client()
    assert r.smembers("gateway:memberships:{chat:profile:alice-cluster}") == {"", "r1", "r2", "r3"}
    assert r.keyslot("gateway:memberships:{chat:profile:alice-cluster}:version") == key_slot(channels.profile(profile))


@pytest_twisted.ensureDeferred
async def test_a_primary_killed_its_channels_resubscribed_on_the_promoted_replica(cluster, buses):
    # Last in the module: the cluster keeps one primary fewer (its replica took over).
    a, b = await buses(), await buses()
    gaps = []
    b.on_reconnect(lambda: gaps.append(True))
    rooms = rooms_on_every_shard(cluster, "failover")
    for room in rooms:
        await b.subscribe(channels.room(room))
    for room in rooms:
        await a.publish_room_event(room, event(f"before {room}"))
    await eventually(lambda: len(b.got) == len(rooms), what="the events before the failover")
    victim = rooms[0]
    killed = cluster.node_of_slot(key_slot(channels.room(victim)))
    with killed.client() as c:
        c.execute_command("WAIT", 1, 1000)  # what was published has reached the replica
    cluster.kill_primary_of(key_slot(channels.room(victim)))
    await eventually(lambda: not b.ready, what="the bus sees the primary gone")
    await eventually(lambda: b.ready and a.ready, timeout=30, what="ready again on the promoted replica")
    await eventually(lambda: gaps, what="on_reconnect: a gap to fill")
    assert cluster.node_of_slot(key_slot(channels.room(victim))).port != killed.port
    b.got.clear()
    for room in rooms:
        await a.publish_room_event(room, event(f"after {room}"))
    await eventually(lambda: len(b.got) == len(rooms), what="every room's event after the failover")
    # The victim room's stream survived on the replica: the gap fill reads it from there.
    read = await b.read_room_stream(victim, 0)
    assert read.top == 2 and [offset for offset, _ in read.events] == [1, 2]
