"""A gateway on a task.Clock with fake core and verifier, and in-memory WebSocket pairs.

Connections are real Autobahn client and server protocols joined by
twisted.test.iosim pumps, so every byte of the handshake and the frames is
exercised without sockets or real time.
"""

import grpc
from autobahn.twisted.websocket import WebSocketClientFactory, WebSocketClientProtocol
from autobahn.websocket.compress import PerMessageDeflateOffer
from twisted.internet import defer, task
from twisted.internet.address import IPv4Address
from twisted.internet.testing import StringTransport
from twisted.test import iosim
from zope.interface import implementer

from chatgateway import config
from chatgateway.api import chat_pb2 as pb
from chatgateway.api import codec
from chatgateway.auth import ITokenVerifier
from chatgateway.auth.tokens import AuthError, Claims
from chatgateway.bus.memory import MemoryBus, MemoryHub
from chatgateway.core import ICoreClient
from chatgateway.core.client import CoreError
from chatgateway.edge.websocket import DeviceFactory
from chatgateway.sessions.gateway import Gateway
from chatgateway.store.memory import MemoryStore


def accept(factory, host="10.0.0.1", port=40000):
    """(protocol, StringTransport) of a TCP connection from host:port that ``factory`` accepted."""
    address = IPv4Address("TCP", host, port)
    proto = factory.buildProtocol(address)
    transport = StringTransport(peerAddress=address)
    proto.makeConnection(transport)
    return proto, transport


@implementer(ITokenVerifier)
class FakeVerifier:
    """Tokens are "PROFILE" or "PROFILE/DEVICE" or "PROFILE@EXPIRES"; "bad..." is refused.
    No leeway: a session ends at EXPIRES."""

    def __init__(self, clock):
        self.clock = clock

    def claims(self, token):
        if token.startswith("bad"):
            raise AuthError("signature verification failed")
        expires = self.clock.seconds() + 3600
        if "@" in token:
            token, _, at = token.partition("@")
            expires = float(at)
        profile, _, device = token.partition("/")
        return Claims(
            profile_id=profile,
            device_id=device or None,
            expires_at=expires,
            valid_until=expires,
            claims={"sub": profile},
        )

    def verify(self, token):
        return defer.maybeDeferred(self.claims, token)

    def verify_blocking(self, token):
        return self.claims(token)

    def close(self):
        return defer.succeed(None)


@implementer(ITokenVerifier)
class SlowVerifier:
    """A FakeVerifier answering ``seconds`` later (a JWKS fetch, say)."""

    def __init__(self, verifier, clock, seconds):
        self.verifier, self.clock, self.seconds = verifier, clock, seconds

    def verify(self, token):
        return task.deferLater(self.clock, self.seconds, self.verifier.claims, token)

    def verify_blocking(self, token):
        return self.verifier.claims(token)

    def close(self):
        return defer.succeed(None)


