"""chatgateway.sessions.roomstarts: a room's position read once per gateway for the sessions
that start in it, kept a while, never kept for a room without events; on task.Clock."""

import pytest_twisted
from twisted.internet import defer, task

from chatgateway.bus.roomstream import StreamRead
from chatgateway.sessions.roomstarts import LEARNED_SEC, MAX_READS_PER_OPEN, READ_WAIT_SEC, RoomStarts


class Bus:
    def __init__(self):
        self.reads = []  # (room, Deferred)

    def read_room_stream(self, room_id, after, count):
        d = defer.Deferred()
        self.reads.append((room_id, d))
        return d

    def answer(self, room_id, epoch, top):
        for room, d in list(self.reads):
            if room == room_id and not d.called:
                d.callback(StreamRead(epoch, top, []))


def make(known=None):
    clock, bus = task.Clock(), Bus()
    return RoomStarts(bus, ({} if known is None else known).get, clock), bus, clock


@pytest_twisted.ensureDeferred
async def test_sessions_opening_at_once_share_one_read_and_later_ones_none():
    starts, bus, clock = make(known={"busy": ("e", 9)})
    first = defer.Deferred.fromCoroutine(starts.starts(["busy", "quiet"]))
    second = defer.Deferred.fromCoroutine(starts.starts(["quiet"]))
    assert [room for room, _ in bus.reads] == ["quiet"]  # the gateway's own position needs no read
    bus.answer("quiet", "q", 4)
    assert await first == {"busy": ("e", 9), "quiet": ("q", 4)}
    assert await second == {"quiet": ("q", 4)}
    assert await starts.starts(["quiet"]) == {"quiet": ("q", 4)}  # learned
    assert len(bus.reads) == 1
    clock.advance(LEARNED_SEC)
    later = defer.Deferred.fromCoroutine(starts.starts(["quiet"]))
    assert len(bus.reads) == 2  # read again
    bus.answer("quiet", "q", 6)
    assert await later == {"quiet": ("q", 6)}


@pytest_twisted.ensureDeferred
async def test_a_room_without_events_starts_before_its_first_until_the_gateway_knows_better():
    known = {}
    starts, bus, _ = make(known=known)
    d = defer.Deferred.fromCoroutine(starts.starts(["new"]))
    bus.answer("new", "", 0)
    assert await d == {"new": ("", 0)}
    assert await starts.starts(["new"]) == {"new": ("", 0)}
    known["new"] = ("e", 1)  # its first event, delivered by this gateway
    assert await starts.starts(["new"]) == {"new": ("e", 1)}
    assert len(bus.reads) == 1


@pytest_twisted.ensureDeferred
async def test_fresh_rooms_are_read_even_when_known_and_reads_are_bounded():
    starts, bus, clock = make(known={"r": ("e", 1)})
    fresh = defer.Deferred.fromCoroutine(starts.starts(["r"], fresh={"r"}))
    assert len(bus.reads) == 1
    bus.answer("r", "e", 3)
    assert await fresh == {"r": ("e", 3)}
    many = [f"room{i}" for i in range(MAX_READS_PER_OPEN + 10)]
    waiting = defer.Deferred.fromCoroutine(starts.starts(many))
    assert len(bus.reads) == 1 + MAX_READS_PER_OPEN
    clock.advance(READ_WAIT_SEC)  # no answer in time: those rooms start without a position
    assert await waiting == {}


@pytest_twisted.ensureDeferred
async def test_a_read_that_fails_gives_no_start():
    starts, bus, _ = make()
    d = defer.Deferred.fromCoroutine(starts.starts(["r"]))
    bus.reads[0][1].errback(ConnectionError("redis down"))
    assert await d == {}
