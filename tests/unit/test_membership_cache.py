"""The membership cache of a connect (docs/architecture.md#membership-cache), on a task.Clock
gateway with the in-process bus and a fake core that records its calls."""

import grpc
import pytest
from twisted.internet import defer

from chatgateway.api import chat_pb2 as pb
from chatgateway.bus import channels, memberships
from chatgateway.bus.memory import MemoryBus, MemoryHub
from chatgateway.core.client import CoreError
from chatgateway.redisconn.connection import ConnectionError
from chatgateway.sessions import membership
from chatgateway.sessions.gateway import WATCH_WAIT_SEC
from support.wsharness import Harness

TTL = 600
Change = pb.SubscriptionEvent.Change


@pytest.fixture
def h():
    harness = Harness(MEMBERSHIP_CACHE_TTL_SEC=TTL, HEARTBEAT_INTERVAL_SEC=10, CONNECTION_TIMEOUT_SEC=3000)
    yield harness
    harness.stop()


def searches(h):
    return [method for method, _, _ in h.core.calls].count("SearchRooms")


def rooms_of(connection):
    (connected,) = connection.of("connected")
    return sorted(connected.connected.room_ids)


def lookups(h):
    return h.gateway.counts.membership_lookup_counts()


def publish_change(h, room_id, profile_id, change):
    """A membership change published by the contract, as the reference core publishes it."""
    event = pb.ServerEvent(id="x", subscription_event=membership.event(room_id, profile_id, change))
    d = memberships.publish_event(MemoryBus(h.hub), channels.profile(profile_id), event)
    h.flush()
    return d


def room_event(h, room_id, text):
    message = pb.RoomEvent(id=text, room_id=room_id, sender_id="carol")
    h.publish(channels.room(room_id), pb.ServerEvent(id=text, message=message))


def texts(connection):
    return [e.message.id for e in connection.of("message")]


# ---------------------------------------------------------------- hits and misses


def test_a_second_connect_of_a_profile_makes_no_core_call(h):
    h.core.rooms["alice"] = ["r1", "r2"]
    first = h.connect("alice/phone")
    assert rooms_of(first) == ["r1", "r2"] and searches(h) == 1
    second = h.connect("alice/laptop")
    assert rooms_of(second) == ["r1", "r2"]
    assert searches(h) == 1
    assert lookups(h) == {"hit": 1, "miss": 1, "error": 0}


def test_a_profile_cached_with_no_room_is_a_hit_too(h):
    h.connect("nobody/phone")
    assert rooms_of(h.connect("nobody/laptop")) == []
    assert searches(h) == 1


def test_an_entry_past_its_ttl_is_refreshed_from_the_core(h):
    h.core.rooms["alice"] = ["r1"]
    h.connect("alice/phone")
    h.core.rooms["alice"] = ["r1", "r9"]  # changed at the core without a publish: stale until the TTL
    h.advance(TTL - 1)
    assert rooms_of(h.connect("alice/tablet")) == ["r1"] and searches(h) == 1
    h.advance(2)
    assert rooms_of(h.connect("alice/laptop")) == ["r1", "r9"]
    assert searches(h) == 2
    h.advance(TTL - 1)  # the refreshed entry has a TTL of its own
    h.connect("alice/watch")
    assert searches(h) == 2


def test_with_a_ttl_of_zero_every_connect_asks_the_core():
    h = Harness(MEMBERSHIP_CACHE_TTL_SEC=0)
    h.core.rooms["alice"] = ["r1"]
    h.connect("alice/phone")
    h.connect("alice/laptop")
    assert searches(h) == 2
    assert lookups(h) == {"hit": 0, "miss": 0, "error": 0}
    h.stop()


def test_the_token_is_still_verified_on_a_cached_connect(h):
    h.connect("alice/phone")
    refused = h.connect("bad-alice/laptop")
    assert refused.factory.opened is False and refused.factory.response is None
    assert searches(h) == 1


# ---------------------------------------------------------------- kept current by published changes


def test_published_changes_update_the_cache_in_the_same_step(h):
    h.core.rooms["alice"] = ["r1", "r2"]
    h.connect("alice/phone")
    publish_change(h, "r2", "alice", Change.REMOVED)
    publish_change(h, "r3", "alice", Change.ADDED)
    publish_change(h, "r1", "alice", Change.ROLE_CHANGED)
    assert rooms_of(h.connect("alice/laptop")) == ["r1", "r3"]
    assert searches(h) == 1


