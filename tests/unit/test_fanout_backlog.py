"""The fan-out under overload: CHUNK deliveries per reactor turn, a bounded backlog, DATA_LOSS notices.

Fake sessions record what they are given. The reactor is TurnReactor: unlike
task.Clock, whose ``advance(0)`` also runs what the calls it runs schedule, it runs
one reactor turn at a time, so the pump's chunks can be seen.
"""

import grpc
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families
from twisted.logger import Logger

from chatgateway.api import chat_pb2 as pb
from chatgateway.bus import channels
from chatgateway.sessions import fanout
from chatgateway.sessions.fanout import CHUNK, Fanout
from chatgateway.telemetry.counts import GatewayCounts
from support.wsharness import Harness

LOSS = "DATA_LOSS"


class TurnReactor:
    """callLater and seconds; ``turn()`` runs the calls that are due now, not those they schedule."""

    class Call:
        def __init__(self, when, f, args):
            self.when, self.f, self.args = when, f, args
            self.cancelled = self.called = False

        def active(self):
            return not (self.cancelled or self.called)

        def cancel(self):
            self.cancelled = True

    def __init__(self, now=1000.0):
        self.now = now
        self.calls = []

    def seconds(self):
        return self.now

    def callLater(self, delay, f, *args):
        call = self.Call(self.now + delay, f, args)
        self.calls.append(call)
        return call

    def turn(self):
        due = [c for c in self.calls if c.when <= self.now]
        self.calls = [c for c in self.calls if c.when > self.now]
        for call in due:
            if call.active():
                call.called = True
                call.f(*call.args)

    def advance(self, seconds):
        self.now += seconds
        self.turn()


class FakeSession:
    def __init__(self, name):
        self.profile_id = name
        self.got = []  # event ids, and LOSS for a DATA_LOSS notice

    def deliver(self, encoded):
        event = encoded.event
        if event.HasField("error"):
            assert event.error.code == grpc.StatusCode.DATA_LOSS.value[0]
            self.got.append(event.error.status)
        else:
            self.got.append(event.id)


class FakeRegistry:
    def __init__(self):
        self.rooms = {}
        self.profiles = {}

    def room_sessions(self, room_id):
        return self.rooms.get(room_id, ())

    def profile_sessions(self, profile_id):
        return self.profiles.get(profile_id, ())


class World:
    """A Fanout on a Clock, with rooms of fake sessions; it counts into ``counts``."""

    def __init__(self, max_backlog=fanout.MAX_BACKLOG, counts=None):
        self.clock = TurnReactor()
        self.registry = FakeRegistry()
        self.memberships = []
        self.logged = []
        self.counts = counts if counts is not None else GatewayCounts()
        on_membership = lambda change, event: self.memberships.append(change)  # noqa: E731
        self.fanout = Fanout(self.registry, on_membership, self.clock, self.counts, max_backlog=max_backlog)
        self.fanout.log = Logger(observer=self.logged.append)

    def room(self, room_id, size):
        sessions = [FakeSession(f"{room_id}-{i}") for i in range(size)]
        self.registry.rooms[room_id] = set(sessions)
        return sessions

    def message(self, room_id, event_id):
        event = pb.ServerEvent(id=event_id, message=pb.RoomEvent(id=event_id, room_id=room_id))
        self.fanout.receive(channels.room(room_id), event.SerializeToString())

    def typing(self, room_id, event_id, typist="someone"):
        event = pb.ServerEvent(id=event_id, typing_event=pb.TypingEvent(room_id=room_id, profile_id=typist))
        self.fanout.receive(channels.room(room_id), event.SerializeToString())

    def turn(self):
        """One reactor turn; the deliveries it made."""
        before = self.delivered()
        self.clock.turn()
        return self.delivered() - before

    def settle(self):
        while self.fanout._pumping is not None:
            self.clock.turn()

    def delivered(self):
        return sum(len(s.got) for room in self.registry.rooms.values() for s in room)

    def warnings(self):
        return [e for e in self.logged if e["log_level"].name == "warn"]


