"""The WebSocket edge: frames in and out of a Session (docs/architecture.md#websocket-contract).

Thin by design: authentication at the handshake or in the first frame, then
every frame is decoded and handed to the Session; the protocol also serves
as the Session's transport. Outbound frames go through the connection's
Outbox (chatgateway.sessions.outbox), the transport's streaming producer, which bounds
them to SEND_BUFFER_BYTES and closes a slow consumer with 4429.

Limits (docs/security.md#limits): frames and messages up to MAX_MESSAGE_BYTES (1009),
an inbound budget (MAX_FRAMES_PER_SECOND, MAX_BYTES_PER_SECOND: a device over
it is not read until it refills, and one that stays over it for
OVER_BUDGET_CLOSE_SEC is closed with 1008),
permessage-deflate declined (no decompression bombs; one encoding per event),
Autobahn's open- and close-handshake timeouts (HANDSHAKE_TIMEOUT_SEC,
CLOSE_TIMEOUT_SEC), AUTH_TIMEOUT_SEC for first-frame auth, MAX_CONNECTIONS per
process (HTTP 503), and while the gateway drains, new handshakes get 503 too, as do those
over MAX_CONNECTS_PER_SECOND (docs/security.md#storm-control), with a jittered Retry-After.
"""

import pprint

import autobahn.websocket.protocol
import grpc
import txaio
from autobahn.twisted.websocket import WebSocketServerFactory, WebSocketServerProtocol
from autobahn.util import encode_truncate
from autobahn.websocket.protocol import WebSocketProtocol
from autobahn.websocket.types import ConnectionDeny
from zope.interface import implementer

from chatgateway.api import codec
from chatgateway.edge.limits import RETRY_AFTER_SEC, Guard, over_connect_rate
from chatgateway.edge.origins import OriginPolicy
from chatgateway.sessions.opening import Opening, Reasons, bearer_token, first_param
from chatgateway.sessions.outbox import Outbox, classify, direct_socket, unsent_bytes
from chatgateway.sessions.ratelimit import TOO_MANY_CONNECTS, InboundBudget
from chatgateway.sessions.session import CloseCode, ISessionTransport, error_detail

# How the close reasons of a device that did not sign in name what it sends.
REASONS = Reasons("frame")
# A server's ping with no payload (FIN, opcode 9; unmasked, length 0).
PING_FRAME = b"\x89\x00"
# WebSocket close reasons are limited to 123 bytes of UTF-8.
MAX_REASON_BYTES = 123
# What Autobahn keeps of the opening handshake for the connection's lifetime; it reads
# them only while the handshake runs (the Authorization header alone is ~300 bytes).
HANDSHAKE_ATTRIBUTES = (
    "http_headers",
    "http_headers_cnt",
    "http_request_data",
    "http_response_data",
    "http_status_line",
    "http_request_uri",
    "http_request_path",
    "http_request_params",
    "http_request_host",
    "websocket_protocols",
    "websocket_extensions",
    "websocket_origin",
    "_wskey",
)


class _LazyPformat:
    """pprint.pformat(value), computed only when a log line is written with it."""

    __slots__ = ("value",)

    def __init__(self, value):
        self.value = value

    def __str__(self):
        return pprint.pformat(self.value)

    __repr__ = __str__


# Autobahn pretty-prints its ~30 protocol options for a debug line on every new
# connection, whether or not debug lines are kept: ~230 us, more than the rest of
# its opening handshake. Formatted lazily, it costs nothing unless LOG_LEVEL=debug.
# (A deliberate patch of Autobahn's module, hence the ignores: a class where a function was.)
autobahn.websocket.protocol.pformat = _LazyPformat  # type: ignore[assignment]
# The module's one non-logging use must keep returning a str.
autobahn.websocket.protocol.Timings.__str__ = lambda self: pprint.pformat(self._timings)  # type: ignore[method-assign]


def choose_subprotocol(offered):
    """The first subprotocol of ours the client offered; JSON when none is offered."""
    for name in offered:
        if name in codec.SUBPROTOCOLS:
            return name
    if offered:
        raise ConnectionDeny(ConnectionDeny.BAD_REQUEST, "supported subprotocols: " + ", ".join(codec.SUBPROTOCOLS))
    return None


