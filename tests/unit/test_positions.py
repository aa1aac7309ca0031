"""Gap-free live delivery (chatgateway.sessions.positions): offset gaps found, filled from
the room's stream once, live events held and merged at the seam, epochs changed."""

from twisted.internet import defer, task

from chatgateway.api import chat_pb2 as pb
from chatgateway.bus import channels
from chatgateway.bus.roomstream import StreamRead
from chatgateway.sessions.positions import FILL_RETRY_DELAYS_SEC, RoomPositions

ROOM = channels.room("r")


def event(offset, epoch="E1", room="r"):
    message = pb.RoomEvent(id=f"e{offset}", room_id=room)
    return pb.ServerEvent(id=f"e{offset}", message=message, epoch=epoch, offset=offset).SerializeToString()


class Stream:
    """A bus whose reads the test answers: ``reads`` holds (room, after, Deferred)."""

    def __init__(self):
        self.reads = []
        self.epoch = "E1"
        self.kept = {}  # offset -> payload

    def read_room_stream(self, room_id, after, count):
        d = defer.Deferred()
        self.reads.append((room_id, after, d))
        return d

    def answer(self, top=None):
        room_id, after, d = self.reads.pop(0)
        top = top if top is not None else max(self.kept, default=0)
        events = sorted((o, p) for o, p in self.kept.items() if after < o <= top)
        d.callback(StreamRead(self.epoch, top, events))


class Harness:
    def __init__(self):
        self.clock = task.Clock()
        self.bus = Stream()
        self.delivered = []  # (offset or the event id, epoch)
        self.lost = []
        self.positions = RoomPositions(self.bus, self._deliver, self.lost.append, self.clock)

    def _deliver(self, channel, parsed, payload):
        self.delivered.append(parsed.offset or parsed.id)

    def publish(self, offset, live=True, epoch="E1"):
        """The contract: every event is in the stream; ``live``: pub/sub delivered it too."""
        payload = event(offset, epoch)
        if epoch == self.bus.epoch:
            self.bus.kept[offset] = payload
        if live:
            self.positions.receive(ROOM, payload)


def test_consecutive_offsets_go_straight_through_and_duplicates_are_dropped():
    h = Harness()
    for offset in (1, 2, 3, 3, 2, 4):
        h.publish(offset)
    assert h.delivered == [1, 2, 3, 4]
    assert h.bus.reads == [] and h.lost == []
    assert h.positions.duplicates == 2


def test_events_without_a_position_pass_unchecked():
    h = Harness()
    h.publish(1)
    typing = pb.ServerEvent(id="t", typing_event=pb.TypingEvent(room_id="r", profile_id="p", typing=True))
    h.positions.receive(ROOM, typing.SerializeToString())
    h.positions.receive(channels.profile("p"), pb.ServerEvent(id="s").SerializeToString())
    assert h.delivered == [1, "t", "s"]


def test_a_gap_is_read_from_the_stream_once_and_delivered_in_order_before_newer_events():
    h = Harness()
    h.publish(1)
    h.publish(2, live=False)  # lost on pub/sub
    h.publish(3, live=False)
    h.publish(4)  # the gap shows
    assert h.delivered == [1]
    assert [(room, after) for room, after, _ in h.bus.reads] == [("r", 1)]
    h.publish(5)  # arrives while the read is in flight: held, no second read
    h.publish(6)
    assert len(h.bus.reads) == 1 and h.delivered == [1]
    h.bus.answer(top=4)
    assert h.delivered == [1, 2, 3, 4, 5, 6]
    assert h.lost == [] and h.positions.position("r") == ("E1", 6)


def test_at_the_seam_held_events_the_stream_also_returned_are_neither_lost_nor_doubled():
    h = Harness()
    h.publish(1)
    h.publish(2, live=False)
    h.publish(3)  # gap: read after 1
    for offset in (4, 5):
        h.publish(offset)  # held; by the time the read runs, the stream has them too
    h.publish(6, live=False)
    h.publish(7)  # held, after a second loss
    h.bus.answer()  # returns 2..7
    assert h.delivered == [1, 2, 3, 4, 5, 6, 7]
    assert h.bus.reads == [] and h.lost == []


