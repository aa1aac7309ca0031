"""Presence from leases (docs/protocol.md#presence) on task.Clock gateways sharing the
in-process store and bus: announcements, the grace period, a dead gateway's devices, large
rooms, and who may ask."""

import grpc
import pytest
from twisted.internet import defer

from chatgateway.api import chat_pb2 as pb
from chatgateway.store import instance_key
from chatgateway.store.memory import MemoryStore
from chatgateway.store.memorypresence import MemoryPresence
from chatgateway.store.presence import holder
from support.wsharness import Harness

HEARTBEAT = 10
GRACE = 25
ONLINE, OFFLINE = pb.PresenceEvent.ONLINE, pb.PresenceEvent.OFFLINE


SETTINGS = {
    "HEARTBEAT_INTERVAL_SEC": HEARTBEAT,
    "CONNECTION_TIMEOUT_SEC": 3000,
    "PRESENCE_GRACE_SEC": GRACE,
    "PRESENCE_MAX_ROOM_SIZE": 10,
}


def peer(h, gateway_id, **settings):
    return h.peer(gateway_id, **{**SETTINGS, **settings})


@pytest.fixture
def h():
    harness = Harness(**SETTINGS)
    harness.core.rooms.update({"alice": ["r1", "r2"], "bob": ["r1"], "carol": ["r9"], "dave": ["r2"]})
    yield harness
    harness.stop()


def presence(connection):
    connection.harness.advance(0)  # frames of a fan-out leave on the next reactor turn
    return [
        (e.presence_event.profile_id, e.presence_event.status, e.presence_event.room_id)
        for e in connection.of("presence_event")
    ]


def close(h, connection):
    connection.client.sendClose(1000)
    h.flush()


def test_a_profile_coming_online_is_told_to_fellow_members_once_per_shared_room(h):
    alice = h.connect("alice/phone")
    carol = h.connect("carol/phone")
    bob = h.connect("bob/phone")
    assert presence(alice) == [("bob", ONLINE, "r1")]
    assert presence(bob) == []  # not told of itself; alice came online before it was there
    assert presence(carol) == []  # shares no room with bob
    dave = h.connect("dave/phone")
    assert presence(alice)[-1] == ("dave", ONLINE, "r2")
    assert presence(dave) == []
    assert h.gateway.counts.presence_counts() == {"online": 5, "offline": 0}  # alice r1, r2; carol r9; bob r1; dave r2


def test_a_second_device_of_an_online_profile_announces_nothing(h):
    alice = h.connect("alice/phone")
    h.connect("bob/phone")
    h.connect("bob/laptop")
    assert presence(alice) == [("bob", ONLINE, "r1")]


def test_a_disconnect_goes_offline_after_the_grace_period_and_one_sweep(h):
    alice = h.connect("alice/phone")
    bob = h.connect("bob/phone")
    close(h, bob)
    h.run_for(GRACE - 1)
    assert presence(alice) == [("bob", ONLINE, "r1")]
    h.run_for(HEARTBEAT + 1)
    assert presence(alice) == [("bob", ONLINE, "r1"), ("bob", OFFLINE, "r1")]
    h.run_for(5 * HEARTBEAT)
    assert len(presence(alice)) == 2  # told once


def test_a_reconnect_within_the_grace_period_on_another_gateway_sends_no_offline_online_pair(h):
    alice = h.connect("alice/phone")
    bob = h.connect("bob/phone")
    other = peer(h, "gw-other")
    close(h, bob)
    h.run_for(GRACE / 2)
    again = other.connect("bob/phone")
    assert again.of("connected")
    h.run_for(GRACE + 3 * HEARTBEAT)
    other.run_for(1)
    assert presence(alice) == [("bob", ONLINE, "r1")]
    other.stop()


def test_one_device_leaving_keeps_the_profile_online_while_another_is_connected(h):
    alice = h.connect("alice/phone")
    h.connect("bob/phone")
    laptop = h.connect("bob/laptop")
    close(h, laptop)
    h.run_for(GRACE + 3 * HEARTBEAT)
    assert presence(alice) == [("bob", ONLINE, "r1")]


