"""Catch-up (chatgateway.sessions.catchup, sessions.streamreads): a session given every event
of a room after a position, merged exactly at the seam with the live events that arrive
meanwhile; holes in a session's own delivery; reads shared by many sessions; what the
stream no longer holds asked of the core; gap events for what neither holds."""

import grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.internet import defer, task

from chatgateway import config
from chatgateway.api import chat_pb2 as pb
from chatgateway.auth.tokens import Claims
from chatgateway.bus import channels
from chatgateway.bus.memory import MemoryBus, MemoryHub
from chatgateway.core.client import CoreError
from chatgateway.sessions.fanout import EncodedEvent
from chatgateway.sessions.gateway import Gateway
from chatgateway.sessions.session import Session
from chatgateway.store.memory import MemoryStore

ROOM = "r"


class HeldBus(MemoryBus):
    """The in-process bus, but stream reads wait for ``answer()`` while ``hold`` is set."""

    def __init__(self, hub):
        super().__init__(hub)
        self.hold = False
        self.reads = []  # (room, after, count, Deferred)
        self.unconfirmed = {}  # channel -> Deferreds of subscriptions Redis has not confirmed yet
        self.failing = 0  # the next reads that fail

    def read_room_stream(self, room_id, after, count=500):
        if self.failing:
            self.failing -= 1
            return defer.fail(ConnectionError("redis away"))
        if not self.hold:
            return super().read_room_stream(room_id, after, count)
        d = defer.Deferred()
        self.reads.append((room_id, after, count, d))
        return d

    def subscribe(self, channel):
        """Confirmed at once, unless ``unconfirmed`` holds the channel: then when ``confirm`` is called."""
        super().subscribe(channel)
        if channel in self.unconfirmed:
            d = defer.Deferred()
            self.unconfirmed[channel].append(d)
            return d
        return defer.succeed(None)

    def confirm(self, channel):
        for d in self.unconfirmed.pop(channel):
            d.callback(None)

    def answer(self):
        """Answer the oldest held read with what the stream holds now."""
        room_id, after, count, d = self.reads.pop(0)
        d.callback(self.hub.streams.read(room_id, after, count))


class HistoryCore:
    """A core whose GetHistory answers from ``kept`` (offset -> RoomEvent) by position."""

    def __init__(self):
        self.kept = {}
        self.calls = []
        self.fail = None

    def call(self, method, request, token, device_id="", **_):
        self.calls.append((method, request, token))
        if method != "GetHistory":
            return defer.succeed([])
        if self.fail is not None:
            return defer.fail(CoreError(self.fail, "core away"))
        events = [
            e
            for _, e in sorted(self.kept.items(), key=lambda item: item[1].offset)
            if e.offset > request.after_offset and e.epoch == request.after_epoch
        ]
        page = events[: request.limit]
        more = len(events) > request.limit
        return defer.succeed(pb.GetHistoryResponse(events=page, next_cursor="more" if more else ""))


class Device:
    """A session transport recording what reaches the device; ``full`` makes its outbox refuse room events."""

    transport_name = "test"

    def __init__(self):
        self.events = []
        self.room = None  # room events the outbox takes before it is full (None: no end)
        self.session = None
        self.closed = None

    def send_event(self, event):
        if event.HasField("gap") and self.room is not None:  # a gap waits as room events do
            if self.room <= 0:
                self.session.fell_behind()
                return
            self.room -= 1
        self.events.append(event)

    def send_encoded(self, encoded):
        if self.room is not None and encoded.position is not None:
            if self.room <= 0:
                self.session.fell_behind()
                return
            self.room -= 1
        self.events.append(encoded.event)

    def ping(self):
        pass

    def close(self, code, reason):
        self.closed = (code, reason)
        self.session.closed_by_transport()

    def offsets(self):
        return [e.offset for e in self.events if e.HasField("message")]

    def gaps(self):
        return [(e.gap.first_offset, e.gap.last_offset) for e in self.events if e.HasField("gap")]