def test_a_change_of_a_profile_not_cached_caches_nothing(h):
    publish_change(h, "r3", "alice", Change.ADDED)
    h.core.rooms["alice"] = ["r1", "r3"]
    assert rooms_of(h.connect("alice/phone")) == ["r1", "r3"]
    assert searches(h) == 1


def test_a_removal_published_while_the_core_is_asked_is_not_resurrected(h):
    h.core.rooms["alice"] = ["r1", "r2"]
    answer = h.memberships_later()
    h.connect("alice/phone")  # a miss: the core is asked, and answers late
    h.core.rooms["alice"] = ["r2"]
    publish_change(h, "r1", "alice", Change.REMOVED)  # the removal, published meanwhile
    answer.callback([pb.SearchRoomsResponse(data=[pb.Room(id="r1"), pb.Room(id="r2")])])  # the stale answer
    h.flush()
    fresh = h.connect("alice/laptop")
    assert rooms_of(fresh) == ["r2"]  # the stale answer was not cached: the core was asked again
    assert lookups(h)["miss"] == 2 and searches(h) == 1  # (the held call is not recorded)
    room_event(h, "r1", "after the removal")
    assert texts(fresh) == []


def test_a_removal_published_while_a_device_opens_reaches_its_session(h):
    h.core.rooms["alice"] = ["r1", "r2"]
    answer = h.memberships_later()
    phone = h.connect("alice/phone")
    publish_change(h, "r1", "alice", Change.REMOVED)  # after the core read the rooms, before the answer came
    answer.callback([pb.SearchRoomsResponse(data=[pb.Room(id="r1"), pb.Room(id="r2")])])
    h.flush()
    assert rooms_of(phone) == ["r1", "r2"]  # what the core said...
    (removed,) = phone.of("subscription_event")  # ...then what changed since
    assert removed.subscription_event.room_id == "r1"
    room_event(h, "r1", "after the removal")
    room_event(h, "r2", "still a member")
    assert texts(phone) == ["still a member"]


def test_the_profiles_channel_is_subscribed_before_its_rooms_are_read(h):
    h.core.rooms["alice"] = ["r1", "r2"]
    h.connect("alice/phone")
    h.connections[0].server.sendClose(1000)
    h.flush()
    assert channels.profile("alice") not in h.hub.receivers
    held = defer.Deferred()
    h.gateway.bus.cached_memberships = lambda profile_id: held
    laptop = h.connect("alice/laptop")
    assert channels.profile("alice") in h.hub.receivers  # while the cache is read
    # A removal published after the subscription, arriving before the read's (older) answer.
    publish_change(h, "r1", "alice", Change.REMOVED)
    held.callback(memberships.Cached(["r1", "r2"], None))
    h.flush()
    room_event(h, "r1", "after the removal")
    assert texts(laptop) == []
    assert [e.subscription_event.room_id for e in laptop.of("subscription_event")] == ["r1"]


def test_an_opening_that_fails_leaves_no_subscription_behind(h):
    h.core.call = lambda *args, **kwargs: defer.fail(CoreError(grpc.StatusCode.UNAVAILABLE, "down"))
    c = h.connect("alice/phone")
    assert c.closed[0] == 1013
    assert channels.profile("alice") not in h.hub.receivers


def test_an_answer_with_no_change_meanwhile_is_cached(h):
    h.core.rooms["alice"] = ["r1"]
    answer = h.memberships_later()
    h.connect("alice/phone")
    publish_change(h, "r1", "bob", Change.REMOVED)  # another profile's change
    answer.callback([pb.SearchRoomsResponse(data=[pb.Room(id="r1")])])
    h.flush()
    h.connect("alice/laptop")
    assert lookups(h) == {"hit": 1, "miss": 1, "error": 0} and searches(h) == 0  # (the held call is not recorded)