def test_a_gap_among_the_held_events_beyond_the_read_starts_another_read():
    h = Harness()
    h.publish(1)
    h.publish(2, live=False)
    h.publish(3)
    h.bus.answer()  # 2, 3 (the stream's top is 3)
    h.publish(4, live=False)
    h.publish(5)
    h.publish(6, live=False)
    h.bus.answer(top=5)  # delivered 4, 5; 6 was published after the read
    assert h.delivered == [1, 2, 3, 4, 5]
    h.publish(7)
    assert [after for _, after, _ in h.bus.reads] == [5]
    h.bus.answer()
    assert h.delivered == [1, 2, 3, 4, 5, 6, 7] and h.lost == []


def test_a_resubscribe_reads_every_room_after_its_last_offset():
    h = Harness()
    h.publish(1)
    h.publish(2, live=False)
    h.publish(3, live=False)
    h.positions.resync()
    h.publish(4)  # live again: held behind the read
    h.bus.answer(top=3)
    assert h.delivered == [1, 2, 3, 4] and h.lost == []


def test_a_resubscribe_during_a_read_reads_again_afterwards():
    h = Harness()
    h.publish(1)
    h.publish(2, live=False)
    h.publish(3)
    h.positions.resync()  # more may have been missed than the read in flight will see
    h.bus.answer(top=3)
    h.publish(4, live=False)
    assert [after for _, after, _ in h.bus.reads] == [3]
    h.bus.answer()
    assert h.delivered == [1, 2, 3, 4]


def test_a_gap_the_stream_no_longer_holds_is_reported_once_and_delivery_goes_on():
    h = Harness()
    h.publish(1)
    for offset in (2, 3, 4):
        h.publish(offset, live=False)
    del h.bus.kept[2], h.bus.kept[3]  # trimmed
    h.publish(5)
    h.bus.answer()
    assert h.lost == ["r"]
    assert h.delivered == [1, 4, 5]


def test_a_stream_emptied_by_age_reports_the_loss_and_delivers_what_is_held():
    h = Harness()
    h.publish(1)
    h.publish(2, live=False)
    h.publish(3)
    h.bus.kept.clear()  # the whole stream expired
    h.bus.answer(top=3)
    assert h.lost == ["r"] and h.delivered == [1, 3]


def test_a_new_epoch_voids_the_rooms_positions_delivers_and_starts_from_it():
    h = Harness()
    h.publish(1)
    h.publish(2)
    h.bus.epoch, h.bus.kept = "E2", {}  # Redis lost the room's keys
    h.publish(1, epoch="E2")
    h.publish(2, epoch="E2")
    assert h.delivered == [1, 2, 1, 2]
    assert h.lost == ["r"] and h.positions.position("r") == ("E2", 2)


def test_a_read_that_finds_a_new_epoch_delivers_its_stream_from_the_start():
    h = Harness()
    h.publish(1)
    h.bus.epoch, h.bus.kept = "E2", {}
    h.publish(1, live=False, epoch="E2")
    h.publish(2, live=False, epoch="E2")
    h.positions.resync()
    h.bus.answer()  # of E2: the position of E1 means nothing; read E2 from its start
    assert [after for _, after, _ in h.bus.reads] == [0]
    h.bus.answer()
    assert h.delivered == [1, 1, 2] and h.lost == ["r"]
    assert h.positions.position("r") == ("E2", 2)


def test_a_read_that_fails_is_retried_on_the_clock_then_reported():
    h = Harness()
    h.publish(1)
    h.publish(2, live=False)
    h.publish(3)
    _, _, d = h.bus.reads.pop(0)
    d.errback(ConnectionError("redis bus-publisher is not connected"))
    assert h.bus.reads == []
    h.clock.advance(FILL_RETRY_DELAYS_SEC[0])
    h.bus.answer()  # the retry succeeds
    assert h.delivered == [1, 2, 3] and h.lost == []
    h.publish(4, live=False)
    h.publish(5)
    for delay in FILL_RETRY_DELAYS_SEC:
        _, _, d = h.bus.reads.pop(0)
        d.errback(ConnectionError("down"))
        h.clock.advance(delay)
    _, _, d = h.bus.reads.pop(0)
    d.errback(ConnectionError("down"))
    assert h.lost == ["r"] and h.delivered == [1, 2, 3, 5]


def test_a_forgotten_room_starts_from_its_next_event_and_ignores_a_read_in_flight():
    h = Harness()
    h.publish(1)
    h.publish(2, live=False)
    h.publish(3)
    h.positions.forget("r")  # its last local session left
    h.bus.answer()
    assert h.delivered == [1]
    h.publish(9)
    assert h.delivered == [1, 9] and h.positions.position("r") == ("E1", 9)