class Harness:
    def __init__(self, **settings):
        env = {"JWT_SECRET": "unit-test-secret", "GATEWAY_ID": "gw-test"}
        env.update({k: str(v) for k, v in settings.items()})
        self.clock = task.Clock()
        self.clock.advance(1_000_000)
        self.hub = MemoryHub(self.clock)
        self.bus = HeldBus(self.hub)
        self.core = HistoryCore()
        self.gateway = Gateway(config.load(env), self.clock, None, self.core, self.bus, MemoryStore(), clock=self.clock)
        self.gateway.startService()

    def session(self, profile="p", rooms=(ROOM,)):
        device = Device()
        claims = Claims(profile_id=profile, device_id=None, expires_at=2e9, valid_until=2e9, claims={"sub": profile})
        session = Session(self.gateway, device, claims, profile, "d", list(rooms))
        device.session = session
        self.gateway.registry.add(session)
        return session, device

    def publish(self, count=1, live=True, room=ROOM):
        """``count`` messages by the publish contract; ``live``: pub/sub delivers them too."""
        for _ in range(count):
            n = self.hub.streams.rooms.get(room, [None, 0])[1] + 1
            event = pb.ServerEvent(id=f"e{n}", message=pb.RoomEvent(id=f"e{n}", room_id=room, type=pb.RoomEvent.TEXT))
            payload = self.hub.streams.append(room, event.SerializeToString())
            if live:
                self.hub.deliver(channels.room(room), payload)
        self.run()

    def epoch(self, room=ROOM):
        return self.hub.streams.rooms[room][0]

    def run(self, turns=50):
        for _ in range(turns):
            self.clock.advance(0)

    def reads(self):
        return self.gateway.counts.catchup_read_counts()


def test_catch_up_gives_the_events_after_the_position_then_live_with_the_seam_exact():
    h = Harness()
    h.publish(10, live=False)  # the room's history, before the device came back
    session, device = h.session()
    h.bus.hold = True
    live = session.catch_up(ROOM, h.epoch(), 3)
    assert ROOM in session.catching and not live.called
    h.publish(2)  # 11, 12 arrive live while the read is in flight: held
    assert device.offsets() == []
    h.bus.answer()  # the stream: 4..12 (it has the live ones too)
    h.run()
    assert device.offsets() == list(range(4, 13))
    assert live.called and session.catching == {}
    assert session.position(ROOM) == (h.epoch(), 12)
    h.bus.hold = False
    h.publish(1)
    assert device.offsets() == list(range(4, 14))


def test_live_events_newer_than_the_read_are_merged_after_it():
    h = Harness()
    h.publish(5, live=False)
    session, device = h.session()
    h.bus.hold = True
    session.catch_up(ROOM, h.epoch(), 2)
    h.bus.answer()  # 3..5, read before 6 and 7 are published
    h.publish(2)  # not yet given: the read's events are paced
    h.run()
    assert device.offsets() == [3, 4, 5, 6, 7]
    assert session.catching == {}


def test_a_hole_in_the_held_events_reads_again_before_going_live():
    h = Harness()
    h.publish(3, live=False)
    session, device = h.session()
    h.bus.hold = True
    session.catch_up(ROOM, h.epoch(), 0)
    h.publish(1, live=False)  # 4: lost on pub/sub
    h.publish(1)  # 5, held
    h.reads_before = len(h.bus.reads)
    h.bus.hold = False
    h.bus.reads.pop(0)[3].callback(h.hub.streams.read(ROOM, 0, 3))  # a read that saw 1..3 only
    h.run()
    assert device.offsets() == [1, 2, 3, 4, 5]
    assert session.catching == {}


