"""The gRPC edge without sockets: GrpcDevice (the reactor side of a Connect stream) on a
task.Clock gateway with a fake core and verifier, and the loop side (StreamWriter, Handoff)
on a plain asyncio loop."""

import asyncio
import sys
import threading

import grpc
import pytest
from twisted.internet import defer, task
from zope.interface.verify import verifyObject

from chatgateway.api import chat_pb2 as pb
from chatgateway.api import codec
from chatgateway.bus import channels
from chatgateway.edge import grpc as edge
from chatgateway.edge import grpcstream
from chatgateway.sessions.fanout import EncodedEvent
from chatgateway.sessions.opening import MAX_PENDING_REQUESTS
from chatgateway.sessions.ratelimit import InboundBudget
from chatgateway.sessions.session import CloseCode, ISessionTransport
from support.wsharness import Harness


class RecordingHandoff:
    def __init__(self):
        self.items = {}

    def put(self, stream, item):
        self.items.setdefault(stream, []).append(item)


class FakeEdge:
    def __init__(self, harness, handoff=None):
        self.gateway = harness.gateway
        self.devices = set()
        self.stopping = False
        self.handoff = handoff or RecordingHandoff()


class StalledWriter:
    """The loop side of a stream whose writer wrote nothing (yet)."""

    written = 0


class Stream:
    """What the device sees of one stream: events, and the end."""

    def __init__(self, fake_edge, token=None, fallback_device=""):
        self.key = StalledWriter()
        self.device = grpcstream.GrpcDevice(fake_edge, self.key, fallback_device)
        self._edge = fake_edge
        self.device.start(token)

    @property
    def items(self):
        return self._edge.handoff.items.get(self.key, [])

    @property
    def events(self):
        return [pb.ServerEvent.FromString(i) for i in self.items if isinstance(i, bytes)]

    def kinds(self):
        return [e.WhichOneof("payload") for e in self.events]

    def of(self, kind):
        return [e for e in self.events if e.WhichOneof("payload") == kind]

    @property
    def end(self):
        ends = [i for i in self.items if isinstance(i, grpcstream.End)]
        assert len(ends) <= 1
        return (ends[0].code, ends[0].reason) if ends else None

    def send(self, request):
        self.device.received(request)

    def command(self, **fields):
        self.send(pb.StreamRequest(command=pb.ClientCommand(**fields)))
        return self.of("command_result")


@pytest.fixture
def harness():
    h = Harness(HEARTBEAT_INTERVAL_SEC=10, CONNECTION_TIMEOUT_SEC=30, AUTH_TIMEOUT_SEC=5, MAX_EVENTS_PER_SECOND=5)
    h.core.rooms = {"alice": ["r1"], "bob": ["r1"]}
    yield h
    h.stop()


@pytest.fixture
def fake_edge(harness):
    return FakeEdge(harness)


def test_device_is_a_session_transport(fake_edge):
    assert verifyObject(ISessionTransport, Stream(fake_edge, "alice/phone").device)


def test_every_close_code_has_a_status():
    codes = [v for k, v in vars(CloseCode).items() if k.isupper()]
    assert sorted(grpcstream.CLOSE_STATUS) == sorted(codes)
    assert grpcstream.CLOSE_STATUS[CloseCode.REPLACED] == grpc.StatusCode.ABORTED
    assert grpcstream.CLOSE_STATUS[CloseCode.UNAUTHENTICATED] == grpc.StatusCode.UNAUTHENTICATED
    assert grpcstream.CLOSE_STATUS[CloseCode.HEARTBEAT_TIMEOUT] == grpc.StatusCode.UNAVAILABLE
    assert grpcstream.CLOSE_STATUS[CloseCode.NORMAL] == grpc.StatusCode.OK


def test_metadata_token_connects_at_once(harness, fake_edge):
    stream = Stream(fake_edge, "alice/phone")
    assert stream.kinds() == ["connected"]
    connected = stream.events[0].connected
    assert (connected.profile_id, connected.device_id, list(connected.room_ids)) == ("alice", "phone", ["r1"])
    assert stream.events[0].HasField("timestamp")
    assert len(harness.gateway.registry) == 1


def test_device_id_falls_back_to_x_device_id_then_default(fake_edge):
    assert Stream(fake_edge, "alice", fallback_device="kiosk").events[0].connected.device_id == "kiosk"
    assert Stream(fake_edge, "bob").events[0].connected.device_id == "default"


