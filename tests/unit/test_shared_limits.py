"""The limits per profile and per room (docs/operations.md#limits-per-profile-and-per-room):
the GCRA's arithmetic on a task.Clock, the refusals a device sees, and failing open."""

import grpc
import pytest
from twisted.internet import defer, task

from chatgateway.api import chat_pb2 as pb
from chatgateway.redisconn.connection import ConnectionError
from chatgateway.sessions.sharedlimits import LimitExceeded, room_of
from chatgateway.store.gcra import MemoryGcra
from support.wsharness import Harness


def wait(gcra, kind, key, rate, burst):
    refused, seconds = gcra.check([(kind, key, rate, burst)]).result
    assert (refused is None) == (seconds == 0.0)
    return seconds


def test_gcra_lets_a_burst_in_then_one_per_interval():
    clock = task.Clock()
    clock.advance(1000)
    gcra = MemoryGcra(clock)
    waits = [wait(gcra, "profile", "alice", 2.0, 3) for _ in range(4)]  # 2/s, burst 3
    assert waits[:3] == [0.0, 0.0, 0.0]
    assert waits[3] == pytest.approx(0.5)  # the next one fits in half a second
    clock.advance(0.49)
    assert wait(gcra, "profile", "alice", 2.0, 3) == pytest.approx(0.01)
    clock.advance(0.01)
    assert wait(gcra, "profile", "alice", 2.0, 3) == 0.0
    assert wait(gcra, "profile", "bob", 2.0, 3) == 0.0  # each key its own limit
    assert wait(gcra, "room", "alice", 2.0, 3) == 0.0  # each kind too
    clock.advance(10)  # idle: full again, not more than the burst
    assert [wait(gcra, "profile", "alice", 2.0, 3) for _ in range(4)][3] > 0


def test_a_refused_check_does_not_use_up_the_limit():
    clock = task.Clock()
    gcra = MemoryGcra(clock)
    assert wait(gcra, "room", "r1", 1.0, 1) == 0.0
    for _ in range(5):
        assert wait(gcra, "room", "r1", 1.0, 1) == pytest.approx(1.0)
    clock.advance(1.0)
    assert wait(gcra, "room", "r1", 1.0, 1) == 0.0


def test_the_limits_of_one_command_count_it_against_all_or_none():
    gcra = MemoryGcra(task.Clock())
    both = [("profile", "alice", 1.0, 1), ("room", "r1", 1.0, 5)]
    assert gcra.check(both).result == (None, 0.0)
    kind, _ = gcra.check(both).result
    assert kind == "profile"
    assert [wait(gcra, "room", "r1", 1.0, 5) for _ in range(4)] == [0.0] * 4  # the refusal took none of r1's


def test_the_room_of_a_command():
    assert room_of("room_event", pb.RoomEvent(room_id="r1")) == "r1"
    assert room_of("typing", pb.TypingCommand(room_id="r2")) == "r2"
    assert room_of("read_marker", pb.ReadMarkerCommand(room_id="r3", event_id="e")) == "r3"
    call = pb.CallCommand(method="SendEvent")
    call.body.Pack(pb.SendEventRequest(event=pb.RoomEvent(room_id="r4")))
    assert room_of("call", call) == "r4"
    assert room_of("call", pb.CallCommand(method="GetHistory")) is None
    assert room_of("subscribe", pb.RoomsCommand(room_ids=["r1"])) is None


@pytest.fixture
def h():
    harness = Harness(
        HEARTBEAT_INTERVAL_SEC=10,
        CONNECTION_TIMEOUT_SEC=3000,
        PROFILE_EVENTS_PER_SECOND=2,
        PROFILE_EVENTS_BURST=3,
        ROOM_EVENTS_PER_SECOND=1,
        ROOM_EVENTS_BURST=4,
    )
    harness.core.rooms.update({"alice": ["r1"], "bob": ["r1"]})
    yield harness
    harness.stop()


def typing(connection, n, room="r1"):
    (result,) = [
        r.command_result
        for r in connection.command(request_id=f"t{n}", typing=pb.TypingCommand(room_id=room, typing=True))
        if r.command_result.request_id == f"t{n}"
    ]
    return result


