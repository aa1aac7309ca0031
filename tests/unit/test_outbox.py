"""chatgateway.sessions.outbox: the per-connection send bound and the per-kind policy."""

import pytest
import pytest_twisted
from twisted.internet import defer, protocol, task
from twisted.internet.testing import StringTransport

from chatgateway.api import chat_pb2 as pb
from chatgateway.sessions.outbox import COALESCED, ENTRY_OVERHEAD, KEPT, TYPING, Outbox, classify, unsent_bytes


class Sink:
    def __init__(self, limit=10_000, unsent=0):
        self.written = []
        self.overflows = 0
        self.unsent = unsent
        self.outbox = Outbox(self.written.append, limit, self.overflow, unsent=lambda: self.unsent)

    def overflow(self):
        self.overflows += 1


def frame(name, size=100):
    return name.encode().ljust(size, b".")


def names(frames):
    return [f.rstrip(b".").decode() for f in frames]


def test_frames_go_straight_through_while_the_transport_has_room():
    s = Sink()
    for i in range(50):
        s.outbox.send(frame(f"m{i}"))
    assert len(s.written) == 50 and s.outbox.queued == 0


def test_paused_frames_wait_and_leave_in_order_on_resume():
    s = Sink()
    s.outbox.pauseProducing()
    for i in range(5):
        s.outbox.send(frame(f"m{i}"))
    assert s.written == [] and len(s.outbox) == 5
    assert s.outbox.queued == 5 * (100 + ENTRY_OVERHEAD)
    s.outbox.send(frame("late"))  # still paused: behind the others
    s.outbox.resumeProducing()
    assert names(s.written) == ["m0", "m1", "m2", "m3", "m4", "late"]
    assert s.outbox.queued == 0 and len(s.outbox) == 0
    s.outbox.send(frame("direct"))
    assert names(s.written)[-1] == "direct"


def test_a_pause_during_the_flush_stops_it():
    s = Sink()
    s.outbox.pauseProducing()
    for i in range(4):
        s.outbox.send(frame(f"m{i}"))

    def write(data):
        s.written.append(data)
        if len(s.written) == 2:
            s.outbox.pauseProducing()  # what Twisted does when its buffer fills again

    s.outbox._write = write
    s.outbox.resumeProducing()
    assert names(s.written) == ["m0", "m1"] and len(s.outbox) == 2
    s.outbox.resumeProducing()
    assert names(s.written) == ["m0", "m1", "m2", "m3"]


def test_typing_is_coalesced_per_room_and_typist_and_dropped_first():
    s = Sink(limit=4 * (100 + ENTRY_OVERHEAD))
    s.outbox.pauseProducing()
    s.outbox.send(frame("t-alice-1"), TYPING, ("r1", "alice"))
    s.outbox.send(frame("t-bob"), TYPING, ("r1", "bob"))
    s.outbox.send(frame("t-alice-2"), TYPING, ("r1", "alice"))  # replaces t-alice-1
    s.outbox.send(frame("m1"), KEPT)
    s.outbox.send(frame("m2"), KEPT)
    assert len(s.outbox) == 4
    s.outbox.send(frame("m3"), KEPT)  # no room: the oldest typing event goes
    s.outbox.send(frame("t-carol"), TYPING, ("r1", "carol"))  # the older typing event makes room
    s.outbox.send(frame("t-dave", 300), TYPING, ("r1", "dave"))  # does not fit at all: dropped
    assert s.overflows == 0
    s.outbox.resumeProducing()
    assert names(s.written) == ["m1", "m2", "m3", "t-carol"]
    assert s.outbox.dropped == 4  # t-alice-1 (replaced), t-bob, t-alice-2, t-dave


def test_receipts_are_coalesced_latest_per_room_and_reader_and_move_to_the_end():
    s = Sink()
    s.outbox.pauseProducing()
    s.outbox.send(frame("rc-alice-e1"), COALESCED, ("receipt", "r1", "alice"))
    s.outbox.send(frame("rc-bob-e1"), COALESCED, ("receipt", "r1", "bob"))
    s.outbox.send(frame("e2"), KEPT)
    s.outbox.send(frame("rc-alice-e2"), COALESCED, ("receipt", "r1", "alice"))
    s.outbox.send(frame("rc-alice-r2"), COALESCED, ("receipt", "r2", "alice"))
    s.outbox.resumeProducing()
    assert names(s.written) == ["rc-bob-e1", "e2", "rc-alice-e2", "rc-alice-r2"]