def test_first_message_authenticates_and_its_command_runs(harness, fake_edge):
    stream = Stream(fake_edge, fallback_device="ignored")
    assert stream.events == []
    stream.send(
        pb.StreamRequest(
            auth_token="alice",
            device_id="tablet",
            command=pb.ClientCommand(request_id="1", typing=pb.TypingCommand(room_id="r1", typing=True)),
        )
    )
    assert stream.kinds() == ["connected", "command_result"]
    assert stream.events[0].connected.device_id == "tablet"
    assert stream.of("command_result")[0].command_result.request_id == "1"
    assert not stream.of("command_result")[0].command_result.HasField("error")


@pytest.mark.parametrize(
    "token, first, reason",
    [
        ("bad-token", None, "invalid token"),
        (None, pb.StreamRequest(auth_token="bad-token"), "invalid token"),
        (None, pb.StreamRequest(device_id="x"), "must carry auth_token"),
        (None, codec.FrameError("not a StreamRequest"), "must carry auth_token"),
    ],
)
def test_refused_authentication_ends_unauthenticated(fake_edge, token, first, reason):
    stream = Stream(fake_edge, token)
    if first is not None:
        stream.send(first)
    code, text = stream.end
    assert code == CloseCode.UNAUTHENTICATED and reason in text
    assert stream.kinds() == []


def test_silence_before_authentication_times_out(harness, fake_edge):
    stream = Stream(fake_edge)
    harness.advance(4.9)
    assert stream.end is None
    harness.advance(0.1)
    assert stream.end[0] == CloseCode.UNAUTHENTICATED
    assert "timeout" in stream.end[1]


def test_a_newer_stream_of_the_same_device_replaces_the_older(fake_edge):
    older = Stream(fake_edge, "alice/phone")
    newer = Stream(fake_edge, "alice/phone")
    assert older.end == (CloseCode.REPLACED, "replaced by a newer connection of this device")
    assert newer.end is None
    other_device = Stream(fake_edge, "alice/laptop")
    assert other_device.end is None and newer.end is None


def test_room_events_are_encoded_once_for_every_grpc_recipient(harness, fake_edge):
    alice, bob = Stream(fake_edge, "alice/phone"), Stream(fake_edge, "bob/phone")
    event = pb.ServerEvent(id="e1", message=pb.RoomEvent(id="e1", room_id="r1", sender_id="carol"))
    harness.publish(channels.room("r1"), event)
    assert alice.items[-1] is bob.items[-1]  # the same bytes object
    assert pb.ServerEvent.FromString(alice.items[-1]).message.id == "e1"


def test_commands_reach_the_core_and_errors_come_back(harness, fake_edge):
    alice = Stream(fake_edge, "alice/phone")
    ok = alice.command(request_id="1", room_event=pb.RoomEvent(room_id="r1", type=pb.RoomEvent.TEXT))
    assert ok[-1].command_result.request_id == "1" and not ok[-1].command_result.HasField("error")
    denied = alice.command(request_id="2", room_event=pb.RoomEvent(room_id="r9", type=pb.RoomEvent.TEXT))
    assert denied[-1].command_result.error.status == "PERMISSION_DENIED"


def test_bad_messages_are_answered_and_the_stream_stays(fake_edge):
    alice = Stream(fake_edge, "alice/phone")
    alice.send(codec.FrameError("not a StreamRequest: truncated"))
    assert alice.of("error")[0].error.status == "INVALID_ARGUMENT"
    assert alice.end is None


def test_the_rate_limit_applies(fake_edge):
    alice = Stream(fake_edge, "alice/phone")
    for i in range(6):
        results = alice.command(request_id=str(i), typing=pb.TypingCommand(room_id="r1", typing=True))
    assert results[-1].command_result.error.status == "RESOURCE_EXHAUSTED"


def test_a_stream_over_budget_for_too_long_ends_1008_once(fake_edge):
    alice = Stream(fake_edge, "alice/phone")
    reason = "frame rate exceeded: over MAX_FRAMES_PER_SECOND for 10 s"
    alice.device.over_budget(reason)
    alice.device.over_budget(reason)  # the reader says so at every pause until the stream ends
    assert alice.end == (CloseCode.POLICY, reason)
    assert edge.CLOSE_STATUS[CloseCode.POLICY] == grpc.StatusCode.RESOURCE_EXHAUSTED


