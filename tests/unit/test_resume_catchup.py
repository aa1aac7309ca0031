"""A device resumed by the real catch-up engine, in process (memory hub and store, task.Clock):
every event it missed, once and in order, then live events without gap or duplicate."""

import uuid

import pytest

from chatgateway.api import chat_pb2 as pb
from chatgateway.bus import channels
from support.wsharness import Harness

ROOM = "r1"


@pytest.fixture
def harness():
    harness = Harness()
    harness.core.rooms["alice"] = [ROOM]
    harness.core.rooms["bob"] = [ROOM]
    yield harness
    harness.stop()


def publish(harness, n):
    event = pb.RoomEvent(id=uuid.uuid4().hex, room_id=ROOM, sender_id="bob", type=pb.RoomEvent.TEXT)
    event.payload.update({"text": f"m{n}"})
    harness.gateway.publish(channels.room(ROOM), pb.ServerEvent(id=event.id, message=event))
    harness.flush()


def texts(connection):
    return [e.message.payload["text"] for e in connection.of("message")]


def offsets(connection):
    return [e.offset for e in connection.of("message")]


def away_and_back(harness, reconnect):
    """m1..m3 live, m4..m6 while away, then m7 live after ``reconnect(first)``: the new connection."""
    first = harness.connect("alice/phone")
    for n in (1, 2, 3):
        publish(harness, n)
    assert texts(first) == ["m1", "m2", "m3"]
    first.client.sendClose()
    harness.advance(0)
    harness.advance(0)
    for n in (4, 5, 6):
        publish(harness, n)
    second = reconnect(first)
    harness.run_for(1, step=0.1)  # the catch-up is paced over reactor turns
    publish(harness, 7)
    harness.run_for(1, step=0.1)
    return first, second


def test_the_token_and_the_last_position_resume_exactly(harness):
    def reconnect(first):
        (connected,) = first.of("connected")
        last = first.of("message")[-1]
        c = harness.connect()
        c.send(
            pb.StreamRequest(
                auth_token="alice/phone",
                resume_token=connected.connected.resume_token,
                positions=[pb.RoomPosition(room_id=ROOM, epoch=last.epoch, offset=last.offset)],
            )
        )
        return c

    first, second = away_and_back(harness, reconnect)
    assert second.of("connected")[0].connected.resumed
    assert texts(second) == ["m4", "m5", "m6", "m7"]
    assert offsets(second) == [offsets(first)[-1] + i for i in (1, 2, 3, 4)]


def test_without_token_or_positions_the_record_of_the_close_resumes_the_device(harness):
    first, second = away_and_back(harness, lambda first: harness.connect("alice/phone"))
    assert second.of("connected")[0].connected.resumed
    assert texts(second) == ["m4", "m5", "m6", "m7"]


def test_a_device_that_left_the_room_while_away_gets_nothing_of_it(harness):
    def reconnect(first):
        harness.core.rooms["alice"] = []
        harness.hub.memberships.rooms.clear()  # the cache forgets: the core says no rooms now
        return harness.connect("alice/phone")

    _, second = away_and_back(harness, reconnect)
    assert not second.of("connected")[0].connected.resumed
    assert texts(second) == []


@pytest.mark.parametrize("earlier_events", [0, 2])
def test_a_device_that_left_a_quiet_room_gets_what_came_while_it_was_away(harness, earlier_events):
    # The room had no event (or none since this gateway subscribed it) while the device was
    # connected: where it started is read at its open, and the record keeps it.
    for n in range(earlier_events):
        publish(harness, n)
    first = harness.connect("alice/phone")
    first.client.sendClose()
    harness.advance(0)
    harness.advance(0)
    for n in (10, 11, 12):
        publish(harness, n)
    second = harness.connect("alice/phone")
    harness.run_for(1, step=0.1)
    assert second.of("connected")[0].connected.resumed
    assert texts(second) == ["m10", "m11", "m12"]


def test_the_token_alone_resumes_a_quiet_room_when_the_record_is_gone(harness):
    first = harness.connect("alice/phone")
    token = first.of("connected")[0].connected.resume_token
    first.client.sendClose()
    harness.advance(0)
    harness.advance(0)
    harness.gateway.resumption.records.records.clear()  # e.g. the store lost it
    for n in (1, 2):
        publish(harness, n)
    second = harness.connect()
    second.send(pb.StreamRequest(auth_token="alice/phone", resume_token=token))
    harness.run_for(1, step=0.1)
    assert texts(second) == ["m1", "m2"]