def test_a_position_at_or_beyond_the_rooms_last_offset_gives_nothing():
    h = Harness()
    h.publish(4, live=False)
    session, device = h.session()
    assert session.catch_up(ROOM, h.epoch(), 4).called
    other, other_device = h.session("q")
    assert other.catch_up(ROOM, h.epoch(), 99).called
    h.run()
    assert device.offsets() == [] and other_device.offsets() == []
    assert other.position(ROOM) == (h.epoch(), 4)  # not 99: the next live event is 5
    h.publish(1)
    assert device.offsets() == [5] and other_device.offsets() == [5]


def test_a_room_the_session_is_not_given_and_an_empty_epoch_are_live_at_once():
    h = Harness()
    h.publish(3, live=False)
    session, device = h.session()
    assert session.catch_up("elsewhere", h.epoch(), 0).called
    assert session.catch_up(ROOM, "", 0).called
    h.run()
    assert device.offsets() == [] and session.catching == {}


def test_a_hole_in_a_sessions_live_delivery_is_caught_up_from_the_stream():
    h = Harness()
    session, device = h.session()
    h.publish(3)
    assert device.offsets() == [1, 2, 3]
    h.publish(2, live=False)  # 4 and 5 never reach this session (shed, say)
    h.publish(1)  # 6: a hole for the gateway too, which fills it; and for the session
    h.run()
    assert device.offsets() == [1, 2, 3, 4, 5, 6]
    # Given directly to the session, beyond its next: caught up in order, nothing doubled.
    h.publish(2, live=False)  # 7, 8
    stray = h.hub.streams.append(ROOM, pb.ServerEvent(id="e9", message=pb.RoomEvent(id="e9")).SerializeToString())
    event = pb.ServerEvent.FromString(stray)
    session.deliver(EncodedEvent(event, stray, (ROOM, event.epoch, event.offset)))
    h.run()
    assert device.offsets() == list(range(1, 10))
    session.deliver(EncodedEvent(event, stray, (ROOM, event.epoch, event.offset)))  # again: dropped
    assert device.offsets() == list(range(1, 10))


def test_many_sessions_catching_up_in_one_room_share_one_stream_read():
    h = Harness()
    h.publish(100, live=False)
    h.bus.hold = True
    sessions = [h.session(f"p{i}") for i in range(200)]
    done = [s.catch_up(ROOM, h.epoch(), 0 if i % 2 else 50) for i, (s, _) in enumerate(sessions)]
    assert len(h.bus.reads) == 2  # after 0 and after 50: two ranges
    h.bus.answer()
    h.bus.answer()
    h.run(500)
    assert all(d.called for d in done)
    for i, (_, device) in enumerate(sessions):
        assert device.offsets() == list(range(1 if i % 2 else 51, 101))
    assert h.reads() == {"stream": 2, "core": 0}
    # Later sessions are served from the room's window, kept current by live events.
    h.bus.hold = False
    h.publish(5)
    late, late_device = h.session("late")
    late.catch_up(ROOM, h.epoch(), 20)
    h.run()
    assert late_device.offsets() == list(range(21, 106))
    assert h.reads() == {"stream": 2, "core": 0}


def test_catch_up_is_paced_so_the_reactor_keeps_turning():
    h = Harness()
    h.publish(300, live=False)
    sessions = [h.session(f"p{i}") for i in range(20)]
    pacer = h.gateway.catchups.pacer
    run, per_turn = pacer._run, []

    def counted():
        before = sum(len(device.offsets()) for _, device in sessions)
        run()
        per_turn.append(sum(len(device.offsets()) for _, device in sessions) - before)

    pacer._run = counted
    for session, _ in sessions:
        session.catch_up(ROOM, h.epoch(), 0)
    h.run(100)
    assert all(device.offsets() == list(range(1, 301)) for _, device in sessions)
    assert sum(per_turn) == 6000 and max(per_turn) <= 600  # about fanout.CHUNK a turn, not 6,000 at once
    assert len(per_turn) >= 10


def keep_in_core(h, offsets, room=ROOM):
    """The core's history holds the messages of these offsets, with their positions."""
    for offset in offsets:
        h.core.kept[offset] = pb.RoomEvent(id=f"e{offset}", room_id=room, epoch=h.epoch(room), offset=offset)


