"""chatgateway.sessions.opening: a device's sign-in, on a task.Clock gateway with a fake
core and verifier, through a transport that records what it is told."""

import grpc
import pytest
from twisted.internet import defer
from twisted.logger import Logger
from zope.interface import implementer

from chatgateway.api import chat_pb2 as pb
from chatgateway.core.client import CoreError
from chatgateway.edge import grpcstream, websocket
from chatgateway.sessions import reconnect
from chatgateway.sessions.opening import MAX_PENDING_REQUESTS, Opening, Reasons, bearer_token
from chatgateway.sessions.session import CloseCode, ISessionTransport
from chatgateway.store import device_entry
from support.wsharness import Harness

REASONS = Reasons("frame")


@implementer(ISessionTransport)
class Transport:
    def __init__(self):
        self.events = []
        self.closed = None

    def send_event(self, event):
        self.events.append(event)

    def send_encoded(self, encoded):
        self.events.append(encoded.event)

    def ping(self):
        pass

    def close(self, code, reason):
        if self.closed is None:
            self.closed = (code, reason)

    def kinds(self):
        return [e.WhichOneof("payload") for e in self.events]


class Device:
    """One connection's Opening, its transport and the session it handed over."""

    def __init__(self, harness, fallback_device=""):
        self.transport = Transport()
        self.sessions = []
        self.opening = Opening(
            harness.gateway, self.transport, self.sessions.append, REASONS, Logger(), fallback_device
        )

    @property
    def session(self):
        (session,) = self.sessions or (None,)
        return session


def typing(request_id, **fields):
    command = pb.ClientCommand(request_id=request_id, typing=pb.TypingCommand(room_id="r1", typing=True))
    return pb.StreamRequest(command=command, **fields)


@pytest.fixture
def h():
    harness = Harness(AUTH_TIMEOUT_SEC=5, MAX_EVENTS_PER_SECOND=100)
    harness.core.rooms["alice"] = ["r1"]
    yield harness
    harness.stop()


def rooms(*ids):
    return [pb.SearchRoomsResponse(data=[pb.Room(id=r) for r in ids])]


# ---------------------------------------------------------------- tokens


def test_a_verified_handshake_token_opens_at_start(h):
    d = Device(h, fallback_device="kiosk")
    refusal = []
    d.opening.verify_handshake("alice").addCallback(refusal.append)
    assert refusal == [None] and d.session is None
    d.opening.start()
    assert d.session.device_id == "kiosk"
    assert d.transport.kinds() == ["connected"] and d.transport.closed is None


def test_a_refused_handshake_token_gives_its_reason_then_closes_4401_at_start(h):
    d = Device(h)
    refusal = []
    d.opening.verify_handshake("bad-token").addCallback(refusal.append)
    assert refusal == ["signature verification failed"]
    assert d.transport.closed is None
    d.opening.start()
    assert d.transport.closed == (CloseCode.UNAUTHENTICATED, "invalid token: signature verification failed")
    assert h.core.calls == []


def test_a_token_given_at_start_is_verified_then_opens(h):
    d = Device(h)
    d.opening.start("alice/phone")
    assert d.session.device_id == "phone"


@pytest.mark.parametrize("token", ["bad-token", None])
def test_a_refused_token_closes_4401_with_the_verifiers_reason(h, token):
    d = Device(h)
    d.opening.start(token)
    if token is None:
        d.opening.receive(pb.StreamRequest(auth_token="bad-token"))
    assert d.transport.closed == (CloseCode.UNAUTHENTICATED, "invalid token: signature verification failed")
    assert d.sessions == [] and len(h.gateway.registry) == 0