def test_heartbeat_timeout_needs_messages_from_the_device(harness, fake_edge):
    quiet, chatty = Stream(fake_edge, "alice/phone"), Stream(fake_edge, "bob/phone")
    for _ in range(4):
        harness.advance(10)
        chatty.send(pb.StreamRequest())  # an empty message is a heartbeat
    assert quiet.end == (CloseCode.HEARTBEAT_TIMEOUT, "heartbeat timeout")
    assert chatty.end is None


def test_half_close_ends_normally_and_gone_forgets(harness, fake_edge):
    alice = Stream(fake_edge, "alice/phone")
    alice.device.half_closed()
    assert alice.end[0] == CloseCode.NORMAL
    alice.device.send_event(pb.ServerEvent(id="late"))  # dropped after the close
    assert alice.kinds() == ["connected"]
    alice.device.gone()
    assert len(harness.gateway.registry) == 0
    assert fake_edge.devices == set()


def test_messages_while_opening_are_queued_then_capped(harness, fake_edge):
    waiting = defer.Deferred()
    answer = harness.core.call
    harness.core.call = lambda method, *a, **k: waiting if method == "SearchRooms" else answer(method, *a, **k)
    alice = Stream(fake_edge, "alice/phone")
    for i in range(MAX_PENDING_REQUESTS):
        alice.command(request_id=str(i), typing=pb.TypingCommand(room_id="r1", typing=True))
    assert alice.end is None
    waiting.callback([pb.SearchRoomsResponse(data=[pb.Room(id="r1")])])
    assert alice.kinds() == ["connected"] + ["command_result"] * MAX_PENDING_REQUESTS
    errors = [e.command_result.error.status for e in alice.of("command_result")]
    assert errors == [""] * 5 + ["RESOURCE_EXHAUSTED"] * (MAX_PENDING_REQUESTS - 5)  # the rate limit
    assert alice.end is None

    slow = defer.Deferred()
    harness.core.call = lambda method, *a, **k: slow
    bob = Stream(fake_edge, "bob/phone")
    for _ in range(MAX_PENDING_REQUESTS + 1):
        bob.send(pb.StreamRequest())
    assert bob.end[0] == CloseCode.POLICY


def test_a_stream_gone_while_signing_in_leaves_no_session_and_replaces_nothing(harness, fake_edge):
    older = Stream(fake_edge, "alice/phone")
    verifying = harness.verify_later()
    stream = Stream(fake_edge)
    stream.send(pb.StreamRequest(auth_token="alice/phone"))
    stream.device.gone()  # while its token is verified
    calls = len(harness.core.calls)
    verifying.callback(None)
    assert len(harness.core.calls) == calls  # the core is not asked for a device that left

    opening = harness.memberships_later()
    stream = Stream(fake_edge, "alice/phone")
    stream.device.gone()  # while its session opens
    opening.callback([pb.SearchRoomsResponse(data=[pb.Room(id="r1")])])
    assert older.end is None  # not replaced by a stream that is gone
    assert list(harness.gateway.registry.sessions) == [older.device.session]
    assert stream.kinds() == []


def test_a_stream_the_edge_closes_while_it_signs_in_gets_no_session(harness, fake_edge):
    older = Stream(fake_edge, "alice/phone")
    opening = harness.memberships_later()
    stream = Stream(fake_edge, "alice/phone")
    stream.device.close(CloseCode.GOING_AWAY, "gateway shutting down")  # as GrpcEdge.stopService does
    opening.callback([pb.SearchRoomsResponse(data=[pb.Room(id="r1")])])
    assert stream.end[0] == CloseCode.GOING_AWAY and older.end is None
    assert list(harness.gateway.registry.sessions) == [older.device.session]


def test_a_stopping_edge_turns_new_streams_away(fake_edge):
    fake_edge.stopping = True
    assert Stream(fake_edge, "alice/phone").end[0] == CloseCode.GOING_AWAY


def test_a_core_that_cannot_list_rooms_ends_the_stream_try_again_later(harness, fake_edge):
    from chatgateway.core.client import CoreError

    harness.core.call = lambda *a, **k: defer.fail(CoreError(grpc.StatusCode.UNAVAILABLE, "core down"))
    stream = Stream(fake_edge, "alice/phone")
    assert stream.end[0] == CloseCode.TRY_AGAIN_LATER
    assert grpcstream.CLOSE_STATUS[stream.end[0]] == grpc.StatusCode.UNAVAILABLE