def test_what_the_stream_no_longer_holds_comes_from_the_core_once_for_every_session():
    h = Harness()
    h.hub.streams.limit(5, 86400)
    h.publish(20, live=False)  # the stream keeps 16..20
    keep_in_core(h, range(1, 21))
    sessions = [h.session(f"p{i}") for i in range(30)]
    for session, _ in sessions:
        session.catch_up(ROOM, h.epoch(), 2)
    h.run(200)
    for session, device in sessions:
        assert device.offsets() == list(range(3, 21)) and device.gaps() == []
        assert session.catching == {}
    assert h.reads() == {"stream": 1, "core": 1}
    assert [r.after_offset for _, r, _ in h.core.calls] == [2]
    request = h.core.calls[0][1]
    assert request.direction == pb.GetHistoryRequest.FORWARD and request.after_epoch == h.epoch()


def test_what_neither_the_stream_nor_the_core_holds_is_a_gap_event_with_its_positions():
    h = Harness()
    h.hub.streams.limit(5, 86400)
    h.publish(20, live=False)  # the stream keeps 16..20
    keep_in_core(h, [3, 4, 5, 9, 10])  # the core lost 6..8 and 11..15
    session, device = h.session()
    session.catch_up(ROOM, h.epoch(), 2)
    h.run()
    kinds = [("gap", e.gap.first_offset, e.gap.last_offset) if e.HasField("gap") else e.offset for e in device.events]
    assert kinds == [3, 4, 5, ("gap", 6, 8), 9, 10, ("gap", 11, 15), 16, 17, 18, 19, 20]
    gap = next(e.gap for e in device.events if e.HasField("gap"))
    assert gap.room_id == ROOM and gap.epoch == h.epoch() and gap.reason
    assert h.gateway.counts.gaps_sent_count() == 2
    h.publish(1)
    assert device.offsets()[-1] == 21 and session.catching == {}


def test_a_core_that_cannot_answer_leaves_a_gap_naming_the_range_and_why():
    h = Harness()
    h.hub.streams.limit(5, 86400)
    h.publish(20, live=False)
    h.core.fail = grpc.StatusCode.UNAVAILABLE
    session, device = h.session()
    session.catch_up(ROOM, h.epoch(), 2)
    h.run()
    assert device.gaps() == [(3, 15)]
    assert "UNAVAILABLE" in next(e.gap.reason for e in device.events if e.HasField("gap"))
    assert device.offsets() == [16, 17, 18, 19, 20]


def test_a_position_of_another_epoch_takes_that_epoch_from_the_core_then_the_new_stream():
    h = Harness()
    h.publish(3, live=False)
    old = "0ld0ld0ld0ld0ld0"
    for offset in (5, 6):
        h.core.kept[offset] = pb.RoomEvent(id=f"old{offset}", room_id=ROOM, epoch=old, offset=offset)
    session, device = h.session()
    session.catch_up(ROOM, old, 4)
    h.run()
    assert [(e.epoch, e.offset) for e in device.events] == [(old, 5), (old, 6)] + [(h.epoch(), n) for n in (1, 2, 3)]
    assert session.position(ROOM) == (h.epoch(), 3) and session.catching == {}


def test_a_device_whose_outbox_is_full_falls_behind_then_catches_up_when_it_drains():
    h = Harness()
    session, device = h.session()
    h.publish(3)
    device.room = 0  # its outbox is full
    h.publish(4)  # 4 does not fit: behind; 5..7 are not even tried
    assert session.behind and device.offsets() == [1, 2, 3] and device.closed is None
    assert session.catching[ROOM].behind
    device.room = None
    session.drained()
    h.run()
    assert device.offsets() == list(range(1, 8)) and not session.behind and session.catching == {}
    h.publish(1)
    assert device.offsets() == list(range(1, 9))
    assert h.gateway.counts.behind_count() == 1