@implementer(ICoreClient)
class FakeCore:
    """Memberships and canned answers; records every call (the trace context and timeout are ignored)."""

    def __init__(self):
        self.rooms = {}  # profile -> [room ids]
        self.calls = []
        self.sent = []

    def start(self):
        """Nothing to connect to."""

    def stop(self):
        return defer.succeed(None)

    def readiness(self):
        return defer.succeed("up")

    def call(self, method, request, token, device_id="", traceparent=None, tracestate=None, timeout=None):
        self.calls.append((method, request, token))
        profile = token.split("/")[0].split("@")[0]
        if method == "SearchRooms":
            rooms = [pb.Room(id=r) for r in self.rooms.get(profile, [])]
            return defer.succeed([pb.SearchRoomsResponse(data=rooms)] if rooms else [])
        if method == "SendEvent":
            if request.event.room_id not in self.rooms.get(profile, []):
                return defer.fail(CoreError(grpc.StatusCode.PERMISSION_DENIED, "not a member"))
            event = pb.RoomEvent()
            event.CopyFrom(request.event)
            event.id = f"e{len(self.sent) + 1}"
            event.sender_id = profile
            self.sent.append(event)
            return defer.succeed(pb.SendEventResponse(event=event))
        if method == "AddRoomSubscriptions":
            for member in request.members:
                self.rooms.setdefault(member.profile_id, []).append(request.room_id)
            subs = [
                pb.RoomSubscription(room_id=request.room_id, profile_id=m.profile_id, roles=["member"])
                for m in request.members
            ]
            return defer.succeed(pb.AddRoomSubscriptionsResponse(subscriptions=subs))
        if method == "RemoveRoomSubscriptions":
            removed = [p for p in request.profile_ids if request.room_id in self.rooms.get(p, [])]
            for member in removed:
                self.rooms[member].remove(request.room_id)
            return defer.succeed(pb.RemoveRoomSubscriptionsResponse(removed_profile_ids=removed))
        if method == "SearchRoomSubscriptions":
            if request.room_id not in self.rooms.get(profile, []):
                return defer.fail(CoreError(grpc.StatusCode.PERMISSION_DENIED, "not a member"))
            members = sorted(p for p, rooms in self.rooms.items() if request.room_id in rooms and request.query in p)
            subs = [pb.RoomSubscription(room_id=request.room_id, profile_id=p, roles=["member"]) for p in members]
            return defer.succeed(pb.SearchRoomSubscriptionsResponse(data=subs))
        if method == "GetHistory":
            return defer.fail(CoreError(grpc.StatusCode.NOT_FOUND, f"room {request.room_id} not found"))
        return defer.fail(CoreError(grpc.StatusCode.UNIMPLEMENTED, method))


class RecordingCore(FakeCore):
    """The harness's fake core, also keeping the call options (traceparent, timeout)."""

    def __init__(self):
        super().__init__()
        self.options = []
        self.fail_search = None

    def call(self, method, request, token, device_id="", traceparent=None, tracestate=None, timeout=None):
        given = {"traceparent": traceparent, "tracestate": tracestate, "timeout": timeout}
        options = {name: value for name, value in given.items() if value is not None}
        self.options.append((method, device_id, options))
        if method == "SearchRooms" and self.fail_search is not None:
            return defer.fail(self.fail_search)
        if method == "SearchRooms" and request.page_size == 1:
            rooms = [pb.Room(id=r) for r in self.rooms.get(token.split("/")[0], [])]
            return defer.succeed([pb.SearchRoomsResponse(data=[r], next_cursor=r.id) for r in rooms])
        return super().call(method, request, token, device_id)


class RecordingClient(WebSocketClientProtocol):
    def onConnect(self, response):
        self.factory.response = response

    def onOpen(self):
        self.factory.opened = True

    def onMessage(self, payload, isBinary):
        self.factory.events.append(codec.decode_event(payload, isBinary))

    def onClose(self, wasClean, code, reason):
        self.factory.closed = (code, reason)


class Connection:
    def __init__(self, harness, server, client, pump):
        self.harness = harness
        self.server = server
        self.client = client
        self.pump = pump
        self.factory = client.factory

    @property
    def events(self):
        return self.factory.events

    @property
    def closed(self):
        return self.factory.closed

    def kinds(self):
        return [e.WhichOneof("payload") for e in self.events]

    def of(self, kind):
        return [e for e in self.events if e.WhichOneof("payload") == kind]

    def send(self, request):
        payload, is_binary = codec.encode_request(request, self.server.subprotocol)
        self.send_raw(payload, is_binary)

    def send_raw(self, payload, is_binary=False):
        self.client.sendMessage(payload, is_binary)
        self.harness.flush()

    def command(self, **fields):
        self.send(pb.StreamRequest(command=pb.ClientCommand(**fields)))
        return self.of("command_result")