# ---------------------------------------------------------------- the loop side


class FakeContext:
    def __init__(self, block_after=None):
        self.written = []
        self.block_after = block_after

    async def write(self, item):
        if self.block_after is not None and len(self.written) >= self.block_after:
            await asyncio.Future()  # the device does not read: HTTP/2 flow control holds the write
        self.written.append(item)


def test_stream_writes_in_order_then_ends():
    async def scenario():
        stream = grpcstream.StreamWriter()
        context = FakeContext()
        writer = asyncio.ensure_future(stream.write_all(context))
        stream.push(b"a")
        stream.push(b"b")
        stream.push(grpcstream.End(CloseCode.REPLACED, "replaced"))
        stream.push(b"after the end")
        end = await writer
        return context.written, end

    written, end = asyncio.run(scenario())
    assert written == [b"a", b"b"]
    assert (end.code, end.reason) == (CloseCode.REPLACED, "replaced")


class SameThreadReactor:
    """The test's loop and reactor sides share one thread: callFromThread calls at once."""

    def callFromThread(self, f, *args, **kwargs):
        f(*args, **kwargs)


async def serving(harness, context):
    """(device, writer): a GrpcDevice whose frames reach a StreamWriter that writes them to
    ``context``, through a real Handoff on the running loop."""
    fake_edge = FakeEdge(harness, handoff=grpcstream.Handoff(asyncio.get_running_loop()))
    fake_edge.reactor = SameThreadReactor()
    streams = []

    async def serve():
        streams.append(grpcstream.StreamWriter())  # owned by this task, as by a Connect handler
        return await streams[0].write_all(context)

    writer = asyncio.ensure_future(serve())
    await asyncio.sleep(0)
    return grpcstream.GrpcDevice(fake_edge, streams[0], ""), writer


async def turns(n=5):
    """Let the loop hand over and write what it can."""
    for _ in range(n):
        await asyncio.sleep(0)


def raw(payload):
    """A fan-out event whose gRPC frame is ``payload`` (a kept kind of event)."""
    return EncodedEvent(pb.ServerEvent(), payload=payload)


@pytest.fixture
def small_buffer():
    h = Harness(SEND_BUFFER_BYTES=1024)
    yield h
    h.stop()


def test_a_slow_consumer_is_ended_when_its_outbox_is_full(small_buffer):
    async def scenario():
        context = FakeContext(block_after=1)
        device, writer = await serving(small_buffer, context)
        for size in (600, 600):  # the first is written, the second is stuck in the write
            device.send_encoded(raw(b"x" * size))
            await turns()
        device.send_encoded(raw(b"y" * 200))  # waits in the outbox
        await turns()
        assert not writer.done()
        device.send_encoded(raw(b"y" * 200))  # 600 unwritten + two waiting > 1024
        return await writer, context.written

    end, written = asyncio.run(scenario())
    assert end.code == CloseCode.SLOW_CONSUMER
    assert grpcstream.CLOSE_STATUS[end.code] == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert len(written) == 1


def test_one_event_larger_than_the_bound_still_goes_when_nothing_waits(small_buffer):
    async def scenario():
        context = FakeContext()
        device, writer = await serving(small_buffer, context)
        device.send_encoded(raw(b"z" * 2000))
        device.close(CloseCode.NORMAL, "bye")
        return await writer, context.written

    end, written = asyncio.run(scenario())
    assert end.code == CloseCode.NORMAL and written == [b"z" * 2000]


def test_a_paused_stream_resumes_once_its_writer_caught_up_and_closes_after_what_waited(small_buffer):
    async def scenario():
        context = FakeContext()
        device, writer = await serving(small_buffer, context)
        device.send_encoded(raw(b"a" * 600))  # more than half of SEND_BUFFER_BYTES unwritten: paused
        device.send_encoded(raw(b"b" * 100))  # waits in the Outbox
        assert len(device._outbox) == 1
        device.close(CloseCode.REPLACED, "replaced")  # after what waits
        device.send_encoded(raw(b"late"))
        return await writer, context.written, len(device._outbox)

    end, written, waiting = asyncio.run(scenario())
    assert written == [b"a" * 600, b"b" * 100] and waiting == 0
    assert (end.code, end.reason) == (CloseCode.REPLACED, "replaced")


class Received:
    """The loop side of a stream that keeps what it is handed."""

    def __init__(self):
        self.items = []

    def push(self, item):
        self.items.append(item)


