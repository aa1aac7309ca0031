"""chatgateway.sessions.resume: the plan per room, and what a session resumes from when it opens.

The catch-up itself is the session's (``Session.catch_up``); here a Session that records its
calls stands in, so the rules are checked on their own, on a task.Clock gateway.
"""

import pytest
from twisted.internet import defer

from chatgateway.api import chat_pb2 as pb
from chatgateway.sessions import gateway as gateway_module
from chatgateway.sessions.resume import ResumeRequest, plan
from chatgateway.sessions.session import Session
from support.wsharness import Harness


def test_an_explicit_position_wins_over_the_token_and_the_record():
    assert plan({"r"}, {"r": ("e", 3)}, {"r": ("e", 9)}, {"r": ("e", 8)}) == {"r": ("e", 3)}


def test_the_furthest_of_token_and_record_within_an_epoch_the_record_across_epochs():
    assert plan({"a", "b"}, {}, {"a": ("e", 9), "b": ("old", 9)}, {"a": ("e", 4), "b": ("new", 2)}) == {
        "a": ("e", 9),
        "b": ("new", 2),
    }
    assert plan({"a", "b"}, {}, {"a": ("e", 1)}, {"b": ("e", 2)}) == {"a": ("e", 1), "b": ("e", 2)}


def test_rooms_left_give_nothing_and_rooms_without_a_position_start_live():
    explicit = {"left": ("e", 1), "kept": ("e", 5)}
    assert plan({"kept", "joined"}, explicit, {"left": ("e", 9)}, {"left": ("e", 9)}) == {"kept": ("e", 5)}


def test_the_signing_in_request_gives_its_token_and_positions():
    request = pb.StreamRequest(
        auth_token="t",
        resume_token="from-frame",
        positions=[
            pb.RoomPosition(room_id="r1", epoch="e", offset=4),
            pb.RoomPosition(room_id="", epoch="e", offset=4),  # no room: ignored
            pb.RoomPosition(room_id="r2", epoch="", offset=4),  # an offset of no epoch: ignored
            pb.RoomPosition(room_id="r3", epoch="", offset=0),  # none of the room's events
        ],
    )
    resume = ResumeRequest.of(request, fallback_token="from-handshake")
    assert (resume.token, resume.positions) == ("from-frame", {"r1": ("e", 4), "r3": ("", 0)})
    assert ResumeRequest.of(pb.StreamRequest(auth_token="t"), "from-handshake").token == "from-handshake"
    assert not ResumeRequest.of(pb.StreamRequest(auth_token="t"))


class CatchingSession(Session):
    """A Session whose catch-up and positions are recorded instead of run."""

    __slots__ = ()
    caught = []  # (session id, room, epoch, offset), every instance's
    given = {}  # session id -> {room: (epoch, offset)}

    def catch_up(self, room_id, epoch, offset):
        self.caught.append((self.device_id, room_id, epoch, offset))
        return defer.succeed(None)

    def position(self, room_id):
        return self.given.get(self.id, {}).get(room_id)


@pytest.fixture
def harness(monkeypatch):
    monkeypatch.setattr(gateway_module, "Session", CatchingSession)
    CatchingSession.caught, CatchingSession.given = [], {}
    harness = Harness()
    harness.core.rooms["alice"] = ["r1", "r2"]
    yield harness
    harness.stop()


def connected_of(connection):
    (event,) = connection.of("connected")
    return event.connected


def first_frame(harness, **fields):
    c = harness.connect()
    c.send(pb.StreamRequest(auth_token="alice/phone", **fields))
    harness.flush()
    return c


def test_a_session_without_resume_info_or_record_starts_live_with_a_token(harness):
    connected = connected_of(harness.connect("alice/phone"))
    assert not connected.resumed
    assert CatchingSession.caught == []
    claims = harness.gateway.resumption.tokens.read(connected.resume_token, "alice", "phone")
    assert claims.positions == {"r1": ("", 0), "r2": ("", 0)}  # before the rooms' first events


def test_explicit_positions_of_the_first_frame_catch_up_in_member_rooms_only(harness):
    positions = [
        pb.RoomPosition(room_id="r1", epoch="e1", offset=5),
        pb.RoomPosition(room_id="gone", epoch="e1", offset=5),  # left while away
    ]
    c = first_frame(harness, positions=positions)
    connected = connected_of(c)
    assert connected.resumed
    assert CatchingSession.caught == [("phone", "r1", "e1", 5)]
    token = harness.gateway.resumption.tokens.read(connected.resume_token, "alice", "phone")
    assert token.positions == {"r1": ("e1", 5), "r2": ("", 0)}  # where the new session starts


