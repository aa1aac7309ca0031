"""A WebSocket client of the gateway (Autobahn), for the CLI and the tests.

client = await GatewayClient.connect("ws://127.0.0.1:8080/ws", token)
connected = await client.next_event("connected")
room = await client.call("CreateRoom", pb.CreateRoomRequest(name="general"))
"""

import itertools
from urllib.parse import urlencode, urlsplit, urlunsplit

from autobahn.twisted.websocket import WebSocketClientFactory, WebSocketClientProtocol
from google.protobuf import any_pb2
from twisted.internet import defer, endpoints

from chatgateway.api import chat_pb2 as pb
from chatgateway.api import codec
from chatgateway.core.client import METHODS


class ClosedError(Exception):
    """The connection closed (or never opened); code and reason say why, and ``retry_after``
    the seconds of a refused upgrade's Retry-After (None without one)."""

    def __init__(self, code, reason, retry_after=None):
        super().__init__(f"connection closed: {code} {reason}")
        self.code = code
        self.reason = reason
        self.retry_after = retry_after


class CallError(Exception):
    """A command answered with an ErrorDetail."""

    def __init__(self, detail):
        super().__init__(f"{detail.status}: {detail.message}")
        self.detail = detail


class _Protocol(WebSocketClientProtocol):
    def onOpen(self):
        self.factory.client._opened(self)

    def onMessage(self, payload, isBinary):
        self.factory.client._received(payload, isBinary)

    def onClose(self, wasClean, code, reason):
        self.factory.client._closed(
            code, reason, _seconds((getattr(self, "http_headers", None) or {}).get("retry-after"))
        )


def _seconds(value):
    """A Retry-After of whole seconds (an HTTP date is not used by the gateway): None otherwise."""
    return float(value) if value and value.strip().isdigit() else None