def got(sessions):
    """What every session received, when they all received the same."""
    seen = {tuple(s.got) for s in sessions}
    assert len(seen) == 1, seen
    return list(seen.pop())


def test_at_most_chunk_deliveries_run_before_yielding_to_the_reactor():
    w = World()
    small = w.room("small", 300)
    w.message("small", "a")  # within the budget: delivered at once
    assert got(small) == ["a"]
    w.message("small", "b")  # 600 > CHUNK since the last turn: waits for the next turn
    w.message("small", "c")
    assert got(small) == ["a"]
    big = w.room("big", 1200)
    w.message("big", "x")
    turns = []
    while w.fanout._pumping is not None:
        turns.append(w.turn())
    assert all(n <= CHUNK for n in turns), turns
    assert sum(turns) == 600 + 1200
    assert got(small) == ["a", "b", "c"]
    assert got(big) == ["x"]
    assert w.fanout.backlog == 0
    w.message("small", "d")  # the pump ran: a new budget
    assert got(small) == ["a", "b", "c", "d"]


def test_the_oldest_events_are_dropped_the_one_in_progress_finishes_and_order_holds():
    w = World(max_backlog=2500)
    room = w.room("r", 1000)
    w.message("r", "e1")  # 1000 > CHUNK: queued
    assert w.turn() == 500  # e1 half delivered
    for n in (2, 3, 4):
        w.message("r", f"e{n}")
    # 500 owed for e1 + 3000: the oldest goes, e2 (not e1: in progress); a notice takes its place.
    assert w.fanout.backlog == 2500
    w.message("r", "e5")  # e3 goes; the notice does not grow (its devices are told already)
    w.settle()
    assert got(room) == ["e1", LOSS, "e4", "e5"]
    assert w.counts.dropped_counts()["message"] == 2000
    assert w.fanout.backlog == 0


def test_devices_are_told_once_per_interval_and_again_after_it():
    w = World(max_backlog=300)
    room = w.room("r", 300)
    w.message("r", "warm-up")  # delivered at once, most of the turn's budget spent
    w.message("r", "first")  # queued, within the bound
    for n in range(10):
        w.message("r", f"m{n}")  # each drops the one before: one notice
    w.settle()
    assert got(room) == ["warm-up", LOSS, "m9"]

    w.clock.advance(1)  # within LOSS_NOTICE_INTERVAL_SEC: drops without a second notice
    w.message("r", "warm-up-2")
    w.message("r", "a")
    w.message("r", "b")
    w.settle()
    assert got(room)[3:] == ["warm-up-2", "b"]

    w.clock.advance(fanout.LOSS_NOTICE_INTERVAL_SEC)
    w.message("r", "warm-up-3")
    w.message("r", "c")
    w.message("r", "d")
    w.settle()
    assert got(room)[5:] == ["warm-up-3", LOSS, "d"]


def test_only_the_devices_that_lost_events_are_told():
    w = World(max_backlog=150)
    crowd = w.room("crowd", 100)
    quiet = w.room("quiet", 40)
    for n in range(5):
        w.message("crowd", f"c{n}")  # the turn's budget: delivered at once
    w.message("crowd", "c5")  # queued
    w.message("quiet", "q1")  # queued behind it
    w.message("crowd", "c6")  # 240 owed: c5 is dropped
    w.settle()
    assert got(crowd) == ["c0", "c1", "c2", "c3", "c4", LOSS, "c6"]
    assert got(quiet) == ["q1"]


def test_typing_is_dropped_without_a_notice():
    w = World(max_backlog=100)
    room = w.room("r", 100)
    for n in range(5):
        w.message("r", f"m{n}")
    w.typing("r", "t1")  # queued
    w.message("r", "m5")  # drops t1: ephemeral, nothing to tell
    w.settle()
    assert got(room) == ["m0", "m1", "m2", "m3", "m4", "m5"]
    assert w.counts.dropped_counts()["typing_event"] == 100


