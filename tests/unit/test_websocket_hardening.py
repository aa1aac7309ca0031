"""Hardening of the WebSocket edge, in memory: slow consumers, limits, drain."""

import struct

import pytest
from twisted.internet import defer

from chatgateway.api import chat_pb2 as pb
from chatgateway.api import codec
from chatgateway.bus import channels
from chatgateway.sessions.outbox import ENTRY_OVERHEAD
from support.rawdevice import Device, masked
from support.wsharness import Harness


@pytest.fixture
def h():
    harness = Harness(
        HEARTBEAT_INTERVAL_SEC=10, CONNECTION_TIMEOUT_SEC=30, SEND_BUFFER_BYTES=8192, DRAIN_TIMEOUT_SEC=20
    )
    yield harness
    harness.stop()


def message(room_id, i, size=200):
    event = pb.RoomEvent(id=f"e{i}", room_id=room_id, sender_id="x", type=pb.RoomEvent.TEXT)
    event.payload.update({"text": "x" * size})
    return pb.ServerEvent(id=f"e{i}", message=event)


def typing(room_id, profile, on=True):
    return pb.ServerEvent(typing_event=pb.TypingEvent(room_id=room_id, profile_id=profile, typing=on))


def receipt(room_id, profile, event_id):
    return pb.ServerEvent(receipt_event=pb.ReceiptEvent(room_id=room_id, profile_id=profile, event_id=event_id))


def ids(connection):
    return [e.message.id for e in connection.of("message")]


# ---------------------------------------------------------------- slow consumers


def test_a_slow_consumer_is_closed_4429_and_the_fast_member_gets_everything(h):
    h.core.rooms.update({"slow": ["r1"], "fast": ["r1"]})
    slow, fast = h.connect("slow"), h.connect("fast", protocols=(codec.PROTO,))
    slow.server._outbox.pauseProducing()  # what Twisted does when the device stops reading
    for i in range(100):
        h.publish(channels.room("r1"), message("r1", i))
    assert ids(fast) == [f"e{i}" for i in range(100)]
    assert slow.closed[0] == 4429 and "slow consumer" in slow.closed[1]
    assert ids(slow) == []  # nothing it had not read yet was kept for it
    assert len(h.gateway.registry) == 1
    h.publish(channels.room("r1"), message("r1", 100))
    assert ids(fast)[-1] == "e100"


def test_a_paused_consumer_within_the_limit_gets_everything_in_order_when_it_reads_again(h):
    h.core.rooms.update({"reader": ["r1"]})
    c = h.connect("reader")
    outbox = c.server._outbox
    outbox.pauseProducing()
    for i in range(10):
        h.publish(channels.room("r1"), message("r1", i))
    assert ids(c) == [] and len(outbox) == 10
    assert outbox.queued <= h.config.send_buffer_bytes
    outbox.resumeProducing()
    h.flush()
    assert ids(c) == [f"e{i}" for i in range(10)]
    assert c.closed is None


def test_typing_dropped_and_receipts_coalesced_while_a_device_is_slow(h):
    h.core.rooms.update({"reader": ["r1"]})
    c = h.connect("reader")
    outbox = c.server._outbox
    outbox.pauseProducing()
    h.publish(channels.room("r1"), receipt("r1", "alice", "e0"))
    h.publish(channels.room("r1"), typing("r1", "alice"))
    h.publish(channels.room("r1"), typing("r1", "alice", False))  # replaces the first
    for i in range(1, 4):
        h.publish(channels.room("r1"), message("r1", i))
        h.publish(channels.room("r1"), receipt("r1", "alice", f"e{i}"))
    h.publish(channels.room("r1"), receipt("r1", "bob", "e2"))
    outbox.resumeProducing()
    h.flush()
    kinds = [(e.WhichOneof("payload"), e.message.id or e.receipt_event.event_id) for e in c.events[1:]]
    assert kinds == [
        ("typing_event", ""),
        ("message", "e1"),
        ("message", "e2"),
        ("message", "e3"),
        ("receipt_event", "e3"),  # alice's latest, after the messages it refers to
        ("receipt_event", "e2"),  # bob's
    ]
    assert c.of("typing_event")[0].typing_event.typing is False