def close_frame_error(code, reason):
    """Why a device's close frame is invalid (RFC 6455 section 7.4), as the (close code, reason)
    to answer it with, or None. The rules are Autobahn's own."""
    if code is not None and not (code in WebSocketProtocol.CLOSE_STATUS_CODES_ALLOWED or 3000 <= code <= 4999):
        return WebSocketProtocol.CLOSE_STATUS_CODE_PROTOCOL_ERROR, f"invalid close code {code}"
    if reason is not None:
        try:
            reason.decode("utf-8")
        except UnicodeDecodeError:
            return WebSocketProtocol.CLOSE_STATUS_CODE_INVALID_PAYLOAD, "invalid close reason (not UTF-8)"
    return None


def _deny_refused(refusal, subprotocol):
    """Upgrade with ``subprotocol``, unless the handshake's token was refused (HTTP 401)."""
    if refusal is not None:
        raise ConnectionDeny(401, f"unauthorized: {refusal}")
    return subprotocol


@implementer(ISessionTransport)
class DeviceProtocol(WebSocketServerProtocol):
    # Autobahn's own logger kind (txaio): its ~14 debug lines per handshake are no-ops
    # below LOG_LEVEL=debug, where a twisted Logger would build and filter each event.
    log = txaio.make_logger()  # type: ignore[attr-defined]  # bound at run time by txaio.use_twisted()
    transport_name = "websocket"
    rate_checked = False  # the router let this upgrade in under MAX_CONNECTS_PER_SECOND already

    # Our state in slots: Autobahn's own attributes alone nearly fill the instance
    # dict's 128 entries once the handshake is forgotten (see _forget_handshake).
    __slots__ = (
        "session",
        "subprotocol",
        "_outbox",
        "_opening",
        "_close_timer",
        "_closing",
        "_socket",
        "_budget",
        "_resume_timer",
    )

    def __init__(self):
        super().__init__()
        self.session = None
        self.subprotocol = None
        self._outbox = None
        self._opening = None  # the sign-in (sessions.opening.Opening), from the handshake until the session is open
        self._close_timer = None
        self._closing = None
        self._socket = None  # the plain TCP connection frames are written to at once, if there is one
        self._budget = None  # InboundBudget of what the device sends, from the upgrade on
        self._resume_timer = None  # while the device is over its budget and not read

    # ------------------------------------------------------------ connection

    def connectionMade(self):
        self.factory.connections.add(self)
        super().connectionMade()

    def connectionLost(self, reason):
        self.factory.connections.discard(self)
        super().connectionLost(reason)
        if self._outbox is not None:
            self._outbox.close()  # whatever still waited is released with the connection
        self.factory.cork.discard(self._socket)
        self._cancel_close_timer()
        if self._resume_timer is not None and self._resume_timer.active():
            self._resume_timer.cancel()
        self._resume_timer = None

    def failHandshake(self, reason, code=400, responseHeaders=None):
        if code in (429, 503):  # a 503 refuses by load: its devices come back spread out
            retry_after = self.gateway.connects.retry_after() if code == 503 else RETRY_AFTER_SEC
            responseHeaders = [*(responseHeaders or []), ("Retry-After", str(retry_after))]
        super().failHandshake(reason, code, responseHeaders)

    @property
    def gateway(self):
        return self.factory.gateway

    # ------------------------------------------------------------ handshake

    def onConnect(self, request):
        # Every upgrade reaches this, by the router or through the Site: the one place it is counted.
        if isinstance(self.transport, Guard) and not self.transport.upgrade_received():
            raise ConnectionDeny(429, "too many unauthenticated connections from this address")
        if not self.rate_checked and over_connect_rate(self.gateway, self):  # an upgrade through the Site
            raise ConnectionDeny(503, TOO_MANY_CONNECTS)
        refusal = self.factory.refusal()
        if refusal is not None:
            raise ConnectionDeny(503, refusal)
        origin = request.headers.get("origin")
        if not self.factory.origins.allows(origin):
            raise ConnectionDeny(ConnectionDeny.FORBIDDEN, f"origin {origin} is not allowed")
        subprotocol = choose_subprotocol(request.protocols)
        self.subprotocol = subprotocol or codec.JSON
        fallback_device = first_param(request.params, "device_id") or request.headers.get("x-device-id") or ""
        resume = first_param(request.params, "resume_token") or ""  # docs/protocol.md#resume
        self._opening = Opening(self.gateway, self, self._session_opened, REASONS, self.log, fallback_device, resume)
        header_token = bearer_token(request.headers.get("authorization"))
        if header_token:
            return self._opening.verify_handshake(header_token).addCallback(_deny_refused, subprotocol)
        query_token = first_param(request.params, "access_token")
        if query_token:
            # Browsers cannot read an HTTP 401, so a bad query token is
            # answered after the upgrade with close code 4401.
            return self._opening.verify_handshake(query_token).addCallback(lambda _: subprotocol)
        return subprotocol

    # ------------------------------------------------------------ open / auth

    def onOpen(self):
        config = self.gateway.config
        self._budget = InboundBudget(
            config.max_frames_per_second, config.max_bytes_per_second, self.gateway.clock, config.over_budget_close_sec
        )
        self._outbox = Outbox(
            self._write_frame, self.gateway.config.send_buffer_bytes, self._slow_consumer, unsent=self._unsent_bytes
        )
        self._outbox.bind(self.transport)
        self._socket = direct_socket(self.transport, Guard)
        self._opening.start()

    def _session_opened(self, session):
        """The Opening's hand-over: frames go to ``session`` from now on."""
        self.session = session
        self._outbox.follow(session)
        if isinstance(self.transport, Guard):
            self.transport.authenticated()
        self._forget_handshake()

    def _forget_handshake(self):
        """Drop what only opening the session needed; the protocol lives as long as the connection."""
        state = self.__dict__
        for name in HANDSHAKE_ATTRIBUTES:
            state.pop(name, None)
        self._opening = None
        # Autobahn sets ~90 attributes, so the instance dict grew to 256 entries during the
        # handshake; dicts never shrink, but a copy of what is left fits in 128 (~1.7 KiB
        # less), with room for the ~10 that Autobahn adds on the first frame.
        self.__dict__ = dict(state)

    # ------------------------------------------------------------ the inbound budget

    def dataReceived(self, data):
        if self._budget is not None:
            self._budget.spend_bytes(len(data))
        super().dataReceived(data)

    def consumeData(self):
        """Autobahn's frame loop, within the budget: frames beyond it wait, unparsed, and the
        device is not read (the kernel's TCP window holds it back) until the budget refills."""
        budget = self._budget
        if budget is None or (self.state != self.STATE_OPEN and self.state != self.STATE_CLOSING):
            super().consumeData()
            return
        if self._resume_timer is not None:
            return  # over budget: what arrived waits for the resume
        # A frame begun is finished; a new one begins only while the budget lasts.
        process, closed = self.processData, self.STATE_CLOSED
        while (self.current_frame is not None or budget.frames >= 1) and process():
            if self.state == closed:
                return
        if budget.over and self.state != closed:
            self._pause_reading()

    def onFrameBegin(self):
        self._budget.frames -= 1  # every frame: data, control and those that will not parse
        WebSocketServerProtocol.onFrameBegin(self)

    def _pause_reading(self):
        budget = self._budget
        delay = budget.pause()
        if budget.persistent and self.state == self.STATE_OPEN and self._closing is None:
            self.log.info(
                "closing {peer}: over its {kind} budget for {seconds} s",
                peer=self.peer,
                kind=budget.exceeded,
                seconds=budget.close_after,
            )
            self.close(CloseCode.POLICY, budget.reason())
        self.transport.pauseProducing()
        self._resume_timer = self.gateway.clock.callLater(delay, self._resume_reading)

    def _resume_reading(self):
        self._resume_timer = None
        if self.state == self.STATE_CLOSED:
            return
        self._budget.resume()
        self.consumeData()  # what waited, within the budget; it may pause again
        if self._resume_timer is None and self.state != self.STATE_CLOSED:
            self.transport.resumeProducing()

    # ------------------------------------------------------------ frames

    def onMessage(self, payload, isBinary):
        if self.session is not None:
            self.session.activity()
        try:
            request = codec.decode_request(payload, isBinary, self.subprotocol)
        except codec.FrameError as e:
            self._bad_frame(e)
            return
        if self.session is not None:
            self.session.handle(request)
        else:
            self._opening.receive(request)

    def _bad_frame(self, error):
        code = grpc.StatusCode.INVALID_ARGUMENT
        if self.session is None:
            self._opening.undecodable(error)
            return
        if error.request_id:
            self.session.reply(error.request_id, error_detail(code, str(error)))
        else:
            self.session.send_error(code, str(error))

    def onPing(self, payload):
        if self.session is not None:
            self.session.activity()
        # A device that pings without reading gets no pongs piling up for it.
        if (
            self.state == self.STATE_OPEN
            and self._outbox is not None
            and not self._outbox.paused
            and not len(self._outbox)
        ):
            self.sendPong(payload)

    def onPong(self, payload):
        if self.session is not None:
            self.session.activity()

    def onCloseFrame(self, code, reasonRaw):
        # Autobahn answers an invalid close frame with 1002/1007 but then takes the device's
        # frame for the reply to that close and aborts the TCP connection in the same turn:
        # the answer is discarded unsent and the device sees a reset. The same happens to a
        # close frame that arrives while ours is still unsent (one Autobahn refused from its
        # header, e.g. a 1-byte payload, or one crossing ours).
        if self.state == self.STATE_OPEN:
            error = close_frame_error(code, reasonRaw)
            if error is None:
                handled = super().onCloseFrame(code, reasonRaw)  # answered 1000, then the TCP close
                # That close waits for our answer to be read; Autobahn's close timer runs only for
                # closes we start, so a device that never reads would hold the connection forever.
                self._cancel_close_timer()
                self._close_timer = self.gateway.clock.callLater(
                    self.gateway.config.close_timeout_sec, self.transport.abortConnection
                )
                return handled
            self._fail_connection(*error)
        elif not (self.state == self.STATE_CLOSING and unsent_bytes(self.transport)):
            return super().onCloseFrame(code, reasonRaw)
        # The device has closed its side; ours closes once our close frame is out, or when
        # Autobahn's close handshake timer (CLOSE_TIMEOUT_SEC) drops a device that never reads it.
        self.transport.loseConnection()
        return True

    def onClose(self, wasClean, code, reason):
        if self._opening is not None:
            self._opening.gone()
        self._cancel_close_timer()
        if self._outbox is not None:
            self._outbox.close()
        if self.session is not None:
            self.session.closed_by_transport()

    # ------------------------------------------------------------ ISessionTransport

    def send_event(self, event):
        if self._outbox is None or self._closing is not None:
            return
        payload, is_binary = codec.encode_event(event, self.subprotocol)
        kind, key = classify(event)
        self._outbox.send(self.factory.prepareMessage(payload, isBinary=is_binary).payloadHybi, kind, key)

    def send_encoded(self, encoded):
        if self._outbox is None or self._closing is not None or self.state != self.STATE_OPEN:
            return False  # closing: not sent (the session does not count it as given)
        kind, key = encoded.policy
        return self._outbox.send(encoded.frame(self.subprotocol, self._prepare).payloadHybi, kind, key)

    def _write_frame(self, frame):
        if self.state == self.STATE_OPEN:
            self._write_raw(frame)
        if self._closing is not None and not len(self._outbox):
            self._send_close(*self._closing)

    def _write_raw(self, data):
        # Not through Autobahn's sendData (a debug line formatted per call, ~8 us); a plain
        # TCP socket gets it at once, or with the rest of a burst (sessions.corking).
        if self._socket is not None:
            self.factory.cork.write(self._socket, data)
        else:
            self.transport.write(data)

    def sendData(self, data, sync=False, chopsize=None):
        # Autobahn's own frames (close, pong) go after those a burst holds for this device.
        self.factory.cork.release(self._socket)
        super().sendData(data, sync, chopsize)

    def _unsent_bytes(self):
        return unsent_bytes(self.transport) + self.factory.cork.held(self._socket)

    def _slow_consumer(self):
        self.log.info(
            "closing a slow consumer: more than {limit} bytes waiting for {peer}",
            limit=self.gateway.config.send_buffer_bytes,
            peer=self.peer,
        )
        self._send_close(CloseCode.SLOW_CONSUMER, "slow consumer: more than SEND_BUFFER_BYTES waiting")

    def _prepare(self, encoded):
        if self.subprotocol == codec.PROTO and encoded.payload is not None:
            return self.factory.prepareMessage(encoded.payload, isBinary=True)
        payload, is_binary = codec.encode_event(encoded.event, self.subprotocol)
        return self.factory.prepareMessage(payload, isBinary=is_binary)

    def ping(self):
        if self.state == self.STATE_OPEN:
            self._write_raw(PING_FRAME)  # the heartbeat pings every device in one sweep

    def close(self, code, reason):
        """Close after the frames still waiting for the device (for at most CLOSE_TIMEOUT_SEC)."""
        if self.state != self.STATE_OPEN or self._closing is not None:
            return
        if self._opening is not None:
            self._opening.gone()  # a connection that closes opens no session
        if self._outbox is None or not len(self._outbox):
            self._send_close(code, reason)
            return
        self._closing = (code, reason)
        self._close_timer = self.gateway.clock.callLater(
            self.gateway.config.close_timeout_sec, self._close_overdue, code, reason
        )

    def _close_overdue(self, code, reason):
        self._close_timer = None
        self._outbox.close()
        self._send_close(code, reason)

    def _send_close(self, code, reason):
        self._closing = None
        self._cancel_close_timer()
        if self.state == self.STATE_OPEN:
            self.gateway.counts.connection_closing(self, code)
            # sendClose() only takes 1000 and 3000-4999; 1001/1008/1013 are ours to send too.
            self.sendCloseFrame(code=code, reasonUtf8=encode_truncate(reason, MAX_REASON_BYTES), isReply=False)

    def _cancel_close_timer(self):
        if self._close_timer is not None and self._close_timer.active():
            self._close_timer.cancel()
        self._close_timer = None

    def abort(self):
        """Drop the connection now (e.g. the drain's deadline passed)."""
        if self._outbox is not None:
            self._outbox.close()
        self.factory.cork.discard(self._socket)
        self.dropConnection(abort=True)