def test_a_first_request_without_a_token_or_undecodable_closes_4401():
    h = Harness()
    try:
        without = Device(h)
        without.opening.start()
        without.opening.receive(typing("1"))
        assert without.transport.closed == (CloseCode.UNAUTHENTICATED, "the first frame must carry auth_token")
        garbled = Device(h)
        garbled.opening.start()
        garbled.opening.undecodable("not JSON")
        assert garbled.transport.closed == (
            CloseCode.UNAUTHENTICATED,
            "the first frame must carry auth_token (not JSON)",
        )
    finally:
        h.stop()


@pytest.mark.parametrize(
    "error, closed",
    [
        (
            CoreError(grpc.StatusCode.UNAUTHENTICATED, "revoked"),
            (CloseCode.UNAUTHENTICATED, "core refused the token: revoked"),
        ),
        (CoreError(grpc.StatusCode.UNAVAILABLE, "down"), (CloseCode.TRY_AGAIN_LATER, "core unavailable: down")),
    ],
)
def test_a_core_that_refuses_or_cannot_answer_closes_the_device(h, error, closed):
    h.core.call = lambda *a, **k: defer.fail(error)
    d = Device(h)
    d.opening.start("alice")
    code, reason = d.transport.closed
    assert (code, reason.split(": reconnect in ")[0]) == closed and d.sessions == []


@pytest.mark.parametrize("error", [CoreError(grpc.StatusCode.UNAVAILABLE, "down"), RuntimeError("bug")])
def test_a_1013_tells_each_device_its_own_reconnect_delay(h, error):
    h.core.call = lambda *a, **k: defer.fail(error)
    delays = []
    for i in range(20):
        d = Device(h)
        d.opening.start(f"alice/d{i}")
        code, reason = d.transport.closed
        assert code == CloseCode.TRY_AGAIN_LATER and reason.rsplit(": ", 1)[1].startswith("reconnect in ")
        delays.append(reconnect.reconnect_delay(reason))
    assert all(reconnect.TRY_AGAIN_MIN_SEC <= x <= reconnect.TRY_AGAIN_SPREAD_SEC for x in delays)
    assert len(set(delays)) > 5  # jittered per device


def test_the_device_id_is_the_claims_then_the_first_requests_then_the_handshakes_then_default(h):
    ids = []
    for token, first_device, fallback in (
        ("alice/claimed", "asked", "kiosk"),
        ("alice", "asked", "kiosk"),
        ("alice", "", "kiosk"),
        ("alice", "", ""),
    ):
        d = Device(h, fallback_device=fallback)
        d.opening.start()
        d.opening.receive(pb.StreamRequest(auth_token=token, device_id=first_device))
        ids.append(d.session.device_id)
    assert ids == ["claimed", "asked", "kiosk", "default"]


# ---------------------------------------------------------------- the timer


def test_auth_timeout_closes_a_device_that_sends_no_token(h):
    d = Device(h)
    d.opening.start()
    h.clock.advance(4.9)
    assert d.transport.closed is None
    h.clock.advance(0.1)
    assert d.transport.closed == (
        CloseCode.UNAUTHENTICATED,
        "authentication timeout: send auth_token in the first frame",
    )


def test_the_timer_runs_until_the_token_is_verified_then_stops(h):
    verifying = h.verify_later()
    late = Device(h)
    late.opening.start()
    h.clock.advance(4)
    late.opening.receive(pb.StreamRequest(auth_token="alice"))
    h.clock.advance(1)  # the token is still being verified: too late
    assert late.transport.closed[0] == CloseCode.UNAUTHENTICATED
    verifying.callback(None)
    assert late.sessions == [] and len(h.gateway.registry) == 0  # closed: no session for it

    in_time = Device(h)
    in_time.opening.start()
    in_time.opening.receive(pb.StreamRequest(auth_token="alice"))
    h.clock.advance(60)
    assert in_time.transport.closed is None and in_time.session is not None


# ---------------------------------------------------------------- requests while opening