def test_the_devices_of_a_gateway_that_died_go_offline_within_the_bound(h):
    alice = h.connect("alice/phone")
    dead = peer(h, "gw-dead")
    dead.connect("bob/phone")
    assert presence(alice) == [("bob", ONLINE, "r1")]
    dead.gateway._heartbeat.stop()  # it renews nothing from now on, and closes nothing
    bound = h.gateway.presence.offline_bound_sec
    assert bound == 3 * HEARTBEAT + HEARTBEAT  # its registration's TTL, then one sweep
    h.run_for(2 * HEARTBEAT)
    assert presence(alice) == [("bob", ONLINE, "r1")]  # registered still: online
    del h.store.values[instance_key("gw-dead")]  # its registration expires (a TTL in Redis)
    h.run_for(HEARTBEAT)
    assert presence(alice) == [("bob", ONLINE, "r1"), ("bob", OFFLINE, "r1")]


def test_leases_are_renewed_every_heartbeat_so_a_live_device_never_lapses(h):
    alice = h.connect("alice/phone")
    h.connect("bob/phone")
    h.run_for(20 * HEARTBEAT)
    assert presence(alice) == [("bob", ONLINE, "r1")]
    assert h.gateway.presence.online_profiles == 2
    assert h.gateway.counts.online_profiles() == 2


def test_leases_the_store_lost_are_taken_again_when_it_asks_for_a_rewrite(h):
    alice = h.connect("alice/phone")
    h.connect("bob/phone")
    h.store.presence_leases.clear()  # Redis restarted empty, say
    h.gateway._store_reconnected()  # what the store calls then
    assert presence(alice) == [("bob", ONLINE, "r1"), ("bob", ONLINE, "r1")]
    h.run_for(3 * HEARTBEAT)
    assert len(presence(alice)) == 2


def test_rooms_above_the_size_get_no_presence_events_and_a_count_only(h):
    small = peer(h, "gw-small", PRESENCE_MAX_ROOM_SIZE=2)
    h.core.rooms.update({"erin": ["r1"]})
    alice = small.connect("alice/phone")
    small.connect("bob/phone")
    assert presence(alice) == [("bob", ONLINE, "r1")]  # r1: two devices
    small.connect("erin/phone")  # r1: three devices now
    assert presence(alice) == [("bob", ONLINE, "r1")]
    (result,) = alice.command(request_id="p", presence=pb.GetPresenceRequest(room_id="r1"))
    response = pb.GetPresenceResponse()
    assert result.command_result.body.Unpack(response)
    assert response.counts_only and response.online_count == 3 and not response.profile_ids
    small.stop()


def test_the_presence_command_lists_the_online_members_of_a_room_of_yours(h):
    alice = h.connect("alice/phone")
    bob = h.connect("bob/phone")
    h.connect("carol/phone")
    (result,) = alice.command(request_id="p", presence=pb.GetPresenceRequest(room_id="r1"))
    response = pb.GetPresenceResponse()
    assert result.command_result.body.Unpack(response)
    assert (response.room_id, response.online_count, list(response.profile_ids)) == ("r1", 2, ["alice", "bob"])
    assert not response.counts_only
    close(h, bob)
    h.run_for(GRACE + HEARTBEAT)
    alice.command(request_id="q", presence=pb.GetPresenceRequest(room_id="r1"))
    assert alice.of("command_result")[-1].command_result.body.Unpack(response)
    assert list(response.profile_ids) == ["alice"]


def test_presence_of_a_room_is_refused_to_a_stranger(h):
    carol = h.connect("carol/phone")
    h.connect("bob/phone")
    (result,) = carol.command(request_id="p", presence=pb.GetPresenceRequest(room_id="r1"))
    assert result.command_result.error.code == grpc.StatusCode.PERMISSION_DENIED.value[0]
    assert not result.command_result.HasField("body")


def test_memory_leases_tell_devices_in_their_grace_apart_from_connected_ones():
    from twisted.internet import task

    clock = task.Clock()
    store = MemoryStore()
    store.instance_alive("gw", {})
    leases = MemoryPresence(store, clock)
    gw = holder("gw", "1")
    assert leases.arrive("bob", "phone", "s1", gw, ["r1"], 10).result == ["r1"]  # came online: tell r1
    assert leases.arrive("bob", "laptop", "s2", gw, ["r1"], 10).result is None
    assert leases.arrive("bob", "laptop", "s2", gw, ["r1"], 10).result is None  # again: idempotent
    leases.depart("bob", "phone", "s1", gw, 5)
    assert leases.devices("bob").result == {"laptop"}
    leases.depart("bob", "laptop", "s2", gw, 5)
    assert leases.devices("bob").result == set()
    assert leases.sweep(10, gw).result.offline == []  # in the grace: still online
    clock.advance(6)
    sweep = leases.sweep(10, gw).result
    assert (sweep.online, [p for p, _ in sweep.offline]) == (0, ["bob"])


