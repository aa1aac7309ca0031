"""What a device may send (issue #13): every frame and byte counts, on a task.Clock.

The budget itself (chatgateway.sessions.ratelimit.InboundBudget), then the WebSocket edge on a
StringTransport: over budget it stops reading (pauseProducing) and parses nothing more
until its timer resumes it, and a device that keeps exceeding it is closed with 1008.
"""

import json
import struct

import grpc
import pytest
from twisted.internet import task

from chatgateway.api import chat_pb2 as pb
from chatgateway.sessions.ratelimit import STREAK_GAP_SEC, InboundBudget
from support.rawdevice import MALFORMED, PING, Device, masked
from support.wsharness import Harness


def budget(frames=100, byte_rate=100_000, close_after=5):
    clock = task.Clock()
    return clock, InboundBudget(frames, byte_rate, clock, close_after)


def spend_frames(b, n):
    for _ in range(n):
        b.frames -= 1


# ---------------------------------------------------------------- the budget


def test_a_second_of_frames_then_over_until_a_tenth_of_a_second_has_refilled():
    clock, b = budget(frames=100)
    spend_frames(b, 99)
    assert not b.over
    spend_frames(b, 1)
    assert b.over
    assert b.pause() == pytest.approx(0.1)  # 10 frames' worth, not one: no timer per frame
    assert b.exceeded == "frame"
    clock.advance(0.1)
    b.resume()
    assert b.frames == pytest.approx(10) and not b.over
    clock.advance(60)
    b.refill()
    assert b.frames == 100  # the burst is one second's worth


def test_bytes_beyond_the_budget_wait_until_the_debt_is_paid_and_a_tenth_has_refilled():
    clock, b = budget(byte_rate=1000)
    b.spend_bytes(1500)  # one read may overshoot: it is counted, then paid back
    assert b.over and b.bytes == -500
    assert b.pause() == pytest.approx((500 + 100) / 1000)
    assert b.exceeded == "byte"
    clock.advance(0.6)
    b.resume()
    assert not b.over


def flood(clock, b, seconds):
    """A device that spends its budget as soon as it is read again; (time, persistent) of each pause."""
    flags = []
    stop = clock.seconds() + seconds
    while clock.seconds() < stop:
        spend_frames(b, int(b.frames))
        delay = b.pause()
        flags.append((clock.seconds(), b.persistent))
        clock.advance(delay)
        b.resume()
    return flags


def test_a_device_over_budget_pause_after_pause_is_persistent_after_close_after():
    clock, b = budget(close_after=5)
    start = clock.seconds()
    flags = flood(clock, b, 6)
    assert [at - start for at, persistent in flags if persistent][0] == pytest.approx(5, abs=0.11)
    assert not any(persistent for at, persistent in flags if at - start < 5)


def test_a_second_within_budget_ends_the_streak():
    clock, b = budget(close_after=5)
    for _ in range(4):  # over budget for 3 s, then within it for more than a second
        assert not any(persistent for _, persistent in flood(clock, b, 3))
        clock.advance(STREAK_GAP_SEC + 0.1)


# ---------------------------------------------------------------- the WebSocket edge


@pytest.fixture
def h():
    harness = Harness(MAX_FRAMES_PER_SECOND=20, OVER_BUDGET_CLOSE_SEC=2, MAX_TOKEN_REFRESHES_PER_MINUTE=3)
    harness.core.rooms["alice"] = ["r1"]
    yield harness
    harness.stop()


def test_frames_beyond_the_budget_are_not_parsed_and_the_device_is_not_read_until_it_refills(h):
    d = Device(h)
    d.send((PING + MALFORMED) * 15)  # control frames and frames that will not parse count alike
    assert (d.count(0xA), len(d.errors())) == (10, 10)  # 20 frames: the budget's burst
    assert d.paused
    assert len(d.protocol.data) == 5 * len(PING + MALFORMED)  # the rest waits, unparsed
    d.send(PING)  # a transport that delivers while paused: still not parsed
    assert d.count(0xA) == 10
    d.advance(0.099)
    assert d.paused and d.count(0xA) == 10  # one timer, no polling
    d.advance(0.001)  # a tenth of a second refilled: 2 frames
    assert (d.count(0xA), len(d.errors())) == (11, 11) and d.paused
    d.run_for(1)
    assert (d.count(0xA), len(d.errors())) == (16, 15)  # all of them, in order, within the budget
    assert not d.paused and d.protocol.data == b""
    assert d.close is None


def test_bytes_beyond_the_budget_pause_reading_until_they_are_paid_back():
    h = Harness(MAX_BYTES_PER_SECOND=65536, MAX_MESSAGE_BYTES=65536)
    h.core.rooms["alice"] = ["r1"]
    try:
        d = Device(h)
        big = masked(json.dumps({"ack": {"eventId": "x" * 40_000}}).encode())
        d.send(big * 2)  # the frame budget allows both; 80 KB is more than a second's worth of bytes
        assert d.paused and d.protocol.data == b""
        d.advance((2 * len(big) - 65536 + 6553.6) / 65536 - 0.01)
        assert d.paused
        d.advance(0.02)
        assert not d.paused and d.close is None
    finally:
        h.stop()


def test_a_device_that_keeps_exceeding_the_budget_is_closed_1008(h):
    d = Device(h)
    started = h.clock.seconds()
    while d.close is None and h.clock.seconds() - started < 5:
        d.send(PING * 10)  # 100 frames/s against a budget of 20
        d.advance(0.1)
    assert d.close == (1008, "frame rate exceeded: over MAX_FRAMES_PER_SECOND for 2 s")
    assert 2 <= h.clock.seconds() - started <= 2.3
    # Its close handshake is read within the budget too, behind the frames that wait.
    d.send(masked(struct.pack("!H", 1000), opcode=0x8))
    d.run_for(10)
    assert d.transport.disconnecting


def test_bursts_with_quiet_seconds_between_them_are_never_closed(h):
    d = Device(h)
    for _ in range(5):
        d.send(PING * 40)  # twice the burst: paused for a second
        assert d.paused and d.count(0xA) % 40 == 20
        d.run_for(1.0)
        assert d.count(0xA) % 40 == 0
        d.run_for(STREAK_GAP_SEC + 0.5)
    assert d.count(0xA) == 200 and d.close is None


def test_token_refreshes_beyond_their_rate_are_refused_without_verifying(h, monkeypatch):
    c = h.connect("alice/phone")
    verified = []
    real_verify = h.gateway.verifier.verify
    monkeypatch.setattr(h.gateway.verifier, "verify", lambda token: verified.append(token) or real_verify(token))
    for i in range(5):
        c.send(pb.StreamRequest(auth_token=f"alice/phone@{h.clock.seconds() + 3600 + i}"))
    assert len(verified) == 3  # MAX_TOKEN_REFRESHES_PER_MINUTE
    refused = [e.error for e in c.of("error")]
    assert [e.status for e in refused] == [grpc.StatusCode.RESOURCE_EXHAUSTED.name] * 2
    assert "MAX_TOKEN_REFRESHES_PER_MINUTE" in refused[0].message
    h.advance(20)  # a third of a minute: one more
    c.send(pb.StreamRequest(auth_token="alice/phone"))
    assert len(verified) == 4 and c.closed is None