def test_the_behind_and_catch_up_cycle_repeats_until_the_device_is_live_again():
    h = Harness()
    session, device = h.session()
    h.publish(2)
    device.room = 0
    h.publish(20)  # behind at 2
    for _ in range(6):  # it drains a little at a time: 3 events fit per drain
        device.room = 3
        session.drained()
        h.run()
        h.publish(1)  # live traffic meanwhile
    device.room = None
    session.drained()
    h.run()
    assert device.offsets() == list(range(1, 29))  # each once, in order
    assert session.catching == {} and not session.behind
    assert h.gateway.counts.behind_count() == 7


def test_a_device_behind_that_never_drains_is_closed_4429():
    h = Harness(BEHIND_DRAIN_SEC=10)
    session, device = h.session()
    h.publish(1)
    device.room = 0
    h.publish(1)
    h.clock.advance(9)
    assert device.closed is None
    h.clock.advance(1)
    assert device.closed[0] == 4429 and session.closed


def test_a_device_that_drains_in_time_is_not_closed():
    h = Harness(BEHIND_DRAIN_SEC=10)
    session, device = h.session()
    h.publish(1)
    device.room = 0
    h.publish(1)
    h.clock.advance(5)
    device.room = None
    session.drained()
    h.clock.advance(20)
    h.run()
    assert device.closed is None and device.offsets() == [1, 2]


def errors(device):
    return [e.error.status for e in device.events if e.HasField("error")]


def test_events_shed_under_overload_are_caught_up_from_the_stream_not_reported_lost():
    h = Harness()
    h.gateway.fanout.max_backlog = 50
    sessions = [h.session(f"p{i}") for i in range(40)]
    h.publish(1)
    h.bus.hold = False
    for _ in range(30):  # one burst: past the fan-out's budget, then past its backlog bound
        n = h.hub.streams.rooms[ROOM][1] + 1
        event = pb.ServerEvent(id=f"e{n}", message=pb.RoomEvent(id=f"e{n}", room_id=ROOM))
        h.hub.deliver(channels.room(ROOM), h.hub.streams.append(ROOM, event.SerializeToString()))
    assert sum(h.gateway.counts.dropped_counts().values()) > 0  # events were shed
    h.run(200)
    for session, device in sessions:
        assert device.offsets() == list(range(1, 32)) and errors(device) == []
        assert session.catching == {}
    assert h.reads()["core"] == 0


def test_a_stream_lost_gives_the_old_epoch_from_the_core_then_the_new_one_without_data_loss():
    h = Harness()
    session, device = h.session()
    h.publish(3)
    old = h.epoch()
    for offset in (4, 5):  # published, stored by the core, then Redis lost the stream
        h.core.kept[offset] = pb.RoomEvent(id=f"old{offset}", room_id=ROOM, epoch=old, offset=offset)
    del h.hub.streams.rooms[ROOM]
    h.publish(2)  # the new epoch's 1 and 2
    h.run()
    assert [(e.epoch, e.offset) for e in device.events] == [(old, n) for n in range(1, 6)] + [
        (h.epoch(), 1),
        (h.epoch(), 2),
    ]
    assert errors(device) == [] and session.catching == {}


def test_a_room_the_gateways_fill_found_trimmed_is_caught_up_per_session_from_the_core():
    h = Harness()
    h.hub.streams.limit(5, 86400)
    session, device = h.session()
    h.publish(2)
    keep_in_core(h, range(3, 9))
    h.publish(10, live=False)  # 3..12 missed on pub/sub; the stream keeps 8..12
    h.publish(1)  # 13: the gateway's fill finds the stream trimmed past 2
    h.run()
    assert device.offsets() == list(range(1, 14))
    assert device.gaps() == [] and errors(device) == []