def test_a_single_fanout_larger_than_the_bound_still_goes_out():
    w = World(max_backlog=1000)
    room = w.room("huge", 3000)
    w.message("huge", "only")
    w.settle()
    assert got(room) == ["only"]
    assert w.counts.dropped_counts()["message"] == 0


def test_membership_changes_are_applied_and_profile_events_kept_under_overload():
    w = World(max_backlog=600)
    room = w.room("r", 500)
    alice = FakeSession("alice")
    w.registry.profiles["alice"] = {alice}
    w.message("r", "m0")
    w.message("r", "m1")  # queued
    added = pb.SubscriptionEvent(room_id="new", profile_id="alice", change=pb.SubscriptionEvent.ADDED)
    change = pb.ServerEvent(id="sub", subscription_event=added)
    w.fanout.receive(channels.profile("alice"), change.SerializeToString())
    w.message("r", "m2")  # 1001 owed: m1 goes; the profile event is never dropped
    assert w.memberships == [added]
    w.settle()
    assert alice.got == ["sub"]
    assert got(room) == ["m0", LOSS, "m2"]


def test_drops_are_counted_and_logged_at_most_every_few_seconds(telemetry_counts):
    t, counts = telemetry_counts()
    w = World(max_backlog=250, counts=counts)
    w.room("r", 250)
    for n in range(60):
        w.message("r", f"m{n}")  # m0, m1 at once; from m3 on, each drops the one before
    warnings = w.warnings()
    assert len(warnings) == 1
    assert (warnings[0]["events"], warnings[0]["deliveries"], warnings[0]["told"]) == (1, 250, 250)
    w.clock.advance(fanout.DROP_WARNING_INTERVAL_SEC)  # the pump runs: m59 goes out
    for n in range(4):
        w.message("r", f"late{n}")  # late0, late1 at once; late3 drops late2
    warnings = w.warnings()
    assert len(warnings) == 2
    # counted since the first warning; a new notice window: the devices are told again
    assert (warnings[1]["events"], warnings[1]["told"]) == (56 + 1, 250)
    samples = {}
    for family in text_string_to_metric_families(generate_latest(t.registry).decode()):
        for sample in family.samples:
            samples[(sample.name, sample.labels.get("chatgateway_message_kind"))] = sample.value
    assert samples[("chatgateway_fanout_dropped_total", "message")] == 58 * 250


def test_stop_forgets_the_backlog():
    w = World()
    w.room("r", 1000)
    w.message("r", "m")
    w.fanout.stop()
    assert w.fanout.backlog == 0 and w.fanout._pumping is None
    w.clock.turn()
    assert w.delivered() == 0


def test_a_websocket_device_sees_the_data_loss_error_in_place_of_the_dropped_events(monkeypatch):
    monkeypatch.setattr(fanout, "CHUNK", 1)
    h = Harness()
    h.core.rooms = {"alice": ["r"], "bob": ["r"]}
    alice, bob = h.connect("alice"), h.connect("bob")
    h.gateway.fanout.max_backlog = 2

    def publish(n):
        h.publish(channels.room("r"), pb.ServerEvent(id=f"m{n}", message=pb.RoomEvent(id=f"m{n}", room_id="r")))

    publish(0)
    h.advance(0)  # m0 goes out (task.Clock runs every chunk)
    for n in (1, 2, 3):
        publish(n)  # each drops the one before
    while h.gateway.fanout._pumping is not None:
        h.advance(0)
    for device in (alice, bob):
        events = device.events[1:]  # after `connected`
        assert [e.WhichOneof("payload") for e in events] == ["message", "error", "message"]
        assert events[1].error.status == "DATA_LOSS" and events[1].error.code == grpc.StatusCode.DATA_LOSS.value[0]
        assert [events[0].id, events[2].id] == ["m0", "m3"]
    h.stop()
