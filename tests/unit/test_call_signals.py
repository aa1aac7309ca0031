"""Call signaling (docs/protocol.md#call-signaling) on task.Clock gateways sharing the
in-process bus and store: who gets a signal, TAKEN, and the permission rules."""

import grpc
import pytest

from chatgateway.api import chat_pb2 as pb
from support.wsharness import Harness

Kind = pb.CallSignal.Kind


@pytest.fixture
def h():
    harness = Harness(HEARTBEAT_INTERVAL_SEC=10, CONNECTION_TIMEOUT_SEC=3000)
    harness.core.rooms.update({"alice": ["r1"], "bob": ["r1"], "mallory": ["r9"], "olga": ["r1"]})
    yield harness
    harness.stop()


def signal(connection, kind, to, device="", room="r1", request_id="s", call_id="c1", **payload):
    command = pb.CallSignal(call_id=call_id, kind=kind, room_id=room, to_profile_id=to, to_device_id=device)
    command.payload.update(payload)
    results = connection.command(request_id=request_id, call_signal=command)
    connection.harness.advance(0)
    return [r.command_result for r in results if r.command_result.request_id == request_id][-1]


def signals(connection):
    connection.harness.advance(0)
    return [
        (e.call_signal_event.kind, e.call_signal_event.from_profile_id, e.call_signal_event.from_device_id)
        for e in connection.of("call_signal_event")
    ]


def status(result):
    return grpc.StatusCode.OK.value[0] if not result.HasField("error") else result.error.code


def test_an_offer_reaches_every_device_of_the_callee_on_every_gateway_and_nobody_else(h):
    other = h.peer("gw-b", HEARTBEAT_INTERVAL_SEC=10, CONNECTION_TIMEOUT_SEC=3000)
    alice = h.connect("alice/laptop")
    phone = other.connect("bob/phone")
    tablet = other.connect("bob/tablet")
    olga = h.connect("olga/phone")
    result = signal(alice, Kind.OFFER, "bob", sdp="v=0 offer")
    assert status(result) == 0
    other.advance(0)
    for device in (phone, tablet):
        (event,) = device.of("call_signal_event")
        sent = event.call_signal_event
        assert (sent.call_id, sent.kind, sent.room_id, sent.from_profile_id, sent.from_device_id) == (
            "c1",
            Kind.OFFER,
            "r1",
            "alice",
            "laptop",
        )
        assert sent.payload["sdp"] == "v=0 offer"
    assert signals(olga) == [] and signals(alice) == []
    assert h.gateway.counts.signal_counts()["offer"] == 1
    other.stop()


def test_an_answer_goes_to_the_caller_and_tells_the_callees_other_devices_the_call_was_taken(h):
    alice = h.connect("alice/laptop")
    phone = h.connect("bob/phone")
    tablet = h.connect("bob/tablet")
    signal(alice, Kind.OFFER, "bob")
    assert status(signal(phone, Kind.ANSWER, "alice", device="laptop", sdp="v=0 answer")) == 0
    assert signals(alice) == [(Kind.ANSWER, "bob", "phone")]
    assert signals(tablet) == [(Kind.OFFER, "alice", "laptop"), (Kind.TAKEN, "bob", "phone")]
    assert signals(phone) == [(Kind.OFFER, "alice", "laptop")]  # not told of its own answer
    assert not tablet.of("call_signal_event")[-1].call_signal_event.HasField("payload")  # the SDP stays private


def test_a_signal_to_one_device_reaches_that_device_only(h):
    alice = h.connect("alice/laptop")
    phone = h.connect("bob/phone")
    tablet = h.connect("bob/tablet")
    assert status(signal(alice, Kind.ICE, "bob", device="tablet", candidate="candidate:1")) == 0
    assert signals(tablet) == [(Kind.ICE, "alice", "laptop")] and signals(phone) == []


def test_a_stranger_is_refused_whether_the_callee_is_online_or_not(h):
    mallory = h.connect("mallory/phone")
    h.connect("bob/phone")
    mallory_room = signal(mallory, Kind.OFFER, "bob", room="r9")  # mallory's own room: bob is not in it
    assert status(mallory_room) == grpc.StatusCode.PERMISSION_DENIED.value[0]
    not_hers = signal(mallory, Kind.OFFER, "bob", room="r1")  # a room of bob's: mallory is not in it
    assert status(not_hers) == grpc.StatusCode.PERMISSION_DENIED.value[0]
    offline = signal(mallory, Kind.OFFER, "nobody", room="r9")
    assert status(offline) == grpc.StatusCode.PERMISSION_DENIED.value[0]  # not UNAVAILABLE: nothing leaks
    assert h.gateway.counts.signal_counts()["offer"] == 0


def test_an_offline_callee_is_unavailable(h):
    alice = h.connect("alice/laptop")
    result = signal(alice, Kind.OFFER, "olga")  # a member of r1 (the core says), never connected
    assert status(result) == grpc.StatusCode.UNAVAILABLE.value[0]
    phone = h.connect("bob/phone")
    assert status(signal(alice, Kind.OFFER, "bob", device="watch")) == grpc.StatusCode.UNAVAILABLE.value[0]
    phone.client.sendClose(1000)
    h.flush()
    # Closed: in the presence grace the profile is online, but no device can ring.
    assert status(signal(alice, Kind.OFFER, "bob")) == grpc.StatusCode.UNAVAILABLE.value[0]


def test_a_callee_not_in_the_membership_cache_is_asked_of_the_core_once_per_ttl(h):
    alice = h.connect("alice/laptop")
    h.connect("bob/phone")
    h.hub.memberships.rooms.clear()
    for n in range(3):
        assert status(signal(alice, Kind.ICE, "bob", request_id=f"i{n}")) == 0
    asked = [method for method, _, _ in h.core.calls].count("SearchRoomSubscriptions")
    assert asked == 1


@pytest.mark.parametrize(
    "fields",
    [
        {"kind": Kind.TAKEN, "to_profile_id": "bob", "room_id": "r1", "call_id": "c"},
        {"kind": Kind.OFFER, "to_profile_id": "", "room_id": "r1", "call_id": "c"},
        {"kind": Kind.OFFER, "to_profile_id": "bob", "room_id": "", "call_id": "c"},
        {"kind": Kind.OFFER, "to_profile_id": "bob", "room_id": "r1", "call_id": ""},
    ],
)
def test_a_malformed_signal_is_an_invalid_argument(h, fields):
    alice = h.connect("alice/laptop")
    h.connect("bob/phone")
    (result,) = alice.command(request_id="x", call_signal=pb.CallSignal(**fields))
    assert result.command_result.error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]


def test_a_callee_removed_from_the_room_is_refused_at_once(h):
    from chatgateway.bus import channels, memberships
    from chatgateway.bus.memory import MemoryBus
    from chatgateway.sessions import membership

    alice = h.connect("alice/laptop")
    h.connect("bob/phone")
    assert status(signal(alice, Kind.OFFER, "bob")) == 0
    removed = membership.event("r1", "bob", pb.SubscriptionEvent.Change.REMOVED)
    event = pb.ServerEvent(id="x", subscription_event=removed)
    memberships.publish_event(MemoryBus(h.hub), channels.profile("bob"), event)  # as the core publishes it
    h.core.rooms["bob"].remove("r1")
    assert status(signal(alice, Kind.ICE, "bob", request_id="after")) == grpc.StatusCode.PERMISSION_DENIED.value[0]
