"""HTTP_PORT's first step: a connection goes to the WebSocket edge or to the Site by its request line.

A WebSocket opening handshake (``GET /ws`` or ``GET /ws?...``) is handed to Autobahn
directly, which parses the request itself, as a bare Autobahn server does. Through
twisted.web it was parsed twice: by the Site (request line, headers, resource
lookup, a Request object, keep-alive bookkeeping), then by Autobahn from bytes
that WebSocketResource re-serialized from that Request, about 0.1 ms of the
reactor per connect, a tenth of what a whole connect costs it. Everything
else, ``/ws/...`` and other methods included, goes to the Site as before, which
still serves a WebSocket there through WebSocketResource.

An upgrade over MAX_CONNECTS_PER_SECOND is refused here, with 503 and a jittered
Retry-After, before Autobahn parses its headers and long before its token is verified
(docs/security.md#storm-control): a refusal costs a fraction of an upgrade.

Only the first request of a connection is routed: the Site keeps a plain HTTP
connection for its keep-alive requests, and an upgraded one never speaks HTTP
again.
"""

from twisted.internet import protocol

from chatgateway.edge.limits import Guard, Refused, http_refusal, over_connect_rate
from chatgateway.sessions.ratelimit import TOO_MANY_CONNECTS

# A request line longer than this without its end goes to the Site, which refuses it.
MAX_REQUEST_LINE = 16384
WEBSOCKET_PATH = b"/ws"


def is_websocket_request(line):
    """Whether a request line (without its CRLF) is a GET of the WebSocket endpoint."""
    method, _, rest = line.partition(b" ")
    target = rest.partition(b" ")[0]
    return method == b"GET" and (target == WEBSOCKET_PATH or target.startswith(WEBSOCKET_PATH + b"?"))


class _FirstRequestLine(protocol.Protocol):
    """Reads up to the end of the first request line, then gives the connection away."""

    def __init__(self, router, address):
        self._router = router
        self._address = address
        self._buffer = b""

    def dataReceived(self, data):
        buffer = self._buffer + data
        end = buffer.find(b"\n")
        if end < 0 and len(buffer) <= MAX_REQUEST_LINE:
            self._buffer = buffer
            return
        self._buffer = b""
        websocket = end >= 0 and is_websocket_request(buffer[:end].rstrip(b"\r"))
        self._hand_over(websocket, buffer)

    def _hand_over(self, websocket, buffer):
        router, transport = self._router, self.transport
        # The Guard's handshake timeout keeps running until the request's headers are in:
        # the Site or the WebSocket protocol (onConnect) tells it.
        devices = router.devices
        if websocket and over_connect_rate(devices.gateway, devices.protocol):
            retry_after = devices.gateway.connects.retry_after()
            successor = Refused(http_refusal(503, TOO_MANY_CONNECTS, retry_after), router.clock)
        else:
            successor = (devices if websocket else router.site).buildProtocol(self._address)
            if successor is None:
                transport.loseConnection()
                return
            if websocket:
                successor.rate_checked = True
        if isinstance(transport, Guard):
            transport.wrappedProtocol = successor
        else:
            transport.protocol = successor
        successor.makeConnection(transport)
        successor.dataReceived(buffer)

    def connectionLost(self, reason):
        self._buffer = b""


class EdgeRouter(protocol.Factory):
    """The factory of HTTP_PORT's connections, under the connection limits (chatgateway.edge.limits)."""

    noisy = False

    def __init__(self, site, devices, clock=None):
        self.site = site
        self.devices = devices  # the WebSocket factory: its connections count toward MAX_CONNECTIONS
        self.clock = clock if clock is not None else devices.gateway.clock  # of the refusals' linger

    def buildProtocol(self, addr):
        return _FirstRequestLine(self, addr)

    def startFactory(self):
        self.site.doStart()
        self.devices.doStart()

    def stopFactory(self):
        self.devices.doStop()
        self.site.doStop()
