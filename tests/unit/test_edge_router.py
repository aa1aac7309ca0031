"""chatgateway.edge.router: HTTP_PORT's connections go to Autobahn or to the Site by their request line."""

import pytest
from autobahn.twisted.websocket import WebSocketServerProtocol
from twisted.web.http import _GenericHTTPChannelProtocol as SiteChannel

from chatgateway.edge.http import build_http_factory
from chatgateway.edge.router import MAX_REQUEST_LINE, is_websocket_request
from chatgateway.edge.websocket import DeviceProtocol
from support.wsharness import Harness, accept

UPGRADE_HEADERS = (
    b"Host: gw\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
)


@pytest.fixture
def h():
    harness = Harness(HANDSHAKE_TIMEOUT_SEC=2, AUTH_TIMEOUT_SEC=5)
    yield harness
    harness.stop()


def connect(h):
    return accept(build_http_factory(h.gateway, {}, clock=h.clock))


@pytest.mark.parametrize(
    "line, websocket",
    [
        (b"GET /ws HTTP/1.1", True),
        (b"GET /ws?access_token=abc&device_id=x HTTP/1.1", True),
        (b"GET /ws/ HTTP/1.1", False),
        (b"GET /wsx HTTP/1.1", False),
        (b"POST /ws HTTP/1.1", False),
        (b"get /ws HTTP/1.1", False),
        (b"GET http://gw/ws HTTP/1.1", False),
        (b"GET /healthz HTTP/1.1", False),
        (b"PRI * HTTP/2.0", False),
        (b"", False),
    ],
)
def test_which_request_lines_are_the_websocket_endpoint(line, websocket):
    assert is_websocket_request(line) is websocket


def test_an_upgrade_goes_to_autobahn_even_when_its_request_line_comes_in_pieces(h):
    guard, transport = connect(h)
    for piece in (b"GE", b"T /w", b"s HTTP/1.1", b"\r\n"):
        guard.dataReceived(piece)
    assert transport.value() == b""
    guard.dataReceived(UPGRADE_HEADERS)
    assert isinstance(guard.wrappedProtocol, DeviceProtocol)
    assert transport.value().startswith(b"HTTP/1.1 101 Switching Protocols\r\n")
    assert guard.wrappedProtocol in guard.factory.wrappedFactory.devices.connections  # counted toward MAX_CONNECTIONS


def test_plain_http_goes_to_the_site_and_keeps_its_connection_alive(h):
    guard, transport = connect(h)
    guard.dataReceived(b"GET /healthz HTTP/1.1\r\nHost: gw\r\n\r\n")
    assert isinstance(guard.wrappedProtocol, SiteChannel)
    guard.dataReceived(b"GET /healthz HTTP/1.1\r\nHost: gw\r\n\r\n")
    assert transport.value().count(b"HTTP/1.1 200 OK") == 2


def test_a_websocket_under_another_path_is_still_served_by_the_site(h):
    guard, transport = connect(h)
    guard.dataReceived(b"GET /ws/ HTTP/1.1\r\n" + UPGRADE_HEADERS)
    assert isinstance(guard.wrappedProtocol, WebSocketServerProtocol)  # WebSocketResource took it over
    assert transport.value().startswith(b"HTTP/1.1 101 Switching Protocols\r\n")


def test_a_request_line_without_an_end_goes_to_the_site_which_drops_it(h):
    guard, transport = connect(h)
    guard.dataReceived(b"GET /" + b"a" * (MAX_REQUEST_LINE - 10))
    assert transport.value() == b"" and not transport.disconnecting  # still reading the line
    guard.dataReceived(b"a" * 20)
    assert isinstance(guard.wrappedProtocol, SiteChannel)
    assert transport.disconnecting  # twisted.web's line limit, as before the router


def test_an_upgrade_whose_headers_never_come_is_dropped_after_the_handshake_timeout(h):
    slow, slow_transport = connect(h)
    done, done_transport = connect(h)
    h.clock.advance(1.5)
    slow.dataReceived(b"GET /ws HTTP/1.1\r\nHost: gw\r\n")  # handed to Autobahn; the rest never comes
    done.dataReceived(b"GET /ws HTTP/1.1\r\n" + UPGRADE_HEADERS)
    h.clock.advance(0.4)
    assert not slow_transport.disconnecting
    h.clock.advance(0.2)  # HANDSHAKE_TIMEOUT_SEC (2) from the connection, not from the request line
    assert slow_transport.disconnecting
    assert not done_transport.disconnecting
