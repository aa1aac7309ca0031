"""The membership cache's scripts (chatgateway.bus.memberships) on a real redis-server, through RedisBus."""

import pytest
import pytest_twisted
from twisted.internet import reactor

from chatgateway import config as configuration
from chatgateway.api import chat_pb2 as pb
from chatgateway.bus import channels, memberships
from chatgateway.bus.redis import RedisBus
from chatgateway.redisconn.connection import ConnectionError
from support.processes import free_port
from support.redis import eventually

Change = pb.SubscriptionEvent.Change


def make_config(uri):
    return configuration.load(environ={"EVENTS_URI": uri, "JWT_SECRET": "test-secret-0123456789abcdef0123456789"})


@pytest_twisted.async_yield_fixture
async def bus(redis_server):
    """A RedisBus on the test's redis-server, receiving into ``bus.received``."""
    made = RedisBus(make_config(redis_server.uri), reactor)
    made.received = []
    made.start(lambda channel, payload: made.received.append((channel, payload)))
    await eventually(lambda: made.ready and made.publisher.ready, what="bus ready")
    yield made
    await made.stop()


def change_payload(room_id, profile_id, change):
    event = pb.ServerEvent(id="c1", subscription_event=pb.SubscriptionEvent(room_id=room_id, profile_id=profile_id))
    event.subscription_event.change = change
    return event.SerializeToString()


@pytest_twisted.ensureDeferred
async def test_a_miss_then_the_cores_answer_then_a_hit(bus, redis_server):
    r = redis_server.client()
    assert await bus.cached_memberships("alice") == memberships.Cached(None, "0")
    assert await bus.cache_memberships("alice", ["r2", "r1"], "0", 600) is True
    assert await bus.cached_memberships("alice") == memberships.Cached(["r1", "r2"], None)
    assert r.smembers("gateway:memberships:alice") == {"", "r1", "r2"}
    assert 590 < r.ttl("gateway:memberships:alice") <= 600
    assert r.ttl("gateway:memberships:alice:version") > 86000


@pytest_twisted.ensureDeferred
async def test_a_profile_with_no_room_is_cached_as_such(bus):
    cached = await bus.cached_memberships("nobody")
    assert await bus.cache_memberships("nobody", [], cached.version, 60) is True
    assert await bus.cached_memberships("nobody") == memberships.Cached([], None)


@pytest_twisted.ensureDeferred
async def test_a_change_patches_the_cached_set_and_publishes_in_one_script(bus, redis_server):
    await bus.subscribe(channels.profile("alice"))
    await bus.cache_memberships("alice", ["r1", "r2"], "0", 600)
    removed = change_payload("r2", "alice", Change.REMOVED)
    await bus.publish_membership("alice", "r2", Change.REMOVED, removed)
    await bus.publish_membership("alice", "r3", Change.ADDED, change_payload("r3", "alice", Change.ADDED))
    await bus.publish_membership("alice", "r1", Change.ROLE_CHANGED, change_payload("r1", "alice", Change.ROLE_CHANGED))
    assert (await bus.cached_memberships("alice")).rooms == ["r1", "r3"]
    await eventually(lambda: len(bus.received) == 3)
    assert bus.received[0] == (channels.profile("alice"), removed)
    r = redis_server.client()
    assert r.get("gateway:memberships:alice:version") == "3"
    assert 590 < r.ttl("gateway:memberships:alice") <= 600  # a patch does not renew the TTL


@pytest_twisted.ensureDeferred
async def test_a_change_of_a_profile_not_cached_caches_nothing(bus, redis_server):
    await bus.publish_membership("alice", "r3", Change.ADDED, change_payload("r3", "alice", Change.ADDED))
    assert not redis_server.client().exists("gateway:memberships:alice")
    assert await bus.cached_memberships("alice") == memberships.Cached(None, "1")


@pytest_twisted.ensureDeferred
async def test_a_change_published_between_the_read_and_the_write_wins(bus, redis_server):
    cached = await bus.cached_memberships("alice")  # a miss: the gateway asks the core...
    await bus.publish_membership("alice", "r1", Change.REMOVED, change_payload("r1", "alice", Change.REMOVED))
    assert await bus.cache_memberships("alice", ["r1", "r2"], cached.version, 600) is False  # ...its answer is stale
    assert not redis_server.client().exists("gateway:memberships:alice")
    again = await bus.cached_memberships("alice")
    assert again.rooms is None
    assert await bus.cache_memberships("alice", ["r2"], again.version, 600) is True


@pytest_twisted.ensureDeferred
async def test_a_profile_with_thousands_of_rooms(bus):
    rooms = [f"room-{i:05d}" for i in range(2500)]
    assert await bus.cache_memberships("busy", rooms, "0", 600) is True
    assert (await bus.cached_memberships("busy")).rooms == rooms


@pytest_twisted.ensureDeferred
async def test_another_core_follows_the_contract_with_redis_py(bus, redis_server):
    await bus.cache_memberships("alice", ["r1"], "0", 600)
    r = redis_server.client(decode_responses=False)
    script, keys, args = memberships.change_call(
        "alice", "r1", Change.REMOVED, change_payload("r1", "alice", Change.REMOVED)
    )
    r.eval(script, len(keys), *keys, *args)
    assert (await bus.cached_memberships("alice")).rooms == []


@pytest_twisted.ensureDeferred
async def test_a_read_with_redis_down_fails_at_once():
    down = RedisBus(make_config(f"redis://127.0.0.1:{free_port()}/0"), reactor)
    with pytest.raises(ConnectionError):
        await down.cached_memberships("alice")


@pytest_twisted.ensureDeferred
async def test_a_second_subscribe_of_a_channel_waits_for_redis_to_confirm_the_first(bus, redis_server):
    # A connect subscribes its profile's channel before reading the cache: a second connect of the
    # profile must not read before the subscription is in place either.
    first = bus.subscribe(channels.profile("alice"))
    second = bus.subscribe(channels.profile("alice"))
    assert not second.called
    await first
    assert second.called
    assert dict(redis_server.client().pubsub_numsub(channels.profile("alice")))[channels.profile("alice")] == 1
    assert bus.subscribe(channels.profile("alice")).called