class GatewayClient:
    def __init__(self, reactor):
        self._reactor = reactor
        self._protocol = None
        self._open = defer.Deferred()
        self._events = []  # ServerEvents not yet taken
        self._waiters = []  # (predicate, Deferred)
        self._ids = itertools.count(1)
        self.closed = defer.Deferred()  # fires (code, reason)
        self.close_code = None
        self.close_reason = None

    @classmethod
    async def connect(
        cls,
        url,
        token=None,
        *,
        subprotocol=codec.JSON,
        auth="header",
        device_id=None,
        headers=None,
        reactor=None,
        offer_subprotocol=True,
        resume_token="",
        positions=None,
    ):
        """Open a connection; auth is "header", "query", "frame" or "none".

        To resume (docs/protocol.md#resume): ``resume_token`` goes in the first frame with
        "frame" auth, else in the URL (``?resume_token=``); ``positions`` ({room id: (epoch,
        offset)}) need "frame" auth. Raises ClosedError when the handshake is refused.
        """
        if reactor is None:
            from twisted.internet import reactor
        client = cls(reactor)
        client.subprotocol = subprotocol
        headers = dict(headers or {})
        if token and auth == "header":
            headers["Authorization"] = f"Bearer {token}"
        if device_id and auth != "frame":
            headers["X-Device-ID"] = device_id
        params = {}
        if token and auth == "query":
            params["access_token"] = token
        if resume_token and auth != "frame":
            params["resume_token"] = resume_token
        if params:
            parts = urlsplit(url)
            query = "&".join(q for q in (parts.query, urlencode(params)) if q)
            url = urlunsplit(parts._replace(query=query))
        factory = WebSocketClientFactory(url, protocols=[subprotocol] if offer_subprotocol else None, headers=headers)
        factory.setProtocolOptions(autoPingInterval=0, maxFramePayloadSize=0, maxMessagePayloadSize=0)
        factory.protocol = _Protocol
        factory.client = client
        parts = urlsplit(url)
        endpoint = endpoints.TCP4ClientEndpoint(reactor, parts.hostname, parts.port or 80, timeout=10)
        await endpoint.connect(factory)
        await client._open
        if token and auth == "frame":
            held = [pb.RoomPosition(room_id=r, epoch=e, offset=o) for r, (e, o) in sorted((positions or {}).items())]
            client.send(
                pb.StreamRequest(auth_token=token, device_id=device_id or "", resume_token=resume_token, positions=held)
            )
        return client

    # ------------------------------------------------------------ protocol callbacks

    def _opened(self, protocol):
        self._protocol = protocol
        self._open.callback(None)

    def _received(self, payload, is_binary):
        event = codec.decode_event(payload, is_binary)
        for i, (predicate, d) in enumerate(self._waiters):
            if predicate(event):
                del self._waiters[i]
                d.callback(event)
                return
        self._events.append(event)

    def _closed(self, code, reason, retry_after=None):
        self.close_code, self.close_reason = code, reason
        error = ClosedError(code, reason, retry_after)
        if not self._open.called:
            self._open.errback(error)
        waiters, self._waiters = self._waiters, []
        for _, d in waiters:
            d.errback(ClosedError(code, reason, retry_after))
        if not self.closed.called:
            self.closed.callback((code, reason))

    # ------------------------------------------------------------ sending

    def send(self, request):
        payload, is_binary = codec.encode_request(request, self.subprotocol)
        self.send_raw(payload, is_binary)

    def send_raw(self, payload, is_binary=False):
        if self._protocol is None or self.close_code is not None:
            raise ClosedError(self.close_code, self.close_reason)
        self._protocol.sendMessage(payload, is_binary)

    def close(self, code=1000, reason="bye"):
        if self._protocol is not None and self.close_code is None:
            self._protocol.sendClose(code, reason)
        return self.closed

    # ------------------------------------------------------------ receiving

    def next_event(self, kind=None, predicate=None, timeout=10):
        """Deferred of the next ServerEvent whose payload is ``kind`` (and matches predicate)."""

        def matches(event):
            if kind is not None and event.WhichOneof("payload") != kind:
                return False
            return predicate is None or predicate(event)

        for i, event in enumerate(self._events):
            if matches(event):
                del self._events[i]
                return defer.succeed(event)
        if self.close_code is not None:
            return defer.fail(ClosedError(self.close_code, self.close_reason))
        d = defer.Deferred()
        entry = (matches, d)
        self._waiters.append(entry)
        if timeout is not None:
            d.addTimeout(timeout, self._reactor, onTimeoutCancel=lambda *_: self._drop_waiter(entry))
        return d

    def _drop_waiter(self, entry):
        if entry in self._waiters:
            self._waiters.remove(entry)
        raise defer.TimeoutError("no matching event in time")

    def pending(self, kind=None):
        """Events received and not taken yet (optionally of one kind)."""
        return [e for e in self._events if kind is None or e.WhichOneof("payload") == kind]

    # ------------------------------------------------------------ commands

    async def command(self, timeout=10, **fields):
        """Send one ClientCommand (fields as in ClientCommand) and return its CommandResults."""
        request_id = fields.pop("request_id", None) or f"r{next(self._ids)}"
        self.send(pb.StreamRequest(command=pb.ClientCommand(request_id=request_id, **fields)))
        results = []
        while True:
            event = await self.next_event(
                "command_result", lambda e: e.command_result.request_id == request_id, timeout
            )
            results.append(event.command_result)
            if not event.command_result.more:
                return results

    async def call(self, method, request, timeout=10):
        """Forward one ChatService call; the response (a list of them for SearchRooms).

        Raises CallError with the ErrorDetail when the call failed.
        """
        results = await self.command(timeout, call=pb.CallCommand(method=method, body=_pack(request)))
        last = results[-1]
        if last.HasField("error"):
            raise CallError(last.error)
        response_cls, streaming = METHODS[method][1], METHODS[method][2]
        responses = []
        for result in results:
            if result.HasField("body"):
                response = response_cls()
                result.body.Unpack(response)
                responses.append(response)
        return responses if streaming else responses[0]

    async def send_message(self, room_id, text, timeout=10):
        """Send a TEXT event; the stored RoomEvent (with the core's id)."""
        event = pb.RoomEvent(room_id=room_id, type=pb.RoomEvent.TEXT)
        event.payload.update({"text": text})
        results = await self.command(timeout, room_event=event)
        if results[-1].HasField("error"):
            raise CallError(results[-1].error)
        response = pb.SendEventResponse()
        results[-1].body.Unpack(response)
        return response.event


def _pack(message):
    packed = any_pb2.Any()
    packed.Pack(message)
    return packed