def test_a_room_left_while_catching_up_gives_nothing_more_and_a_room_joined_again_starts_from_the_join():
    h = Harness()
    h.publish(10, live=False)
    session, device = h.session()
    h.bus.hold = True
    live = session.catch_up(ROOM, h.epoch(), 0)
    removed = pb.SubscriptionEvent(room_id=ROOM, profile_id="p", change=pb.SubscriptionEvent.Change.REMOVED)
    session.apply_membership(removed)
    h.bus.answer()
    h.run()
    assert device.offsets() == [] and live.called and session.catching == {}
    h.bus.hold = False
    h.publish(3)  # while away from the room
    added = pb.SubscriptionEvent(room_id=ROOM, profile_id="p", change=pb.SubscriptionEvent.Change.ADDED)
    session.apply_membership(added)
    h.publish(1)
    assert device.offsets() == [14]


def test_sessions_at_the_gateways_live_position_catch_up_without_a_read():
    h = Harness()
    watcher, _ = h.session("w")
    h.publish(5)  # the gateway's live delivery is at 5
    h.bus.hold = True
    sessions = [h.session(f"p{i}") for i in range(50)]
    done = [s.catch_up(ROOM, h.epoch(), 5) for s, _ in sessions]
    assert all(d.called for d in done) and h.bus.reads == []
    assert h.reads()["stream"] == 0


def test_a_thousand_devices_a_hundred_events_behind_in_ten_rooms_cost_ten_stream_reads_and_no_core_call():
    h = Harness()
    rooms = [f"room{i}" for i in range(10)]
    for room in rooms:
        h.publish(150, live=False, room=room)
    h.bus.hold = True
    devices = []
    for i in range(1000):
        room = rooms[i % 10]
        session, device = h.session(f"p{i}", rooms=[room])
        devices.append((session, device, room, session.catch_up(room, h.epoch(room), 50)))
        if i == 500:
            while h.bus.reads:  # the first reads answer while the rest still arrive
                h.bus.answer()
            h.run(5)
    while h.bus.reads:
        h.bus.answer()
    h.run(1000)
    assert all(live.called for *_, live in devices)
    assert all(device.offsets() == list(range(51, 151)) for _, device, _, _ in devices)
    assert h.reads() == {"stream": 10, "core": 0}


def test_a_gap_event_that_does_not_fit_waits_for_the_drain_like_the_events_it_stands_for():
    h = Harness()
    h.hub.streams.limit(5, 86400)
    h.publish(20, live=False)  # the stream keeps 16..20; the core has nothing
    session, device = h.session()
    device.room = 0
    session.catch_up(ROOM, h.epoch(), 2)
    h.run()
    assert device.events == [] and session.behind and device.closed is None
    device.room = None
    session.drained()
    h.run()
    assert device.gaps() == [(3, 15)] and device.offsets() == [16, 17, 18, 19, 20]
    assert session.catching == {} and h.gateway.counts.gaps_sent_count() == 1


def test_sessions_at_different_positions_beyond_the_stream_share_the_cores_answer():
    h = Harness()
    h.hub.streams.limit(5, 86400)
    h.publish(20, live=False)
    keep_in_core(h, range(1, 21))
    sessions = [h.session(f"p{i}") for i in range(10)]
    for i, (session, _) in enumerate(sessions):
        session.catch_up(ROOM, h.epoch(), 2 + i)  # 2..11: all inside the first one's range
    h.run(100)
    for i, (_, device) in enumerate(sessions):
        assert device.offsets() == list(range(3 + i, 21)) and device.gaps() == []
    assert h.reads()["core"] == 1


def test_a_range_longer_than_one_answer_of_the_core_is_asked_on_from_where_it_ended(monkeypatch):
    from chatgateway.sessions import streamreads

    monkeypatch.setattr(streamreads, "HISTORY_PAGE", 4)
    monkeypatch.setattr(streamreads, "HISTORY_MAX_PAGES", 2)
    h = Harness()
    h.hub.streams.limit(5, 86400)
    h.publish(40, live=False)  # the stream keeps 36..40
    keep_in_core(h, range(1, 41))
    session, device = h.session()
    session.catch_up(ROOM, h.epoch(), 0)
    h.run(100)
    assert device.offsets() == list(range(1, 41)) and device.gaps() == []
    assert h.reads()["core"] >= 35 // 4