class DeviceFactory(WebSocketServerFactory):
    protocol = DeviceProtocol

    def __init__(self, gateway, url=None):
        super().__init__(url)
        self.gateway = gateway
        self.cork = gateway.cork  # frames of a burst, one write per device (sessions.corking)
        self.connections = set()  # every DeviceProtocol of this factory, from TCP takeover to loss
        config = gateway.config
        self.origins = OriginPolicy(config.allowed_origins)
        self.setProtocolOptions(
            maxFramePayloadSize=config.max_message_bytes,
            maxMessagePayloadSize=config.max_message_bytes,
            autoPingInterval=0,  # the gateway's heartbeat sweep pings (one timer, not one per connection)
            openHandshakeTimeout=config.handshake_timeout_sec,
            closeHandshakeTimeout=config.close_timeout_sec,
            failByDrop=False,  # send the close code (1009 etc.) before dropping
            allowNullOrigin=True,  # origins are checked by OriginPolicy in onConnect (403)
            webStatus=False,  # a plain GET /ws gets 426, not Autobahn's status page
            # permessage-deflate is declined (Autobahn's default, stated on purpose): nothing
            # a device sends is inflated, and fan-out frames stay encoded once.
            perMessageCompressionAccept=lambda offers: None,
        )

    @property
    def full(self):
        """At MAX_CONNECTIONS: new handshakes are refused (503)."""
        return len(self.connections) >= self.gateway.config.max_connections

    def refusal(self):
        """Why a new handshake is refused with HTTP 503, or None. Called for a counted connection."""
        if self.gateway.draining:
            return "gateway draining: reconnect to another instance"
        if len(self.connections) > self.gateway.config.max_connections:
            return "too many connections: try again later"
        return None