def test_the_token_of_connected_resumes_the_device_on_another_gateway(harness):
    first = first_frame(harness, positions=[pb.RoomPosition(room_id="r2", epoch="e2", offset=8)])
    token = connected_of(first).resume_token
    first.client.sendClose()
    harness.flush()
    CatchingSession.caught.clear()
    other = harness.peer("gw-other")  # the same JWT_SECRET: the same token key
    try:
        c = other.connect()
        c.send(pb.StreamRequest(auth_token="alice/phone", resume_token=token))
        other.flush()
        assert connected_of(c).resumed
        assert CatchingSession.caught == [("phone", "r2", "e2", 8)]
    finally:
        other.stop()


def test_a_token_of_another_device_is_ignored_with_a_notice_and_the_connect_goes_on(harness):
    token = harness.gateway.resumption.tokens.issue("alice", "laptop", {"r1": ("e1", 3)})
    c = first_frame(harness, resume_token=token)
    assert c.kinds()[:2] == ["connected", "error"]
    assert not connected_of(c).resumed and CatchingSession.caught == []
    (notice,) = c.of("error")
    assert notice.error.status == "FAILED_PRECONDITION"
    assert "another profile or device" in notice.error.message
    assert c.closed is None


def test_a_tampered_token_is_ignored_but_explicit_positions_still_resume(harness):
    token = harness.gateway.resumption.tokens.issue("alice", "phone", {"r1": ("e1", 3)})
    c = first_frame(
        harness, resume_token=token[:-2] + "xx", positions=[pb.RoomPosition(room_id="r2", epoch="e", offset=1)]
    )
    assert "bad signature" in c.of("error")[0].error.message
    assert connected_of(c).resumed
    assert CatchingSession.caught == [("phone", "r2", "e", 1)]


def test_the_handshake_query_carries_the_token(harness):
    token = harness.gateway.resumption.tokens.issue("alice", "phone", {"r1": ("e1", 3)})
    c = harness.connect("alice/phone", headers={}, auth="header")
    assert not connected_of(c).resumed  # no ?resume_token=
    harness.flush()
    url_connection = harness.connect(f"alice/phone&resume_token={token}", auth="query")
    assert connected_of(url_connection).resumed
    assert CatchingSession.caught == [("phone", "r1", "e1", 3)]


def test_the_record_resumes_a_device_that_comes_back_without_token_or_positions(harness):
    harness.gateway.resumption.records.save({("alice", "phone"): {"r1": ("e1", 11), "gone": ("e1", 2)}})
    assert connected_of(harness.connect("alice/phone")).resumed
    assert CatchingSession.caught == [("phone", "r1", "e1", 11)]


def test_a_record_that_cannot_be_read_leaves_the_connect_to_go_on(harness):
    harness.gateway.resumption.records.load = lambda p, d: defer.fail(ConnectionError("redis down"))
    connected = connected_of(harness.connect("alice/phone"))
    assert not connected.resumed and connected.room_ids == ["r1", "r2"]


# ---------------------------------------------------------------- the gRPC Connect stream


class _Handoff:
    def __init__(self):
        self.items = []

    def put(self, stream, item):
        self.items.append(item)


class _Edge:
    def __init__(self, harness):
        self.gateway = harness.gateway
        self.devices = set()
        self.stopping = False
        self.handoff = _Handoff()


def grpc_connected(harness, token=None, resume_token="", first=None):
    from chatgateway.edge import grpcstream

    edge = _Edge(harness)
    device = grpcstream.GrpcDevice(edge, object(), "", resume_token)
    device.start(token)
    if first is not None:
        device.received(first)
    harness.flush()
    events = [pb.ServerEvent.FromString(i) for i in edge.handoff.items if isinstance(i, bytes)]
    (connected,) = [e for e in events if e.HasField("connected")]
    return connected.connected


def test_the_grpc_stream_takes_the_token_from_its_metadata(harness):
    token = harness.gateway.resumption.tokens.issue("alice", "phone", {"r2": ("e", 6)})
    assert grpc_connected(harness, token="alice/phone", resume_token=token).resumed
    assert CatchingSession.caught == [("phone", "r2", "e", 6)]