def test_a_kept_frame_that_does_not_fit_overflows_once_and_releases_everything():
    s = Sink(limit=3 * (100 + ENTRY_OVERHEAD))
    s.outbox.pauseProducing()
    for i in range(3):
        s.outbox.send(frame(f"m{i}"))
    assert s.overflows == 0
    s.outbox.send(frame("m3"))
    assert s.overflows == 1
    assert s.outbox.closed and s.outbox.queued == 0 and len(s.outbox) == 0
    s.outbox.send(frame("m4"))
    s.outbox.resumeProducing()
    assert s.written == [] and s.overflows == 1


def test_the_transports_unsent_bytes_count_against_the_same_limit():
    s = Sink(limit=1000, unsent=700)
    s.outbox.pauseProducing()
    s.outbox.send(frame("m0"))  # 700 + 196 fits
    assert s.overflows == 0
    s.outbox.send(frame("m1"))  # 700 + 392 does not
    assert s.overflows == 1
    assert s.outbox.buffered == 700


def test_many_coalesced_replacements_do_not_pile_up():
    s = Sink(limit=100_000)
    s.outbox.pauseProducing()
    for i in range(10_000):
        s.outbox.send(frame(f"rc{i}"), COALESCED, ("receipt", "r1", "alice"))
    assert len(s.outbox) == 1
    assert len(s.outbox._queue) < 200  # holes are compacted
    s.outbox.resumeProducing()
    assert names(s.written) == ["rc9999"]


def test_classify_reads_the_event_kind():
    typing = pb.ServerEvent(typing_event=pb.TypingEvent(room_id="r", profile_id="p", typing=True))
    receipt = pb.ServerEvent(receipt_event=pb.ReceiptEvent(room_id="r", profile_id="p", event_id="e"))
    presence = pb.ServerEvent(presence_event=pb.PresenceEvent(profile_id="p"))
    assert classify(typing) == (TYPING, ("r", "p"))
    assert classify(receipt) == (COALESCED, ("receipt", "r", "p"))
    assert classify(presence) == (COALESCED, ("presence", "p"))
    assert classify(pb.ServerEvent(message=pb.RoomEvent(id="e"))) == (KEPT, None)
    assert classify(pb.ServerEvent(command_result=pb.CommandResult(request_id="1"))) == (KEPT, None)


def test_bind_replaces_the_http_channel_as_producer_and_halves_the_buffer():
    transport = StringTransport()
    transport.bufferSize = 65536
    transport.registerProducer(object(), True)  # twisted.web's HTTPChannel before the takeover
    s = Sink(limit=20_000)
    s.outbox.bind(transport)
    assert transport.producer is s.outbox and transport.streaming
    assert transport.bufferSize == 10_000
    big = Sink(limit=10 * 1024 * 1024)
    other = StringTransport()
    other.bufferSize = 65536
    big.outbox.bind(other)
    assert other.bufferSize == 65536  # never above Twisted's default


class _Silent(protocol.Protocol):
    """Accepts a connection and never reads from it."""

    def connectionMade(self):
        self.transport.pauseProducing()
        self.factory.accepted.callback(self)


@pytest_twisted.ensureDeferred
async def test_unsent_bytes_reads_a_real_tcp_transport():
    from twisted.internet import reactor

    server_factory = protocol.Factory.forProtocol(_Silent)
    server_factory.accepted = defer.Deferred()
    port = reactor.listenTCP(0, server_factory, interface="127.0.0.1")
    client = await protocol.ClientCreator(reactor, protocol.Protocol).connectTCP("127.0.0.1", port.getHost().port)
    silent = await server_factory.accepted
    try:
        assert unsent_bytes(client.transport) == 0
        chunk = b"x" * 65536
        for _ in range(200):  # 12.5 MiB: more than the kernel buffers take from a peer that does not read
            client.transport.write(chunk)
        unsent = unsent_bytes(client.transport)
        assert 0 < unsent <= 200 * 65536
        for _ in range(10):
            await task.deferLater(reactor, 0.01, lambda: None)
        assert unsent_bytes(client.transport) > 0  # the silent peer holds it back
    finally:
        client.transport.abortConnection()
        silent.transport.abortConnection()
        await port.stopListening()


def test_unsent_bytes_of_an_unknown_transport_is_zero():
    assert unsent_bytes(StringTransport()) == 0


@pytest.mark.parametrize("limit", [1024, 4096])
def test_nothing_waits_beyond_the_limit(limit):
    s = Sink(limit=limit)
    s.outbox.pauseProducing()
    for i in range(100):
        s.outbox.send(frame(f"t{i}", 50), TYPING, ("r", f"p{i}"))
        assert s.outbox.queued <= limit
    assert s.overflows == 0