def test_a_forwarded_removal_the_gateway_publishes_updates_the_cache(h):
    gateway = Harness(h._shared, GATEWAY_ID="gw-two", PUBLISH_FORWARDED_EVENTS="true", MEMBERSHIP_CACHE_TTL_SEC=TTL)
    h.core.rooms.update(alice=["r1", "r2"], bob=["r1"])
    on_one = h.connect("alice/phone")
    admin = gateway.connect("bob/phone")
    call = pb.CallCommand(method="RemoveRoomSubscriptions")
    call.body.Pack(pb.RemoveRoomSubscriptionsRequest(room_id="r1", profile_ids=["alice"]))
    (result,) = admin.command(request_id="1", call=call)
    assert not result.command_result.HasField("error")
    h.flush()
    room_event(h, "r1", "after the removal")
    assert texts(on_one) == []  # re-scoped at once on the other gateway
    assert rooms_of(gateway.connect("alice/laptop")) == ["r2"]  # and the cache knows
    assert searches(h) == 2  # alice once, bob once
    gateway.stop()


# ---------------------------------------------------------------- the core or the cache down


def test_a_cached_profile_connects_while_the_core_is_down(h):
    h.core.rooms["alice"] = ["r1"]
    h.connect("alice/phone")
    down = CoreError(grpc.StatusCode.UNAVAILABLE, "core unavailable")
    h.core.call = lambda *args, **kwargs: defer.fail(down)
    c = h.connect("alice/laptop")
    assert rooms_of(c) == ["r1"] and c.closed is None
    room_event(h, "r1", "while the core is down")
    assert texts(c) == ["while the core is down"]
    message = pb.RoomEvent(room_id="r1", type=pb.RoomEvent.Type.TEXT)
    (result,) = c.command(request_id="1", room_event=message)
    assert result.command_result.error.status == "UNAVAILABLE"


def test_an_uncached_profile_still_needs_the_core(h):
    h.core.call = lambda *args, **kwargs: defer.fail(CoreError(grpc.StatusCode.UNAVAILABLE, "down"))
    c = h.connect("alice/phone")
    assert c.closed[0] == 1013


def test_a_cache_that_cannot_be_read_falls_back_to_the_core(h):
    h.core.rooms["alice"] = ["r1"]
    h.connect("alice/phone")
    h.gateway.bus.cached_memberships = lambda profile_id: defer.fail(ConnectionError("redis bus-publisher: timeout"))
    c = h.connect("alice/laptop")
    assert rooms_of(c) == ["r1"] and c.closed is None
    assert searches(h) == 2
    assert lookups(h)["error"] == 1


# ---------------------------------------------------------------- the in-process cache itself


def test_the_in_process_cache_follows_the_scripts():
    now = [0.0]
    hub = MemoryHub()
    cache = hub.memberships
    cache._now = lambda: now[0]
    assert cache.read("alice") == memberships.Cached(None, "0")
    assert cache.write("alice", ["r1"], "0", 10) is True
    assert cache.read("alice") == memberships.Cached(["r1"], None)
    cache.changed("alice", "r2", Change.ADDED)
    assert cache.read("alice").rooms == ["r1", "r2"]
    now[0] = 10
    version = cache.read("alice").version
    assert version == "1"
    cache.changed("alice", "r1", Change.ROLE_CHANGED)  # nothing to patch, but a change
    assert cache.write("alice", ["r1", "r2"], version, 10) is False
    assert cache.read("alice").rooms is None


def test_publish_payload_follows_the_contract_only_for_membership_changes():
    hub = MemoryHub()
    bus = MemoryBus(hub)
    hub.memberships.write("alice", ["r1"], "0", 60)
    change = pb.ServerEvent(subscription_event=membership.event("r1", "alice", Change.REMOVED))
    memberships.publish_payload(bus, channels.room("r1"), change.SerializeToString())  # not its profile's channel
    memberships.publish_payload(bus, channels.profile("alice"), b"\xff not protobuf")
    assert hub.memberships.read("alice").rooms == ["r1"]
    memberships.publish_payload(bus, channels.profile("alice"), change.SerializeToString())
    assert hub.memberships.read("alice").rooms == []


def test_a_subscription_redis_does_not_confirm_holds_a_connect_back_for_at_most_watch_wait_sec(h):
    h.core.rooms["alice"] = ["r1"]
    h.gateway.bus.subscribe = lambda channel: defer.Deferred()  # never confirmed
    c = h.connect("alice/phone")
    assert c.of("connected") == []
    h.advance(WATCH_WAIT_SEC - 0.1)
    assert c.of("connected") == []
    h.advance(0.2)
    assert rooms_of(c) == ["r1"]