def test_handoff_keeps_order_across_threads_with_one_wakeup_per_batch():
    loop = asyncio.new_event_loop()
    wakeups = []
    original = loop.call_soon_threadsafe

    def counting(callback, *args):
        wakeups.append(callback)
        return original(callback, *args)

    loop.call_soon_threadsafe = counting
    handoff = grpcstream.Handoff(loop)
    sink = Received()

    def producer():
        for i in range(1000):
            handoff.put(sink, i)

    thread = threading.Thread(target=producer)
    thread.start()
    thread.join()
    loop.run_until_complete(asyncio.sleep(0))
    loop.close()
    assert sink.items == list(range(1000))
    assert len(wakeups) == 1  # nothing drained while the producer ran: one wake-up


def test_handoff_loses_nothing_while_the_loop_drains_as_items_arrive():
    loop = asyncio.new_event_loop()
    handoff, sink, produced = grpcstream.Handoff(loop), Received(), threading.Event()

    def producer():
        for i in range(50_000):
            handoff.put(sink, i)
        loop.call_soon_threadsafe(produced.set)

    async def drain_until_produced():
        while not produced.is_set():
            await asyncio.sleep(0)  # the drains run between these, while the producer puts
        await asyncio.sleep(0)

    switch = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # the threads interleave as often as they can
    try:
        thread = threading.Thread(target=producer)
        thread.start()
        loop.run_until_complete(drain_until_produced())
        thread.join()
    finally:
        sys.setswitchinterval(switch)
        loop.close()
    assert sink.items == list(range(50_000))


def test_a_flooding_device_is_held_back_until_the_reactor_catches_up():
    handed = []

    class Reactor:
        def callFromThread(self, f, *args, **kwargs):
            handed.append(f)

    class Edge:
        reactor = Reactor()

    class Device:
        def received(self, item):
            pass

        def half_closed(self):
            pass

    async def scenario():
        stream = grpcstream.StreamWriter()

        async def flood():
            for _ in range(200):
                yield pb.StreamRequest().SerializeToString()

        budget = InboundBudget(1000, 1 << 20, task.Clock(), 10)  # not what holds it back here
        reader = asyncio.ensure_future(edge.GrpcEdge._read(Edge(), flood(), Device(), stream, budget))
        for _ in range(10):
            await asyncio.sleep(0)
        first = len(handed)
        for _ in range(10):
            stream.push(grpcstream.HANDLED)
        for _ in range(10):
            await asyncio.sleep(0)
        second = len(handed)
        for _ in range(200):
            stream.push(grpcstream.HANDLED)
        await reader
        return first, second

    first, second = asyncio.run(scenario())
    assert first == grpcstream.MAX_UNHANDLED
    assert second == grpcstream.MAX_UNHANDLED + 10
    assert len(handed) == 200 + 1  # every message, then the half-close


def test_a_stream_over_its_budget_is_not_read_until_it_refills_and_ends_1008_if_it_persists():
    clock = task.Clock()
    handed = []  # (clock time, what the reactor was asked to do)
    stream = None

    class Reactor:
        def callFromThread(self, f, *args):
            handed.append((clock.seconds(), f.__name__, args))
            if f.__name__ == "received":
                stream.push(grpcstream.HANDLED)  # the reactor handles each at once

    class Edge:
        reactor = Reactor()

        @staticmethod
        async def sleep(seconds):
            clock.advance(seconds)

    class Device:
        def received(self, item):
            pass

        def over_budget(self, reason):
            pass

        def half_closed(self):
            pass

    async def scenario():
        nonlocal stream
        stream = grpcstream.StreamWriter()

        async def flood():
            while clock.seconds() < 3:  # as fast as it can, for 3 s of the budget's clock
                yield pb.StreamRequest(ack=pb.Ack(event_id="e")).SerializeToString()

        await edge.GrpcEdge._read(Edge(), flood(), Device(), stream, InboundBudget(20, 1 << 20, clock, 2))

    asyncio.run(scenario())
    received = [at for at, name, _ in handed if name == "received"]
    assert received[:20] == [0] * 20  # the burst
    assert 20 + 2 * 29 <= len(received) <= 20 + 2 * 30  # then 2 per tenth of a second: 20 per second
    ends = [(at, args) for at, name, args in handed if name == "over_budget"]
    assert ends and 2 <= ends[0][0] <= 2.1
    assert ends[0][1] == ("frame rate exceeded: over MAX_FRAMES_PER_SECOND for 2 s",)


