"""The storm's reconnecting devices (support.stormdevices), on a MemoryReactorClock: when and
where a device tries again after its gateway died, refused it or closed it with a hint
(docs/protocol.md#reconnect-hints)."""

import argparse

import pytest
from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionDone, ConnectionRefusedError
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure

from chatgateway.api import chat_pb2 as pb
from support.stormdevices import Fleet, full_jitter, next_try, retry_after, told_delay

BASE, CAP = 1.0, 60.0


class Top:
    """An rng whose uniform(a, b) is always b: the longest delay the policy allows."""

    def uniform(self, a, b):
        return b


class Bottom:
    def uniform(self, a, b):
        return a


def test_retry_after_and_reconnect_hints_are_read():
    assert retry_after(b"HTTP/1.1 503 Service Unavailable\r\nRetry-After: 7\r\nServer: x") == 7.0
    assert retry_after(b"HTTP/1.1 429 Too Many Requests\r\nretry-after:  2.5\r\n") == 2.5
    assert retry_after(b"HTTP/1.1 503 Service Unavailable\r\nServer: x") is None
    assert told_delay("gateway draining: reconnect in 2.7s") == 2.7
    assert told_delay("core unavailable: too many calls to the core in flight: reconnect in 6.3s") == 6.3
    assert told_delay("core unavailable: deadline exceeded") is None
    assert told_delay("") is None


def test_full_jitter_grows_with_each_failure_up_to_the_cap():
    assert [full_jitter(n, BASE, CAP, Top()) for n in range(8)] == [1, 2, 4, 8, 16, 32, 60, 60]
    assert full_jitter(5, BASE, CAP, Bottom()) == 0
    assert full_jitter(10_000, BASE, CAP, Top()) == CAP  # no overflow however many failures


def test_a_refusal_with_retry_after_waits_at_least_that_long_on_the_same_url():
    head = b"HTTP/1.1 503 Service Unavailable\r\nRetry-After: 7\r\n"
    assert next_try(503, head, "", 0, BASE, CAP, Top()) == (7.0, True, "retry_after")
    assert next_try(429, head, "", 0, BASE, CAP, Bottom()) == (7.0, True, "retry_after")
    # never sooner than the backoff of the device's 5th failure in a row
    assert next_try(503, head, "", 5, BASE, CAP, Top()) == (32.0, True, "retry_after")
    # a refusal that says nothing: backoff, elsewhere
    assert next_try(503, b"HTTP/1.1 503 Service Unavailable\r\n", "", 2, BASE, CAP, Top()) == (4.0, False, "backoff")
    assert next_try(401, head, "", 0, BASE, CAP, Top()) == (1.0, False, "backoff")


def test_a_close_with_a_hint_waits_at_least_the_hint_then_goes_elsewhere():
    assert next_try(None, b"", "gateway draining: reconnect in 2.7s", 0, BASE, CAP, Top()) == (2.7, False, "told")
    assert next_try(None, b"", "gateway draining: reconnect in 2.7s", 3, BASE, CAP, Top()) == (8.0, False, "told")
    assert next_try(None, b"", "", 0, BASE, CAP, Bottom()) == (0.0, False, "backoff")


# ------------------------------------------------------------------ a device on a MemoryReactorClock


def fleet(reactor, count=1):
    args = argparse.Namespace(
        urls=["ws://127.0.0.1:1001/ws", "ws://127.0.0.1:1002/ws"],
        secret="unit-secret-0123456789abcdef0123456789",
        count=count,
        first=0,
        profiles=0,
        prefix="unit",
        source=None,
        base=BASE,
        cap=CAP,
        attempt_timeout=30.0,
        hello="connected",
    )
    return Fleet(reactor, args)


def accept(reactor):
    """The protocol of the last TCP connect the reactor was asked for, connected; (port, protocol, transport)."""
    host, port, factory, timeout, bind = reactor.tcpClients[-1]
    protocol = factory.buildProtocol(IPv4Address("TCP", host, port))
    transport = StringTransport()
    protocol.makeConnection(transport)
    return port, protocol, transport


def frame(event):
    payload = event.SerializeToString()
    assert len(payload) < 126
    return bytes([0x82, len(payload)]) + payload