def test_the_stream_is_read_once_the_rooms_channel_is_subscribed_so_nothing_falls_between():
    h = Harness()
    h.publish(5, live=False)
    h.bus.unconfirmed[channels.room(ROOM)] = []
    h.bus.hold = True
    session, device = h.session()  # the room's first local session: SUBSCRIBE sent, not confirmed
    live = session.catch_up(ROOM, h.epoch(), 1)
    assert h.bus.reads == []  # a read now could miss what is published before the subscription
    h.publish(1, live=False)  # 6: published before the subscription took effect
    h.bus.confirm(channels.room(ROOM))
    assert len(h.bus.reads) == 1
    h.bus.answer()
    h.run()
    assert device.offsets() == [2, 3, 4, 5, 6] and live.called


OPS = st.one_of(
    st.tuples(st.just("live"), st.integers(1, 4)),
    st.tuples(st.just("lost"), st.integers(1, 4)),
    st.tuples(st.just("full"), st.integers(0, 3)),
    st.tuples(st.just("drain"), st.integers(0, 3)),
    st.tuples(st.just("trickle"), st.integers(0, 3)),
    st.tuples(st.just("turn"), st.just(0)),
    st.tuples(st.just("hold"), st.just(0)),
    st.tuples(st.just("answer"), st.just(0)),
    st.tuples(st.just("join"), st.integers(0, 40)),
    st.tuples(st.just("burst"), st.integers(60, 150)),
    st.tuples(st.just("corelose"), st.integers(1, 60)),
    st.tuples(st.just("flush"), st.just(0)),
    st.tuples(st.just("fail"), st.integers(1, 12)),
    st.tuples(st.just("wait"), st.sampled_from([0.1, 0.5, 2.0, 7.0])),
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(OPS, max_size=40), st.sampled_from([1000, 8]))
def test_whatever_happens_every_device_gets_every_event_once_in_order(ops, kept):
    """A model test of the seam: live events, pub/sub losses, outboxes filling and draining,
    reads held while events arrive, devices joining from positions, bursts the fan-out sheds,
    a stream keeping only ``kept`` events with the core's history behind it, events the core
    lost, the stream lost (a new epoch), stream reads failing for a while, in any order. Every device gets, in order and once,
    every event after its position, or a gap event for one the core lost, and nothing else."""
    h = Harness(BEHIND_DRAIN_SEC=86400)  # (never drained in time is another test's)
    h.hub.streams.limit(kept, 86400)
    h.gateway.fanout.max_backlog = 200
    append = h.hub.streams.append
    epochs = []  # [epoch, last offset] of each epoch of the room, oldest first
    core_lost = set()  # (epoch, offset) the core's history no longer holds
    seen_end = {}  # a lost epoch -> the last offset of it the gateway received

    def stored(room_id, payload):  # the core stores every event it publishes, with its position
        positioned = append(room_id, payload)
        event = pb.ServerEvent.FromString(positioned)
        h.core.kept[(event.epoch, event.offset)] = pb.RoomEvent(
            id=event.id, room_id=room_id, epoch=event.epoch, offset=event.offset
        )
        if not epochs or epochs[-1][0] != event.epoch:
            epochs.append([event.epoch, 0])
        epochs[-1][1] = event.offset
        return positioned

    h.hub.streams.append = stored
    h.publish(1)  # the room exists
    devices = [h.session(f"p{i}") + ((h.epoch(), 1),) for i in range(4)]  # (session, device, start)
    for session, _, _ in devices:
        session.catch_up(ROOM, h.epoch(), 1)  # each knows it has event 1
    h.run()

    def top():
        return h.hub.streams.rooms[ROOM][1] if ROOM in h.hub.streams.rooms else 0

    for op, arg in ops:
        if op in ("live", "lost"):
            h.bus.hold, held = False, h.bus.hold
            h.publish(arg, live=op == "live")
            h.bus.hold = held
        elif op == "full":
            devices[arg][1].room = 0
        elif op in ("drain", "trickle"):
            session, device, _ = devices[arg]
            device.room = None if op == "drain" else 2
            session.drained()
        elif op == "turn":
            h.clock.advance(0)
        elif op == "hold":
            h.bus.hold = True
        elif op == "answer":
            while h.bus.reads:
                h.bus.answer()
        elif op == "join" and ROOM in h.hub.streams.rooms:
            position = (h.epoch(), min(arg, top()))
            session, device = h.session(f"j{len(devices)}")
            session.catch_up(ROOM, *position)
            devices.append((session, device, position))
        elif op == "burst" and ROOM in h.hub.streams.rooms:  # one turn's worth of pub/sub: past the bound
            for _ in range(arg):
                n = top() + 1
                event = pb.ServerEvent(id=f"e{n}", message=pb.RoomEvent(id=f"e{n}", room_id=ROOM))
                h.hub.deliver(channels.room(ROOM), h.hub.streams.append(ROOM, event.SerializeToString()))
        elif op == "corelose" and epochs:
            key = (epochs[-1][0], arg)
            if h.core.kept.pop(key, None) is not None:
                core_lost.add(key)
        elif op == "fail":
            h.bus.failing = arg  # Redis away for the next reads (retried, then the core is asked)
        elif op == "wait":
            h.clock.advance(arg)
        elif op == "flush" and len(epochs) == 1:  # (once: an epoch born and lost while away is not told)
            seen = h.gateway.positions.position(ROOM)
            seen_end[epochs[-1][0]] = seen[1] if seen is not None and seen[0] == epochs[-1][0] else 0
            h.hub.streams.rooms.pop(ROOM, None)  # Redis lost the room's stream and position
    # Let everything settle: Redis back, reads answered, outboxes drained, one more live event.
    h.bus.failing = 0
    for _ in range(12):
        h.clock.advance(1)  # retries of failed reads are due
    h.bus.hold = False
    while h.bus.reads:
        h.bus.answer()
    for session, device, _ in devices:
        device.room = None
        session.drained()
    h.publish(1)
    for _ in range(20):
        while h.bus.reads:
            h.bus.answer()
        h.run(50)
        h.clock.advance(1)
    for session, device, (epoch, offset) in devices:

        def least_end(i):
            """The last offset of epoch i a device must get to: all of the current one; of a lost
            one, what the gateway received or the core still holds (beyond: if it can tell)."""
            epoch_i, last = epochs[i]
            if i == len(epochs) - 1:
                return last
            kept = [o for e, o in h.core.kept if e == epoch_i]
            return max([seen_end.get(epoch_i, 0), *kept])

        got, gapped = [], set()
        for e in device.events:
            if e.HasField("gap"):
                missing = [(e.gap.epoch, n) for n in range(e.gap.first_offset, e.gap.last_offset + 1)]
                got += missing
                gapped.update(missing)
            elif e.HasField("message"):
                got.append((e.epoch, e.offset))
        first = [e for e, _ in epochs].index(epoch)
        expected = []
        for i in range(first, len(epochs)):
            begin = offset + 1 if i == first else 1
            mine = [o for e, o in got if e == epochs[i][0]]
            # Every offset from where it begins, in order, to an end between what it must get
            # to and the epoch's real last one.
            reached = mine[-1] if mine else begin - 1
            assert least_end(i) <= reached <= epochs[i][1], (epoch, offset, i, got)
            expected += [(epochs[i][0], n) for n in range(begin, reached + 1)]
        assert got == expected, (epoch, offset, got, expected)
        assert gapped <= core_lost and errors(device) == []
        assert session.catching == {} and not session.behind