def test_grpc_settings():
    from chatgateway import config

    base = {"JWT_SECRET": "s" * 32}
    c = config.load({**base, "HTTP_INTERFACE": "127.0.0.1"})
    assert (c.grpc_port, c.grpc_interface) == (50051, "127.0.0.1")  # GRPC_INTERFACE defaults to HTTP_INTERFACE
    assert config.load({**base, "HTTP_INTERFACE": "127.0.0.1", "GRPC_INTERFACE": "::1"}).grpc_interface == "::1"
    assert (c.core_breaker_failures, c.core_breaker_cooldown_sec) == (5, 10)
    with pytest.raises(config.ConfigError) as bad:
        config.load({**base, "CORE_BREAKER_FAILURES": "0", "CORE_BREAKER_COOLDOWN_SEC": "soon"})
    assert len(bad.value.problems) == 2


def test_a_draining_gateway_turns_new_streams_away(harness, fake_edge):
    harness.gateway.draining = True
    assert Stream(fake_edge, "alice/phone").end[0] == CloseCode.GOING_AWAY


def test_abort_ends_at_once_dropping_the_outbox():
    async def scenario():
        context = FakeContext(block_after=0)
        stream = None

        async def serve():
            nonlocal stream
            stream = grpcstream.StreamWriter()
            return await stream.write_all(context)

        writer = asyncio.ensure_future(serve())
        await asyncio.sleep(0)
        stream.push(b"stuck")
        await asyncio.sleep(0)
        stream.push(b"waiting")
        stream.push(grpcstream.End(CloseCode.GOING_AWAY, "draining"))
        stream.push(grpcstream.End(CloseCode.GOING_AWAY, "gateway stopped", now=True))
        return await writer

    end = asyncio.run(scenario())
    assert (end.code, end.reason) == (CloseCode.GOING_AWAY, "gateway stopped")


def test_device_abort_hands_an_immediate_end(fake_edge):
    stream = Stream(fake_edge, "alice/phone")
    stream.device.abort()
    end = [i for i in stream.items if isinstance(i, grpcstream.End)][-1]
    assert end.now and end.code == CloseCode.GOING_AWAY


class RecordingLoop:
    """The edge's loop as the reactor thread sees it: what is scheduled on it, run only when asked."""

    def __init__(self):
        self.scheduled = []

    def call_soon_threadsafe(self, callback, *args):
        self.scheduled.append((callback, args))

    def run_scheduled(self):
        scheduled, self.scheduled = self.scheduled, []
        for callback, args in scheduled:
            callback(*args)


class CountingReactor:
    def __init__(self):
        self.calls = 0

    def callFromThread(self, f, *args, **kwargs):
        self.calls += 1
        f(*args, **kwargs)


def test_a_fan_out_to_many_grpc_streams_is_one_thread_hop_and_one_encoding(harness):
    loop = RecordingLoop()
    fake_edge = FakeEdge(harness, handoff=grpcstream.Handoff(loop))
    fake_edge.reactor = CountingReactor()
    harness.core.rooms.update({f"p{i}": ["r1"] for i in range(200)})
    writers = [Received() for _ in range(200)]
    for i, writer in enumerate(writers):
        writer.written = 0
        grpcstream.GrpcDevice(fake_edge, writer, "").start(f"p{i}/phone")
    loop.run_scheduled()  # the connected events
    assert all(len(w.items) == 1 for w in writers)

    first = pb.ServerEvent(id="e1", message=pb.RoomEvent(id="e1", room_id="r1", sender_id="carol"))
    second = pb.ServerEvent(id="e2", message=pb.RoomEvent(id="e2", room_id="r1", sender_id="carol"))
    harness.publish(channels.room("r1"), first)
    assert len(loop.scheduled) == 1  # one hop for 200 streams
    harness.publish(channels.room("r1"), second)
    assert len(loop.scheduled) == 1  # not yet drained: the next fan-out rides on the same hop
    loop.run_scheduled()
    frames = [w.items[1:] for w in writers]
    assert all(len(f) == 2 for f in frames)
    assert all(f[0] is frames[0][0] and f[1] is frames[0][1] for f in frames)  # encoded once per event
    assert [pb.ServerEvent.FromString(b).id for b in frames[0]] == ["e1", "e2"]
    assert fake_edge.reactor.calls == 0  # and no hop back while nothing waits
