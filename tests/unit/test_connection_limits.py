"""chatgateway.edge.limits on HTTP_PORT: per-address unauthenticated cap, handshake timeout."""

import pytest

from chatgateway.api import chat_pb2 as pb
from chatgateway.edge.http import build_http_factory
from chatgateway.edge.limits import Guard
from support.wsharness import Harness, accept

UPGRADE = (
    b"GET /ws HTTP/1.1\r\nHost: gw\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
)


@pytest.fixture
def h():
    harness = Harness(MAX_UNAUTHENTICATED_PER_ADDRESS=3, HANDSHAKE_TIMEOUT_SEC=2, AUTH_TIMEOUT_SEC=5)
    yield harness
    harness.stop()


def test_unauthenticated_connections_of_one_address_are_capped_with_429(h):
    factory = build_http_factory(h.gateway, {}, clock=h.clock)
    held = [accept(factory) for _ in range(3)]
    assert all(isinstance(p, Guard) for p, _ in held)
    refused, transport = accept(factory)
    assert not isinstance(refused, Guard)
    assert transport.value().startswith(b"HTTP/1.1 429 Too Many Requests\r\n")
    assert b"Retry-After: 5\r\n" in transport.value()
    # another address is not affected
    other, _ = accept(factory, host="10.0.0.2")
    assert isinstance(other, Guard)
    # a connection that goes away frees its place
    held[0][0].connectionLost(None)
    assert isinstance(accept(factory)[0], Guard)


def test_a_plain_http_request_stops_counting_once_its_headers_are_in(h):
    factory = build_http_factory(h.gateway, {}, clock=h.clock)
    for _ in range(3):
        proto, transport = accept(factory)
        proto.dataReceived(b"GET /healthz HTTP/1.1\r\nHost: gw\r\n\r\n")
        assert b"200 OK" in transport.value()
    assert factory.pending == {}
    assert isinstance(accept(factory)[0], Guard)


def test_a_websocket_counts_until_its_session_is_authenticated(h):
    factory = build_http_factory(h.gateway, {}, clock=h.clock)
    proto, transport = accept(factory)
    proto.dataReceived(UPGRADE)
    assert b"101 Switching Protocols" in transport.value()
    assert factory.pending["10.0.0.1"] == 1
    device = proto.wrappedProtocol
    device._opening.receive(pb.StreamRequest(auth_token="alice", device_id="phone"))  # the first frame
    assert device.session is not None
    assert factory.pending == {}


def upgrade(path):
    return UPGRADE.replace(b"GET /ws ", b"GET " + path + b" ", 1)


def test_an_upgrade_through_the_site_counts_too_until_its_session_is_authenticated(h):
    factory = build_http_factory(h.gateway, {}, clock=h.clock)
    held = []
    for path in (b"/ws/x", b"/ws/", b"/ws"):
        proto, transport = accept(factory)
        if path == b"/ws":  # after a plain request on the same connection
            proto.dataReceived(b"GET /healthz HTTP/1.1\r\nHost: gw\r\n\r\n")
            assert b"200 OK" in transport.value()
        proto.dataReceived(upgrade(path))
        assert b"101 Switching Protocols" in transport.value()
        held.append(proto)
    assert factory.pending["10.0.0.1"] == 3
    refused, transport = accept(factory)
    assert transport.value().startswith(b"HTTP/1.1 429 Too Many Requests\r\n")
    device = held[0].wrappedProtocol
    device._opening.receive(pb.StreamRequest(auth_token="alice", device_id="phone"))  # the first frame
    assert factory.pending["10.0.0.1"] == 2


def test_an_upgrade_after_plain_requests_is_refused_429_when_its_address_is_at_the_cap(h):
    factory = build_http_factory(h.gateway, {}, clock=h.clock)
    keep_alive, transport = accept(factory)
    keep_alive.dataReceived(b"GET /healthz HTTP/1.1\r\nHost: gw\r\n\r\n")
    silent = [accept(factory) for _ in range(3)]  # the address is at its cap again
    assert all(isinstance(p, Guard) for p, _ in silent)
    keep_alive.dataReceived(upgrade(b"/ws"))
    answer = transport.value().split(b'{"status": "alive"}\n', 1)[1]  # after the /healthz response
    assert answer.startswith(b"HTTP/1.1 429 ") and b"Retry-After: 5\r\n" in answer
    assert transport.disconnecting
    assert factory.pending["10.0.0.1"] == 3


def test_a_connection_that_sends_no_request_is_dropped_after_the_handshake_timeout(h):
    factory = build_http_factory(h.gateway, {}, clock=h.clock)
    silent, silent_transport = accept(factory)
    talker, talker_transport = accept(factory)
    talker.dataReceived(b"GET /healthz HTTP/1.1\r\nHost: gw\r\n")  # headers not complete yet
    h.clock.advance(1.9)
    assert not silent_transport.disconnecting
    talker.dataReceived(b"\r\n")
    h.clock.advance(0.2)
    assert silent_transport.disconnecting
    assert not talker_transport.disconnecting
    assert b"200 OK" in talker_transport.value()


def test_no_cap_when_set_to_zero():
    h = Harness(MAX_UNAUTHENTICATED_PER_ADDRESS=0)
    try:
        factory = build_http_factory(h.gateway, {}, clock=h.clock)
        assert all(isinstance(accept(factory)[0], Guard) for _ in range(200))
    finally:
        h.stop()


def test_an_idle_keep_alive_connection_is_dropped_after_the_handshake_timeout(h):
    factory = build_http_factory(h.gateway, {}, clock=h.clock)
    proto, transport = accept(factory)
    proto.dataReceived(b"GET /healthz HTTP/1.1\r\nHost: gw\r\n\r\n")
    assert b"200 OK" in transport.value()
    h.clock.advance(1.5)
    proto.dataReceived(b"GET /healthz HTTP/1.1\r\nHost: gw\r\n\r\n")  # the next request in time
    assert transport.value().count(b"200 OK") == 2
    h.clock.advance(1.9)
    assert not transport.disconnecting
    h.clock.advance(0.2)  # nothing more within HANDSHAKE_TIMEOUT_SEC of the last response
    assert transport.disconnecting