class Harness:
    """One gateway; ``peer()`` makes another sharing the bus, store, core and clock.

    ``counts``: the GatewayCounts the gateway counts into (its own when not given).
    """

    def __init__(self, _shared=None, counts=None, **settings):
        # No presenceEvents unless a test asks (PRESENCE_MAX_ROOM_SIZE): the fan-out tests count every frame.
        env = {"JWT_SECRET": "unit-test-secret", "GATEWAY_ID": "gw-test", "PRESENCE_MAX_ROOM_SIZE": "0"}
        env.update({k: str(v) for k, v in settings.items()})
        self.config = config.load(env)
        if _shared is None:
            clock = task.Clock()
            clock.advance(1_000_000)
            _shared = (clock, FakeCore(), MemoryHub(clock), MemoryStore())
        self._shared = _shared
        self.clock, self.core, self.hub, self.store = _shared
        self.gateway = Gateway(
            self.config,
            self.clock,
            FakeVerifier(self.clock),
            self.core,
            MemoryBus(self.hub),
            self.store,
            clock=self.clock,
            counts=counts,
        )
        self.gateway.startService()
        self.factory = DeviceFactory(self.gateway)
        # Autobahn's own handshake timers run on the global reactor; unit tests do not use them.
        self.factory.setProtocolOptions(openHandshakeTimeout=0, closeHandshakeTimeout=0, allowNullOrigin=True)
        self.connections = []

    def connect(
        self, token=None, *, auth="header", protocols=(codec.JSON,), headers=None, device=None, offer_deflate=False
    ):
        headers = dict(headers or {})
        url = "ws://127.0.0.1:8080/ws"
        if token and auth == "header":
            headers["Authorization"] = f"Bearer {token}"
        if token and auth == "query":
            url += f"?access_token={token}"
        if device:
            headers["X-Device-ID"] = device
        server = self.factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 8080))
        cf = WebSocketClientFactory(url, protocols=list(protocols) or None, headers=headers)
        cf.setProtocolOptions(openHandshakeTimeout=0, closeHandshakeTimeout=0, autoPingInterval=0)
        if offer_deflate:
            cf.setProtocolOptions(perMessageCompressionOffers=[PerMessageDeflateOffer()])
        cf.protocol = RecordingClient
        cf.events, cf.closed, cf.opened, cf.response = [], None, False, None
        client = cf.buildProtocol(IPv4Address("TCP", "127.0.0.1", 8080))
        pump = iosim.connect(
            server,
            iosim.FakeTransport(server, isServer=True),
            client,
            iosim.FakeTransport(client, isServer=False),
            greet=True,
        )
        connection = Connection(self, server, client, pump)
        self.connections.append(connection)
        return connection

    def peer(self, gateway_id, counts=None, **settings):
        """A second gateway instance on the same bus, store and core (with its own counts)."""
        return Harness(self._shared, counts, GATEWAY_ID=gateway_id, **settings)

    def flush(self):
        for connection in self.connections:
            connection.pump.flush()

    def advance(self, seconds):
        self.clock.advance(seconds)
        self.flush()

    def run_for(self, seconds, step=1.0):
        """Let time pass in steps, with live devices answering pings as they come."""
        steps = int(round(seconds / step))
        for _ in range(steps):
            self.advance(step)

    def verify_later(self):
        """The next token is verified once the returned Deferred fires (with anything); later ones at once again."""
        held = defer.Deferred()
        verifier = self.gateway.verifier
        verify = verifier.verify

        def later(token):
            verifier.verify = verify
            return held.addCallback(lambda _: verifier.claims(token))

        verifier.verify = later
        return held

    def memberships_later(self):
        """The core answers the next SearchRooms with the returned Deferred (fire it with the pages);
        later calls are answered at once again. The membership cache is emptied, so the next
        connect asks the core."""
        self.hub.memberships.rooms.clear()
        held = defer.Deferred()
        call = self.core.call

        def once(method, *args, **kwargs):
            if method != "SearchRooms":
                return call(method, *args, **kwargs)
            self.core.call = call
            return held

        self.core.call = once
        return held

    def publish(self, channel, event):
        self.hub.deliver(channel, event.SerializeToString())
        self.flush()

    def stop(self):
        self.gateway.stopService()
        self.flush()