def test_under_pressure_typing_goes_before_a_message_is_refused(h):
    h.core.rooms.update({"reader": ["r1"]})
    c = h.connect("reader")
    outbox = c.server._outbox
    outbox.pauseProducing()
    frame = len(c.server.factory.prepareMessage(codec.encode_event(message("r1", 0), codec.JSON)[0]).payloadHybi)
    fits = h.config.send_buffer_bytes // (frame + ENTRY_OVERHEAD)
    for i in range(fits - 2):
        h.publish(channels.room("r1"), message("r1", i))
    for p in range(20):
        h.publish(channels.room("r1"), typing("r1", f"typist{p}"))
    for i in range(fits - 2, fits):
        h.publish(channels.room("r1"), message("r1", i))
    assert c.closed is None
    outbox.resumeProducing()
    h.flush()
    assert ids(c) == [f"e{i}" for i in range(fits)]
    assert outbox.dropped > 0


def test_replies_to_a_device_that_floods_without_reading_are_bounded_too(h):
    h.core.rooms.update({"flooder": ["r1"]})
    c = h.connect("flooder")
    c.server._outbox.pauseProducing()
    for i in range(200):
        c.command(request_id=f"q{i}", typing=pb.TypingCommand(room_id="r1", typing=True))
        if c.closed:
            break
    assert c.closed[0] == 4429


def test_pongs_are_not_queued_for_a_device_that_does_not_read(h):
    c = h.connect("pinger")
    outbox = c.server._outbox
    pongs = []
    c.server.sendPong = pongs.append
    c.server.onPing(b"a")
    outbox.pauseProducing()
    c.server.onPing(b"b")
    assert pongs == [b"a"]


def test_close_waits_for_queued_frames_then_for_at_most_close_timeout(h):
    h.core.rooms.update({"reader": ["r1"], "stuck": ["r1"]})
    reader, stuck = h.connect("reader"), h.connect("stuck")
    for c in (reader, stuck):
        c.server._outbox.pauseProducing()
    h.publish(channels.room("r1"), message("r1", 1))
    for c in (reader, stuck):
        c.server.close(1001, "bye")
    h.flush()
    assert reader.closed is None and stuck.closed is None
    reader.server._outbox.resumeProducing()
    h.flush()
    assert ids(reader) == ["e1"] and reader.closed[0] == 1001  # the message, then the close
    h.advance(h.config.close_timeout_sec + 0.1)
    assert stuck.closed[0] == 1001 and ids(stuck) == []


# ---------------------------------------------------------------- protocol limits


def test_permessage_deflate_is_declined():
    h = Harness()
    try:
        c = h.connect("alice", offer_deflate=True)
        assert c.factory.opened
        assert c.client._perMessageCompress is None
        assert "permessage-deflate" not in c.client.http_headers.get("sec-websocket-extensions", "")
    finally:
        h.stop()


def masked_header(first_byte, length):
    if length < 126:
        header = bytes([first_byte, 0x80 | length])
    elif length < 65536:
        header = bytes([first_byte, 0x80 | 126]) + struct.pack("!H", length)
    else:
        header = bytes([first_byte, 0x80 | 127]) + struct.pack("!Q", length)
    return header + b"\x00\x00\x00\x00"


@pytest.mark.parametrize(
    "header, code",
    [
        (masked_header(0x81, 2**63 - 1), 1009),  # the largest length a header can announce
        (masked_header(0x81, 2**63), 1002),  # beyond it: not a valid frame at all
        (masked_header(0xC1, 10), 1002),  # RSV1 (compressed) without the extension
    ],
)
def test_hostile_frame_headers_close_the_connection_before_any_payload(h, header, code):
    c = h.connect("alice")
    other = h.connect("bob")
    c.server.dataReceived(header)
    h.flush()
    assert c.closed[0] == code
    assert other.closed is None


