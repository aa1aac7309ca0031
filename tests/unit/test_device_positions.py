"""Devices' positions kept server-side: batched at most once per heartbeat per device, written at
a disconnect, never moved back within an epoch; on task.Clock."""

import pytest
from test_resume_plan import CatchingSession
from twisted.internet import defer, task

from chatgateway.api import chat_pb2 as pb
from chatgateway.sessions import gateway as gateway_module
from chatgateway.sessions.devicepositions import DevicePositions
from chatgateway.store.resumepositions import MemoryResumePositions, parse_record
from support.wsharness import Harness


class Records:
    """An IResumePositions that records each batch."""

    def __init__(self):
        self.batches = []

    def save(self, records):
        self.batches.append({key: dict(value) for key, value in records.items()})
        return defer.succeed(None)


class FakeSession:
    def __init__(self, device, rooms):
        self.id = f"s-{device}"
        self.profile_id, self.device_id = "alice", device
        self.rooms = self.member_rooms = set(rooms)
        self.delivered = {}

    def position(self, room_id):
        return self.delivered.get(room_id)


def make():
    clock = task.Clock()
    records = Records()
    return DevicePositions(records, clock), records, clock


def test_one_sweep_writes_every_device_that_moved_in_one_batch_and_only_what_moved():
    positions, records, _ = make()
    phone, laptop = FakeSession("phone", ["r1", "r2"]), FakeSession("laptop", ["r1"])
    phone.delivered = {"r1": ("e", 3), "r2": ("e", 1)}
    laptop.delivered = {"r1": ("e", 3)}
    for session in (phone, laptop):
        positions.note(session)
    positions.flush()
    assert records.batches == [
        {("alice", "phone"): {"r1": ("e", 3), "r2": ("e", 1)}, ("alice", "laptop"): {"r1": ("e", 3)}}
    ]
    phone.delivered["r2"] = ("e", 2)
    for session in (phone, laptop):
        positions.note(session)
    positions.flush()
    assert records.batches[1] == {("alice", "phone"): {"r2": ("e", 2)}}
    positions.note(laptop)
    positions.flush()
    assert len(records.batches) == 2  # nothing moved: no write


def test_an_ack_counts_when_it_is_further_than_the_delivery():
    positions, records, _ = make()
    phone = FakeSession("phone", ["r1", "r2"])
    phone.delivered = {"r1": ("e", 3)}
    positions.acked(phone, pb.Ack(event_id="x", room_id="r1", epoch="e", offset=2))  # behind: no effect
    positions.acked(phone, pb.Ack(event_id="y", room_id="r2", epoch="e", offset=7))
    positions.acked(phone, pb.Ack(event_id="z", room_id="elsewhere", epoch="e", offset=7))  # not a member
    positions.acked(phone, pb.Ack(event_id="w"))  # no position
    positions.note(phone)
    positions.flush()
    assert records.batches == [{("alice", "phone"): {"r1": ("e", 3), "r2": ("e", 7)}}]


def test_the_disconnects_of_one_turn_are_written_in_one_batch_on_the_next():
    positions, records, clock = make()
    sessions = [FakeSession(f"d{i}", ["r1"]) for i in range(3)]
    for i, session in enumerate(sessions):
        session.delivered = {"r1": ("e", i + 1)}
        positions.closed(session)
    assert records.batches == []
    clock.advance(0)
    assert records.batches == [{("alice", f"d{i}"): {"r1": ("e", i + 1)} for i in range(3)}]
    assert not clock.getDelayedCalls()


def test_the_memory_record_keeps_the_furthest_within_an_epoch_and_expires():
    clock = task.Clock()
    records = MemoryResumePositions(60, clock)
    records.save({("alice", "phone"): {"r1": ("e", 5), "r2": ("e", 5)}})
    records.save({("alice", "phone"): {"r1": ("e", 3), "r2": ("new", 1)}})  # r1 back: kept; r2 new epoch
    assert records.load("alice", "phone").result == {"r1": ("e", 5), "r2": ("new", 1)}
    records.save({("alice", "phone"): {"r1": ("", 0), "r3": ("", 0)}})  # starts before a first event
    assert records.load("alice", "phone").result == {"r1": ("e", 5), "r2": ("new", 1), "r3": ("", 0)}
    clock.advance(60)
    assert records.load("alice", "phone").result == {}


def test_a_redis_hash_reads_back_as_positions():
    assert parse_record([b"r1", b"e:4", b"r2", b"bad"]) == {"r1": ("e", 4)}
    assert parse_record({"r1": "ab:cd:9"}) == {"r1": ("ab:cd", 9)}


@pytest.fixture
def harness(monkeypatch):
    monkeypatch.setattr(gateway_module, "Session", CatchingSession)
    CatchingSession.caught, CatchingSession.given = [], {}
    harness = Harness(HEARTBEAT_INTERVAL_SEC=10)
    harness.core.rooms["alice"] = ["r1"]
    yield harness
    harness.stop()


def test_the_gateway_writes_positions_once_per_heartbeat_and_at_the_close(harness):
    saves = []
    records = harness.gateway.resumption.records
    save = records.save
    records.save = lambda batch: saves.append(batch) or save(batch)
    c = harness.connect("alice/phone")
    (session,) = harness.gateway.registry.sessions
    CatchingSession.given[session.id] = {"r1": ("e", 1)}
    harness.advance(9)
    assert saves == []  # not before the heartbeat
    CatchingSession.given[session.id] = {"r1": ("e", 4)}
    harness.advance(1)
    assert saves == [{("alice", "phone"): {"r1": ("e", 4)}}]
    CatchingSession.given[session.id] = {"r1": ("e", 6)}
    harness.advance(5)
    assert len(saves) == 1  # at most once per heartbeat interval
    c.client.sendClose()
    harness.advance(0)
    assert not harness.gateway.registry.sessions
    harness.advance(0)  # the turn after the close
    assert saves[-1] == {("alice", "phone"): {"r1": ("e", 6)}}
    assert records.load("alice", "phone").result == {"r1": ("e", 6)}


def test_a_drain_writes_the_last_positions_before_it_returns(harness):
    harness.connect("alice/phone")
    (session,) = harness.gateway.registry.sessions
    CatchingSession.given[session.id] = {"r1": ("e", 9)}
    records = harness.gateway.resumption.records
    at_the_end = []  # the record when the drain returns (the store stops next)
    drained = harness.gateway.stopService()
    drained.addCallback(lambda _: at_the_end.append(records.load("alice", "phone").result))
    for _ in range(50):
        if drained.called:
            break
        harness.advance(0.5)
    assert at_the_end == [{"r1": ("e", 9)}]