EXHAUSTED = grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]


def test_the_profile_limit_holds_over_all_devices_of_the_profile(h):
    phone, laptop = h.connect("alice/phone"), h.connect("alice/laptop")
    results = [typing(device, n) for n, device in enumerate([phone, laptop, phone, laptop])]
    assert [r.error.code for r in results] == [0, 0, 0, EXHAUSTED]
    refused = results[3].error
    assert refused.meta["limit"] == "profile" and refused.meta["retry_after_ms"] == "500"
    assert "retry after 500 ms" in refused.message
    assert typing(h.connect("bob/phone"), 9).error.code == 0  # another profile: its own limit
    assert h.gateway.counts.limit_refused_counts() == {"profile": 1, "room": 0}


def test_the_room_limit_holds_over_every_sender(h):
    alice, bob = h.connect("alice/phone"), h.connect("bob/phone")
    codes = [typing(alice, 0).error.code, typing(bob, 1).error.code, typing(alice, 2).error.code]
    codes.append(typing(bob, 3).error.code)
    h.advance(0.5)  # the profiles' limits refill, the room's (1/s) not yet
    codes.append(typing(alice, 4).error.code)
    assert codes == [0, 0, 0, 0, EXHAUSTED]
    assert h.gateway.counts.limit_refused_counts() == {"profile": 0, "room": 1}


def test_the_limits_apply_to_forwarded_calls_outside_a_stream(h):
    from chatgateway.core.client import CoreError
    from chatgateway.sessions import forwarding

    request = pb.SearchRoomsRequest()
    outcomes = []
    for _ in range(4):
        d = defer.ensureDeferred(forwarding.forward(h.gateway, "SearchRooms", request, "alice/http"))
        d.addCallbacks(lambda _: outcomes.append("ok"), lambda f: outcomes.append(f.trap(CoreError) and f.value))
    assert outcomes[:3] == ["ok", "ok", "ok"]
    assert outcomes[3].code == grpc.StatusCode.RESOURCE_EXHAUSTED and outcomes[3].meta["limit"] == "profile"


class BrokenGcra:
    def check(self, limits):
        return defer.fail(ConnectionError("redis store at 127.0.0.1:1 is not connected"))


def test_with_the_store_unreachable_the_limits_fail_open_and_warn(h):
    from twisted.logger import globalLogPublisher

    h.gateway.limits._gcra = BrokenGcra()
    seen = []
    globalLogPublisher.addObserver(seen.append)
    try:
        alice = h.connect("alice/phone")
        codes = [typing(alice, n).error.code for n in range(6)]
    finally:
        globalLogPublisher.removeObserver(seen.append)
    assert codes == [0] * 6
    assert h.gateway.counts.limit_unchecked_counts() == {"profile": 6, "room": 6}
    warnings = [e for e in seen if "shared rate limits not checked" in e.get("log_format", "")]
    assert len(warnings) == 1  # at most one per WARN_EVERY_SEC


def test_the_per_connection_limit_still_holds_when_the_shared_ones_fail_open():
    h = Harness(MAX_EVENTS_PER_SECOND=2, PROFILE_EVENTS_PER_SECOND=100)
    h.core.rooms["alice"] = ["r1"]
    h.gateway.limits._gcra = BrokenGcra()
    alice = h.connect("alice/phone")
    codes = [typing(alice, n).error.code for n in range(3)]
    assert codes == [0, 0, EXHAUSTED]
    h.stop()


def test_limits_off_cost_nothing(h):
    off = Harness()
    assert not off.gateway.limits.enabled
    assert off.gateway.limits.admit("alice", "typing", pb.TypingCommand(room_id="r1")).called
    off.stop()


def test_a_refusal_is_an_exception_with_the_hint_rounded_up():
    refusal = LimitExceeded("room", 0.0101)
    assert refusal.retry_after_ms == 11 and refusal.meta == {"limit": "room", "retry_after_ms": "11"}
