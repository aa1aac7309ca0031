"""Limits on the TCP connections of HTTP_PORT, before any request is served.

Every connection is wrapped (twisted.protocols.policies) to enforce two limits
that no single request can see:

- HANDSHAKE_TIMEOUT_SEC: a connection must deliver the headers of its first
  request within this time, and of each next request within this time after the
  previous response, or it is dropped (slow-header "slowloris" clients, idle
  keep-alive connections). For WebSocket, Autobahn's own open-handshake timeout
  (the same setting) then covers the upgrade, and AUTH_TIMEOUT_SEC the
  first-frame authentication.
- MAX_UNAUTHENTICATED_PER_ADDRESS: connections of one client address that are
  not yet authenticated - from TCP accept until the headers of a plain HTTP
  request arrive, or until a WebSocket session is authenticated. A connection
  beyond it is answered ``429 Too Many Requests`` and closed, before anything
  is parsed. Every WebSocket upgrade that reaches Autobahn counts again until
  its session is authenticated, however it got there (from the router, or
  through the Site on any path under /ws, after keep-alive requests or not);
  one that would pass the cap is refused with 429. 0 turns the cap off.

And one limit of the process: MAX_CONNECTS_PER_SECOND new connections (and
CONNECT_BURST at once) of either edge, asked before anything of their sign-in is
done (``over_connect_rate``; docs/security.md#storm-control).

The address is the TCP peer's: behind a proxy that does not preserve client
addresses, every client shares the proxy's address (raise the cap, or use a
layer-4 load balancer that keeps client IPs).
"""

import collections

from twisted.internet import protocol
from twisted.logger import Logger
from twisted.protocols.policies import ProtocolWrapper, WrappingFactory

RETRY_AFTER_SEC = 5


def http_refusal(status, reason, retry_after=RETRY_AFTER_SEC):
    """A complete HTTP/1.1 response that closes the connection."""
    body = f"{status} {reason}\n".encode("ascii")
    head = (
        f"HTTP/1.1 {status} {reason}\r\n"
        f"Retry-After: {retry_after}\r\n"
        "Content-Type: text/plain\r\n"
        f"Content-Length: {len(body)}\r\n"
        "Connection: close\r\n\r\n"
    ).encode("ascii")
    return head + body


def over_connect_rate(gateway, transport):
    """Whether a new connection of ``transport`` (its class or itself) is over the gateway's
    MAX_CONNECTS_PER_SECOND: then it is counted, and to be refused (503, or 1013 on gRPC)."""
    if gateway.connects.admit():
        return False
    gateway.counts.connect_refused(transport.transport_name)
    return True


class Refused(protocol.Protocol):
    """Answers one canned response, then ends the connection.

    What the client sends meanwhile is read and discarded: closing a socket with
    unread data would reset it, and the client might lose the response.
    """

    LINGER_SEC = 2.0

    def __init__(self, response, clock):
        self._response = response
        self._clock = clock
        self._abort = None

    def connectionMade(self):
        self.transport.write(self._response)
        half_close = getattr(self.transport, "loseWriteConnection", None)
        if half_close is None:
            self.transport.loseConnection()
            return
        half_close()
        self._abort = self._clock.callLater(self.LINGER_SEC, self.transport.abortConnection)

    def dataReceived(self, data):
        pass

    def connectionLost(self, reason):
        if self._abort is not None and self._abort.active():
            self._abort.cancel()


class Guard(ProtocolWrapper):
    """One TCP connection of HTTP_PORT: counts it while unauthenticated, times its handshake."""

    pending = False
    _timer = None
    _lost = False

    def connectionMade(self):
        self.address = _host(self.transport.getPeer())
        self._count()
        self._arm()
        super().connectionMade()

    def _count(self):
        self.factory.pending[self.address] += 1
        self.pending = True

    def _arm(self):
        self._cancel_timer()
        if self.factory.handshake_timeout:
            self._timer = self.factory.clock.callLater(self.factory.handshake_timeout, self._handshake_timeout)

    def request_received(self):
        """The headers of a request arrived (called by the Site's requests): it no longer counts.

        The Site cannot tell which requests its WebSocketResource will upgrade; the upgrade
        itself counts again (upgrade_received), in the same call.
        """
        self._cancel_timer()
        self.authenticated()

    def upgrade_received(self):
        """The headers of a WebSocket upgrade reached Autobahn (called by its onConnect): the
        connection counts until its session is authenticated. False if it did not count any
        more and its address is at the cap: the upgrade is to be refused with 429."""
        self._cancel_timer()
        if not self.pending:
            if not self.factory.admits(self.address):
                return False
            self._count()
        return True

    def response_finished(self):
        """A plain HTTP response was sent: the next request has HANDSHAKE_TIMEOUT_SEC to arrive."""
        if not self._lost and not self.disconnecting:
            self._arm()

    def authenticated(self):
        """A WebSocket session on this connection was authenticated."""
        if self.pending:
            self.pending = False
            self.factory.release(self.address)

    def _handshake_timeout(self):
        self._timer = None
        self.factory.log.debug("dropped {address}: no request within the handshake timeout", address=self.address)
        self.transport.abortConnection()

    def _cancel_timer(self):
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None

    def connectionLost(self, reason):
        self._lost = True
        self._cancel_timer()
        self.authenticated()
        super().connectionLost(reason)


class ConnectionLimits(WrappingFactory):
    """Wraps the Site of HTTP_PORT; see the module docstring."""

    protocol = Guard
    log = Logger()

    def __init__(self, site, clock, max_unauthenticated_per_address, handshake_timeout):
        super().__init__(site)
        self.clock = clock
        self.max_pending = max_unauthenticated_per_address
        self.handshake_timeout = handshake_timeout
        self.pending = collections.Counter()  # client address -> unauthenticated connections
        self.refused = 0

    def buildProtocol(self, addr):
        if not self.admits(_host(addr)):
            return Refused(http_refusal(429, "Too Many Requests"), self.clock)
        return super().buildProtocol(addr)

    def admits(self, host):
        """Whether one more unauthenticated connection of ``host`` is within the cap."""
        if self.max_pending and self.pending[host] >= self.max_pending:
            self.refused += 1
            self.log.debug("refused {address}: too many unauthenticated connections", address=host)
            return False
        return True

    def release(self, address):
        self.pending[address] -= 1
        if self.pending[address] <= 0:
            del self.pending[address]


def _host(address):
    return getattr(address, "host", None) or str(address)