def test_requests_while_opening_are_replayed_in_order_without_their_token(h):
    waiting = h.memberships_later()
    d = Device(h)
    d.opening.start()
    first = typing("1", auth_token="alice")
    d.opening.receive(first)
    later = [typing(str(i)) for i in range(2, 6)]
    for request in later:
        d.opening.receive(request)
    assert d.transport.events == []
    waiting.callback(rooms("r1"))
    results = [e.command_result.request_id for e in d.transport.events if e.HasField("command_result")]
    assert d.transport.kinds()[0] == "connected"
    assert results == ["1", "2", "3", "4", "5"]
    assert first.auth_token == ""  # consumed: the session does not verify it again


def test_requests_while_opening_are_capped_1008(h):
    waiting = h.memberships_later()
    d = Device(h)
    d.opening.start("alice")
    for i in range(MAX_PENDING_REQUESTS):
        d.opening.receive(typing(str(i)))
    assert d.transport.closed is None
    d.opening.receive(typing("one too many"))
    assert d.transport.closed == (CloseCode.POLICY, "too many frames before connected")
    waiting.callback(rooms("r1"))
    assert d.sessions == [] and len(h.gateway.registry) == 0  # closed while opening: no session left


def test_undecodable_requests_while_opening_are_dropped(h):
    waiting = h.memberships_later()
    d = Device(h)
    d.opening.start("alice")
    d.opening.undecodable("not JSON")
    waiting.callback(rooms("r1"))
    assert d.transport.closed is None and d.transport.kinds() == ["connected"]


# ---------------------------------------------------------------- gone while opening


def test_gone_while_the_token_is_verified_asks_the_core_nothing(h):
    verifying = h.verify_later()
    d = Device(h)
    d.opening.start("alice/phone")
    d.opening.gone()
    verifying.callback(None)
    assert h.core.calls == [] and d.sessions == [] and len(h.gateway.registry) == 0
    assert d.transport.closed is None  # nobody to tell


def test_gone_while_the_session_opens_leaves_no_session_and_replaces_nothing(h):
    older = Device(h)
    older.opening.start("alice/phone")
    waiting = h.memberships_later()
    d = Device(h)
    d.opening.start("alice/phone")
    d.opening.receive(typing("1"))
    d.opening.gone()
    waiting.callback(rooms("r1"))
    assert d.sessions == [] and d.transport.events == []
    assert older.transport.closed is None  # the older connection of the device is not replaced
    assert list(h.gateway.registry.sessions) == [older.session]
    assert h.store.devices["gateway:device:alice:phone"] == [device_entry("gw-test", older.session.id)]
    assert h.gateway._opening == 0


def test_gone_before_start_or_after_a_close_does_nothing_more(h):
    d = Device(h)
    d.opening.gone()
    d.opening.start("alice")
    assert h.core.calls == [] and d.transport.closed is None
    closed = Device(h)
    closed.opening.start()
    closed.opening.receive(typing("no token"))
    closed.opening.receive(pb.StreamRequest(auth_token="alice"))  # after the close: ignored
    assert closed.sessions == [] and h.core.calls == []


# ---------------------------------------------------------------- the edges' words, bearer tokens


def test_each_edge_names_its_requests_in_its_close_reasons():
    ws, grpc_edge = websocket.REASONS, grpcstream.REASONS
    assert (ws.no_token, ws.timeout, ws.too_many) == (
        "the first frame must carry auth_token",
        "authentication timeout: send auth_token in the first frame",
        "too many frames before connected",
    )
    assert (grpc_edge.first, grpc_edge.no_token, grpc_edge.timeout, grpc_edge.too_many) == (
        "the first message must carry auth_token",
        "the first message must carry auth_token (or send authorization metadata)",
        "authentication timeout: send authorization metadata or auth_token in the first message",
        "too many messages before connected",
    )


def test_bearer_token():
    assert bearer_token("Bearer abc") == "abc"
    assert bearer_token("bearer  abc ") == "abc"
    assert bearer_token("Basic abc") is None
    assert bearer_token("Bearer ") is None
    assert bearer_token(None) is None