def test_a_room_joined_while_online_is_told_when_the_profile_goes_offline(h):
    from chatgateway.sessions import membership

    h.core.rooms["erin"] = ["r5"]
    erin = h.connect("erin/phone")
    bob = h.connect("bob/phone")
    h.core.rooms["bob"].append("r5")
    h.gateway.apply_membership(membership.event("r5", "bob", pb.SubscriptionEvent.Change.ADDED))
    close(h, bob)
    h.run_for(GRACE + HEARTBEAT)
    assert presence(erin) == [("bob", OFFLINE, "r5")]


def test_a_gateway_whose_leases_were_lapsed_while_it_was_late_takes_them_again(h):
    alice = h.connect("alice/phone")
    late = peer(h, "gw-late")
    late.connect("bob/phone")
    late.gateway._heartbeat.stop()  # its reactor stalled, say: no renewal, no sweep
    registration = h.store.values.pop(instance_key("gw-late"))  # and its registration expired
    h.advance(HEARTBEAT)  # h's sweep lapses gw-late's leases
    assert presence(alice) == [("bob", ONLINE, "r1"), ("bob", OFFLINE, "r1")]
    h.store.values[instance_key("gw-late")] = registration  # renewed again
    late.gateway.presence.tick()  # its own sweep finds the mark
    assert presence(alice)[-1] == ("bob", ONLINE, "r1")
    late.stop()


def test_the_keys_of_live_connections_are_renewed_a_few_times_a_day(h):
    renewed = []
    h.gateway.presence.leases.renew = lambda profiles: renewed.append(sorted(profiles)) or defer.succeed(None)
    later = int(h.clock.seconds()) + 100_000  # tokens valid past the day
    h.connect(f"alice/phone@{later}")
    h.connect(f"bob/phone@{later}")
    every = h.gateway.presence.renew_every
    assert every == 86400 // (3 * HEARTBEAT)
    h.run_for((every - 1) * HEARTBEAT, step=HEARTBEAT)
    assert renewed == []
    h.run_for(HEARTBEAT, step=HEARTBEAT)
    assert renewed == [["alice", "bob"]]


def test_a_room_left_is_not_told_when_the_profile_goes_offline(h):
    from chatgateway.sessions import membership

    alice = h.connect("alice/phone")
    bob = h.connect("bob/phone")
    h.core.rooms["bob"].remove("r1")
    h.gateway.apply_membership(membership.event("r1", "bob", pb.SubscriptionEvent.Change.REMOVED))
    close(h, bob)
    h.run_for(GRACE + HEARTBEAT)
    assert presence(alice) == [("bob", ONLINE, "r1")]  # no offline for a room bob is not in any more


def test_a_gateway_restarted_with_the_same_id_lapses_its_earlier_leases(h):
    alice = h.connect("alice/phone")
    first = peer(h, "gw-same")
    first.connect("bob/phone")
    first.gateway._heartbeat.stop()  # SIGKILLed, and started again at once under the same GATEWAY_ID:
    again = peer(h, "gw-same")  # its registration never lapses
    h.run_for(3 * HEARTBEAT)
    assert presence(alice) == [("bob", ONLINE, "r1"), ("bob", OFFLINE, "r1")]
    again.stop()


def test_a_drained_gateways_devices_reconnecting_elsewhere_within_the_hint_do_not_flap(h):
    from chatgateway import config
    from chatgateway.sessions.reconnect import DRAIN_SPREAD_SEC

    default = config.load({"JWT_SECRET": "unit-test-secret"}).presence_grace_sec
    assert DRAIN_SPREAD_SEC < default  # the rule docs/operations.md states
    alice = h.connect("alice/phone")
    draining = peer(h, "gw-drained")
    draining.connect("bob/phone")
    draining.stop()  # SIGTERM: every device closed with 1001 and a hint
    h.run_for(DRAIN_SPREAD_SEC)
    h.connect("bob/phone")  # as the hint said, on another gateway
    h.run_for(GRACE + 3 * HEARTBEAT)
    assert presence(alice) == [("bob", ONLINE, "r1")]