def test_the_grpc_stream_takes_token_and_positions_from_its_first_message(harness):
    first = pb.StreamRequest(auth_token="alice/phone", positions=[pb.RoomPosition(room_id="r1", epoch="e", offset=2)])
    assert grpc_connected(harness, first=first).resumed
    assert CatchingSession.caught == [("phone", "r1", "e", 2)]


def test_resume_info_sent_after_the_session_opened_is_ignored(harness):
    c = harness.connect("alice/phone")
    c.send(pb.StreamRequest(positions=[pb.RoomPosition(room_id="r1", epoch="e", offset=2)]))
    harness.flush()
    assert CatchingSession.caught == [] and c.closed is None


def test_opens_are_counted_by_how_their_resume_went(harness):
    harness.connect("alice/phone")
    first_frame(harness, positions=[pb.RoomPosition(room_id="r1", epoch="e", offset=1)])
    first_frame(harness, resume_token="r1.forged.token")
    assert harness.gateway.counts.resume_counts() == {"resumed": 1, "live": 1, "token_ignored": 1}


def test_a_record_that_does_not_come_leaves_the_connect_to_go_on_after_a_while(harness):
    from chatgateway.sessions.resume import RECORD_WAIT_SEC

    harness.gateway.resumption.records.load = lambda p, d: defer.Deferred()  # a store that never answers
    c = harness.connect("alice/phone")
    assert c.of("connected") == []
    harness.advance(RECORD_WAIT_SEC)
    assert not connected_of(c).resumed


def test_a_reconnect_that_replaces_a_session_of_this_gateway_resumes_from_what_that_one_was_given(harness):
    first = harness.connect("alice/phone")  # its connection then goes silent (a network blink)
    (older,) = harness.gateway.registry.sessions
    CatchingSession.given[older.id] = {"r1": ("e", 12)}  # given, and never written to the record
    harness.connect("alice/phone")
    harness.flush()
    assert first.closed is not None  # replaced: 4001
    assert CatchingSession.caught == [("phone", "r1", "e", 12)]


def history_with_join(profile, offset, epoch="e"):
    join = pb.RoomEvent(id="j", room_id="r2", type=pb.RoomEvent.SYSTEM, epoch=epoch, offset=offset)
    join.payload.update({"action": "member_added", "profile_id": profile})
    newer = pb.RoomEvent(id="n", room_id="r2", type=pb.RoomEvent.TEXT, epoch=epoch, offset=offset + 1)
    return pb.GetHistoryResponse(events=[newer, join])  # newest first


def test_a_room_joined_while_away_catches_up_from_the_join_found_at_the_core(harness):
    harness.gateway.resumption.records.save({("alice", "phone"): {"r1": ("e", 3)}})  # r2 unknown to it
    asked = []
    call = harness.core.call

    def core(method, request, *args, **kwargs):
        if method != "GetHistory":
            return call(method, request, *args, **kwargs)
        asked.append(request.room_id)
        return defer.succeed(history_with_join("alice", 7))

    harness.core.call = core
    assert connected_of(harness.connect("alice/phone")).resumed
    assert asked == ["r2"]
    assert sorted(CatchingSession.caught) == [("phone", "r1", "e", 3), ("phone", "r2", "e", 6)]


def test_no_join_is_looked_for_without_a_record_nor_when_it_is_not_found(harness):
    asked = []
    harness.core.call = lambda method, request, *a, **k: (
        asked.append(method)
        or defer.succeed(
            history_with_join("bob", 7)  # someone else's join
        )
    )
    harness.core.rooms["alice"] = ["r1", "r2"]
    harness.gateway.core.call = harness.core.call
    harness.hub.memberships.rooms["alice"] = ({"r1", "r2"}, harness.clock.seconds() + 600)
    harness.connect("alice/phone")  # a new device: no record, nothing looked for
    assert "GetHistory" not in asked and CatchingSession.caught == []
    harness.gateway.resumption.records.save({("alice", "tablet"): {"r1": ("e", 3)}})
    harness.connect("alice/tablet")
    assert asked.count("GetHistory") == 1
    assert CatchingSession.caught == [("tablet", "r1", "e", 3)]  # r2: not found, live