UPGRADED = b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n"
CONNECTED = frame(pb.ServerEvent(id="c", connected=pb.Connected(session_id="s")))


@pytest.fixture
def clock():
    return MemoryReactorClock()


def connect_first(clock, devices):
    device = devices.devices[0]
    device.connect()
    port, protocol, transport = accept(clock)
    assert port == 1001  # the first URL first
    assert b"Authorization: Bearer " in transport.value() and b"chat.v1.proto" in transport.value()
    protocol.dataReceived(UPGRADED + CONNECTED)
    assert device.first.called and devices.connected == 1
    return device, protocol


def test_a_device_whose_gateway_died_reconnects_to_the_next_url_after_jittered_backoff(clock, monkeypatch):
    monkeypatch.setattr("support.stormdevices.random", Top())
    devices = fleet(clock)
    device, protocol = connect_first(clock, devices)
    devices.mark(clock.seconds())
    protocol.connectionLost(Failure(ConnectionDone()))  # SIGKILL: no close frame
    assert devices.connected == 0 and devices.counts["lost"] == 1
    clock.advance(0.999)
    assert len(clock.tcpClients) == 1  # not before uniform(0, 1 s) is over
    clock.advance(0.001)
    port, protocol, _ = accept(clock)
    assert port == 1002
    protocol.dataReceived(UPGRADED + CONNECTED)
    stats = devices.stats()
    assert stats["reconnected"] == 1 and stats["connected"] == 1 and stats["backoff"] == 1


def test_a_refused_reconnect_waits_retry_after_on_the_same_url_and_backoff_restarts_once_connected(clock, monkeypatch):
    monkeypatch.setattr("support.stormdevices.random", Bottom())
    devices = fleet(clock)
    device, protocol = connect_first(clock, devices)
    protocol.connectionLost(Failure(ConnectionDone()))
    clock.advance(0)
    port, protocol, transport = accept(clock)
    assert port == 1002
    protocol.dataReceived(b"HTTP/1.1 503 Service Unavailable\r\nRetry-After: 4\r\nContent-Length: 0\r\n\r\n")
    assert transport.disconnecting
    protocol.connectionLost(Failure(ConnectionDone()))
    assert devices.counts["refused"] == {"503": 1} and devices.counts["retry_after"] == 1
    clock.advance(3.9)
    assert len(clock.tcpClients) == 2
    clock.advance(0.1)
    port, protocol, _ = accept(clock)
    assert port == 1002  # the same gateway: it is up and said when
    assert device.attempt == 2
    protocol.dataReceived(UPGRADED + CONNECTED)
    assert device.attempt == 0 and devices.connected == 1


def test_a_close_with_a_hint_is_honoured_and_a_refused_tcp_connect_moves_on(clock, monkeypatch):
    monkeypatch.setattr("support.stormdevices.random", Bottom())
    devices = fleet(clock)
    device, protocol = connect_first(clock, devices)
    reason = b"gateway draining: reconnect in 2.5s"
    protocol.dataReceived(bytes([0x88, 2 + len(reason)]) + (1001).to_bytes(2, "big") + reason)
    protocol.connectionLost(Failure(ConnectionDone()))
    assert devices.counts["close_codes"] == {"1001": 1} and devices.counts["told"] == 1
    clock.advance(2.4)
    assert len(clock.tcpClients) == 1
    clock.advance(0.1)
    host, port, factory, timeout, bind = clock.tcpClients[-1]
    assert port == 1002
    factory.clientConnectionFailed(None, Failure(ConnectionRefusedError()))
    assert devices.counts["connect_errors"] == 1
    clock.advance(0)
    assert clock.tcpClients[-1][1] == 1001  # and round again


def test_an_attempt_without_connected_in_time_is_abandoned(clock, monkeypatch):
    monkeypatch.setattr("support.stormdevices.random", Bottom())
    devices = fleet(clock)
    devices.devices[0].connect()
    port, protocol, transport = accept(clock)
    protocol.dataReceived(UPGRADED)  # upgraded, but `connected` never comes
    clock.advance(30)
    assert devices.counts["timeouts"] == 1 and transport.disconnecting
    protocol.connectionLost(Failure(ConnectionDone()))
    clock.advance(0)
    assert clock.tcpClients[-1][1] == 1002 and not devices.devices[0].first.called