def test_a_frame_header_over_max_message_bytes_closes_1009_before_its_payload(h):
    c = h.connect("alice")
    c.server.dataReceived(masked_header(0x81, h.config.max_message_bytes + 1))
    h.flush()
    assert c.closed[0] == 1009


def test_max_connections_refuses_with_503_and_frees_the_place_on_close():
    h = Harness(MAX_CONNECTIONS=2)
    try:
        first, second = h.connect("alice"), h.connect("bob")
        third = h.connect("carol")
        assert first.factory.opened and second.factory.opened
        assert not third.factory.opened
        assert "503" in third.client.http_status_line
        assert h.factory.full
        first.client.sendClose(1000)
        h.flush()
        assert not h.factory.full
        assert h.connect("dave").factory.opened
    finally:
        h.stop()


# ---------------------------------------------------------------- drain


def drain(h, timeout=None):
    d = defer.Deferred.fromCoroutine(h.gateway.drain(timeout))
    h.flush()
    return d


def test_drain_closes_every_device_1001_with_a_reconnect_hint(h):
    devices = [h.connect(f"p{i}") for i in range(5)]
    d = drain(h)
    assert d.called
    for c in devices:
        code, reason = c.closed
        assert code == 1001 and reason.startswith("gateway draining: reconnect in ")
    assert len(h.gateway.registry) == 0
    assert not any(k.startswith("gateway:conn:") for k in h.store.values)
    refused = h.connect("late")
    assert not refused.factory.opened and "503" in refused.client.http_status_line


def test_drain_lets_calls_in_flight_finish_before_the_close(h):
    h.core.rooms.update({"alice": ["r1"]})
    pending = defer.Deferred()
    real_call = h.core.call

    def call(method, request, token, device_id=""):
        if method == "SendEvent":
            return pending
        return real_call(method, request, token, device_id)

    h.core.call = call
    busy, idle = h.connect("alice"), h.connect("bob")
    busy.command(request_id="s1", room_event=pb.RoomEvent(room_id="r1", type=pb.RoomEvent.TEXT))
    d = drain(h)
    assert idle.closed[0] == 1001
    assert busy.closed is None and not d.called
    (refused,) = busy.command(request_id="s2", typing=pb.TypingCommand(room_id="r1", typing=True))
    assert refused.command_result.error.status == "UNAVAILABLE"
    pending.callback(pb.SendEventResponse(event=pb.RoomEvent(id="e42", room_id="r1")))
    h.flush()
    results = {e.command_result.request_id: e.command_result for e in busy.of("command_result")}
    assert results["s1"].error.status == ""
    assert busy.closed[0] == 1001
    assert d.called


def test_drain_drops_devices_still_connected_at_its_deadline(h):
    h.core.rooms.update({"alice": ["r1"]})
    h.core.call = lambda method, *a, **k: defer.Deferred() if method == "SendEvent" else defer.succeed([])
    stuck = h.connect("alice")
    stuck.command(request_id="s1", room_event=pb.RoomEvent(room_id="r1", type=pb.RoomEvent.TEXT))
    d = drain(h, timeout=3)
    assert not d.called
    h.advance(3.1)
    h.advance(5)
    assert d.called
    assert len(h.gateway.registry) == 0


# ---------------------------------------------------------------- the close handshake


def test_a_device_that_closes_and_never_reads_the_answer_is_dropped_after_close_timeout(h):
    # A device sends a valid close frame, then reads nothing: our answer (1000) never leaves
    # the transport's buffer, so the TCP close waits for it. CLOSE_TIMEOUT_SEC bounds that wait.
    h.core.rooms["alice"] = ["r1"]
    device = Device(h)
    device.send(masked(struct.pack("!H", 1000) + b"bye", opcode=0x8))
    assert device.close == (1000, "")  # answered
    assert device.transport.disconnecting and not device.transport.disconnected  # waiting for the buffer
    device.advance(h.config.close_timeout_sec - 0.1)
    assert not device.transport.disconnected
    device.advance(0.2)
    assert device.transport.disconnected  # abortConnection()
