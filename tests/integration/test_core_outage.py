"""Calls to the core when it goes away, comes back, or is slow: separate processes.

redis-server, `twistd chatcore` and `twistd chatgateway` (CHAT_SERVICE_URI pointing
at the core, Redis as bus and store), or a gateway in front of a scripted core in
this process.
"""

import collections
import http.server
import json
import socket
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import grpc
import pytest
import pytest_twisted
from grpc_health.v1 import health_pb2, health_pb2_grpc
from twisted.internet import threads

from chatgateway.api import chat_pb2 as pb
from chatgateway.auth.devtokens import mint_token
from chatgateway.client.wsclient import GatewayClient
from support.chat import unique
from support.fakecore import FakeCore
from support.grpcclient import ConnectError, StreamDevice, connect_call, unary
from support.processes import Twistd, free_port, until
from support.redis import RedisServer

SECRET = "outage-test-secret-0123456789abcdef01234567"
CORE_TIMEOUT = 1.0
MARGIN = 0.6  # scheduling, a thread hop each way, an HTTP round trip
BREAKER_FAILURES = 3
BREAKER_COOLDOWN = 1.0
HEARTBEAT = 0.5
CONNECTION_TIMEOUT = 3.0


def token(profile, device=None):
    return mint_token(SECRET, profile, device_id=device, audience="service_chat_gateway")


def gateway_env(core_target, **settings):
    return {
        "JWT_SECRET": SECRET,
        "OAUTH2_ISSUER": "",
        "CHAT_SERVICE_URI": core_target,
        "HTTP_INTERFACE": "127.0.0.1",
        "CORE_TIMEOUT_SEC": str(CORE_TIMEOUT),
        "CORE_BREAKER_FAILURES": str(BREAKER_FAILURES),
        "CORE_BREAKER_COOLDOWN_SEC": str(BREAKER_COOLDOWN),
        "HEARTBEAT_INTERVAL_SEC": str(HEARTBEAT),
        "CONNECTION_TIMEOUT_SEC": str(CONNECTION_TIMEOUT),
        "MAX_EVENTS_PER_SECOND": "1000",
        "LOG_LEVEL": "info",
        **settings,
    }


class Deployment:
    def __init__(self, gateway, http_port, grpc_port):
        self.gateway = gateway
        self.http = f"http://127.0.0.1:{http_port}"
        self.ws = f"ws://127.0.0.1:{http_port}/ws"
        self.grpc = f"127.0.0.1:{grpc_port}"

    def readyz(self):
        try:
            with urllib.request.urlopen(self.http + "/readyz", timeout=5) as answer:
                return answer.status, json.load(answer)
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read())

    def health(self):
        with grpc.insecure_channel(self.grpc) as channel:
            return (
                health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""), timeout=5).status
            )


def start_gateway(env):
    http_port, grpc_port = free_port(), free_port()
    process = Twistd(
        "chatgateway",
        ["--workers", "1"],
        env={**env, "HTTP_PORT": str(http_port), "GRPC_PORT": str(grpc_port)},
        port=http_port,
        also_ports=[grpc_port],  # bound after HTTP_PORT; the tests call it at once
    )
    process.start()
    return Deployment(process, http_port, grpc_port)


def stop_cleanly(process):
    code = process.stop()
    assert code in (0, -15), process.log_tail()
    assert "Traceback (most recent call last)" not in process.log_text(), process.log_tail(80)


# ---------------------------------------------------------------- the real core, stopped and started


@pytest.fixture(scope="module")
def outage():
    redis = RedisServer()
    db = Path(tempfile.mkdtemp(prefix="core-db-")) / "core.sqlite"
    core_port = free_port()
    core = Twistd(
        "chatcore",
        ["--port", core_port, "--db", db],
        env={"JWT_SECRET": SECRET, "OAUTH2_ISSUER": "", "CACHE_URI": redis.uri},
        port=core_port,
    )
    core.start()
    deployment = start_gateway(gateway_env(f"127.0.0.1:{core_port}", CACHE_URI=redis.uri, GATEWAY_ID="gw-outage"))
    deployment.core = core
    try:
        yield deployment
    finally:
        try:
            stop_cleanly(deployment.gateway)
        finally:
            core.stop()
            redis.cleanup()


def test_a_silent_grpc_stream_ends_like_a_heartbeat_timeout(outage):
    device = StreamDevice(outage.grpc, token(unique("quiet")))
    try:
        device.next_event("connected")
        started = time.monotonic()
        code, details, trailing = device.wait_end(timeout=CONNECTION_TIMEOUT + 3)
        elapsed = time.monotonic() - started
    finally:
        device.close()
    assert code == grpc.StatusCode.UNAVAILABLE and details == "heartbeat timeout"
    assert trailing["chat-close-code"] == "4408"
    print(f"\nsilent stream ended after {elapsed:.2f}s (CONNECTION_TIMEOUT_SEC={CONNECTION_TIMEOUT})")
    assert CONNECTION_TIMEOUT - 0.2 <= elapsed <= CONNECTION_TIMEOUT + HEARTBEAT + MARGIN


def connect_failure(deployment, method, request, profile):
    started = time.monotonic()
    with pytest.raises(ConnectError) as failed:
        connect_call(deployment.http, method, request, token(profile))
    return failed.value, time.monotonic() - started


@pytest_twisted.ensureDeferred
async def test_core_outage_opens_the_circuit_devices_stay_and_recovery_closes_it(outage):
    alice_id, bob_id = unique("alice"), unique("bob")
    alice = await GatewayClient.connect(outage.ws, token(alice_id, "laptop"))
    await alice.next_event("connected")
    bob = StreamDevice(outage.grpc, token(bob_id, "phone")).keepalive(HEARTBEAT)
    try:
        await bob.anext_event("connected")
        room = (await alice.call("CreateRoom", pb.CreateRoomRequest(name="outage", member_ids=[bob_id]))).room
        await bob.anext_event("subscription_event")
        before = await alice.send_message(room.id, "before")
        await bob.anext_event("message", lambda e: e.message.id == before.id)

        await threads.deferToThread(outage.core.stop)

        # calls fail within the deadline with UNAVAILABLE, until the circuit opens
        history = pb.GetHistoryRequest(room_id=room.id)
        for _ in range(BREAKER_FAILURES):
            error, elapsed = await threads.deferToThread(connect_failure, outage, "GetHistory", history, alice_id)
            assert (error.status, error.code) == (503, "unavailable")
            assert "circuit" not in error.message
            assert elapsed < CORE_TIMEOUT + MARGIN
            print(f"\ncore down: UNAVAILABLE after {elapsed * 1000:.0f} ms")
        # then they fail fast, without going to the core
        error, elapsed = await threads.deferToThread(connect_failure, outage, "GetHistory", history, alice_id)
        assert (error.status, error.code) == (503, "unavailable") and "circuit open" in error.message
        assert elapsed < CORE_TIMEOUT  # no thread, no core: only the HTTP round trip
        print(f"circuit open: UNAVAILABLE after {elapsed * 1000:.0f} ms")
        with grpc.insecure_channel(outage.grpc) as channel:
            with pytest.raises(grpc.RpcError) as refused:
                await threads.deferToThread(unary, channel, "GetHistory", history, token(alice_id))
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE and "circuit" in refused.value.details()
        status, body = await threads.deferToThread(outage.readyz)
        assert status == 503 and body["dependencies"]["core"].startswith("circuit")
        not_serving = await threads.deferToThread(
            until, lambda: outage.health() == health_pb2.HealthCheckResponse.NOT_SERVING, 6
        )
        assert not_serving

        # the devices stay connected and keep receiving from the bus
        await alice.command(typing=pb.TypingCommand(room_id=room.id, typing=True))
        typing = await bob.anext_event("typing_event")
        assert typing.typing_event.profile_id == alice_id
        bob.command(request_id="m", read_marker=pb.ReadMarkerCommand(room_id=room.id, event_id=before.id))
        assert not (await bob.aresult("m")).command_result.HasField("error")
        receipt = await alice.next_event("receipt_event")
        assert receipt.receipt_event.profile_id == bob_id
        assert bob.end is None and alice.close_code is None

        # the core comes back: a probe gets through, the circuit closes, calls succeed
        await threads.deferToThread(outage.core.start)

        def answered():
            try:
                return connect_call(outage.http, "GetHistory", history, token(alice_id), timeout=5)
            except ConnectError as e:  # the circuit is open, or the channel is still reconnecting
                assert e.code in ("unavailable", "deadline_exceeded"), e
                return None

        restarted = time.monotonic()
        recovered = await threads.deferToThread(until, answered, 15, step=0.25)
        print(f"core back: first success {time.monotonic() - restarted:.2f}s after it listened")
        assert recovered is not None and before.id in [e.id for e in recovered.events]
        status, body = await threads.deferToThread(until, lambda: (s := outage.readyz())[0] == 200 and s, 10)
        assert body["dependencies"]["core"] == "up"
        after = await alice.send_message(room.id, "after")
        got = await bob.anext_event("message", lambda e: e.message.id == after.id)  # the core publishes again
        assert got.message.payload["text"] == "after"
        serving = await threads.deferToThread(
            until, lambda: outage.health() == health_pb2.HealthCheckResponse.SERVING, 6
        )
        assert serving
    finally:
        bob.close()
        await alice.close()


# ---------------------------------------------------------------- a scripted core: slow, refusing, watching


class TokenEndpoint:
    """OAUTH2_TOKEN_ENDPOINT for the gateway's client-credentials token."""

    def __init__(self):
        self.requests = []
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):
                outer.requests.append(self.headers.get("Authorization"))
                body = json.dumps({"access_token": f"svc-{len(outer.requests)}", "expires_in": 300}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}/oauth/token"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def stop(self):
        self.server.shutdown()


DETAILS = b"\x08\x09\x12\x10scripted details"  # a google.rpc.Status, as the core would send it
TRACEPARENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


class _Status(grpc.Status):
    def __init__(self, code, details, trailing):
        self.code, self.details, self.trailing_metadata = code, details, trailing


@pytest.fixture(scope="module")
def scripted():
    core = FakeCore()

    def slow(request, context):
        time.sleep(CORE_TIMEOUT + 2)
        return pb.GetHistoryResponse()

    def refuse(request, context):
        context.abort_with_status(
            _Status(
                grpc.StatusCode.FAILED_PRECONDITION,
                "the last owner cannot be demoted",
                (("grpc-status-details-bin", DETAILS),),
            )
        )

    core.answers["GetHistory"] = slow
    core.answers["UpdateSubscriptionRole"] = refuse
    core.answers["CreateRoom"] = lambda request, context: pb.CreateRoomResponse(
        room=pb.Room(id="r1", name=request.name)
    )
    core.answers["SearchRooms"] = lambda request, context: []
    endpoint = TokenEndpoint()
    deployment = start_gateway(
        gateway_env(
            core.target,
            CORE_BREAKER_FAILURES="100",
            OAUTH2_TOKEN_ENDPOINT=endpoint.url,
            JWT_CLIENT_ID="gateway-client",
            JWT_CLIENT_SECRET="gateway-secret",
        )
    )
    deployment.core = core
    deployment.token_endpoint = endpoint
    try:
        yield deployment
    finally:
        try:
            stop_cleanly(deployment.gateway)
        finally:
            core.stop()
            endpoint.stop()


def test_a_core_slower_than_the_deadline_gives_deadline_exceeded(scripted):
    error, elapsed = connect_failure(scripted, "GetHistory", pb.GetHistoryRequest(room_id="r1"), unique("patient"))
    assert (error.status, error.code) == (504, "deadline_exceeded")
    assert CORE_TIMEOUT <= elapsed <= CORE_TIMEOUT + MARGIN
    print(f"\nslow core: Connect deadline_exceeded after {elapsed:.3f}s (CORE_TIMEOUT_SEC={CORE_TIMEOUT})")

    with grpc.insecure_channel(scripted.grpc) as channel:
        started = time.monotonic()
        with pytest.raises(grpc.RpcError) as late:
            unary(channel, "GetHistory", pb.GetHistoryRequest(room_id="r1"), token(unique("patient")))
        elapsed = time.monotonic() - started
        assert late.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert CORE_TIMEOUT <= elapsed <= CORE_TIMEOUT + MARGIN
        print(f"slow core: gRPC DEADLINE_EXCEEDED after {elapsed:.3f}s")

        # a caller's own shorter deadline is what the gateway gives the core
        started = time.monotonic()
        with pytest.raises(grpc.RpcError) as early:
            unary(channel, "GetHistory", pb.GetHistoryRequest(room_id="r1"), token(unique("hasty")), timeout=0.3)
        assert early.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert time.monotonic() - started < CORE_TIMEOUT


def test_the_cores_status_and_details_pass_through_unchanged(scripted):
    request = pb.UpdateSubscriptionRoleRequest(room_id="r1", profile_id="p", roles=["member"])
    with grpc.insecure_channel(scripted.grpc) as channel:
        with pytest.raises(grpc.RpcError) as refused:
            unary(channel, "UpdateSubscriptionRole", request, token(unique("owner")))
    assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert refused.value.details() == "the last owner cannot be demoted"
    assert dict(refused.value.trailing_metadata())["grpc-status-details-bin"] == DETAILS
    error, _ = connect_failure(scripted, "UpdateSubscriptionRole", request, unique("owner"))
    assert (error.status, error.code, error.message) == (400, "failed_precondition", "the last owner cannot be demoted")


def test_calls_carry_identity_trace_context_and_the_gateways_own_token(scripted):
    device_token = token(unique("traced"), "tablet-7")
    connect_call(
        scripted.http,
        "CreateRoom",
        pb.CreateRoomRequest(name="traced"),
        device_token,
        headers={"traceparent": TRACEPARENT},
    )
    seen = scripted.core.metadata("CreateRoom")
    assert seen["authorization"] == f"Bearer {device_token}"
    assert seen["x-device-id"] == "tablet-7"
    assert seen["x-gateway-id"].startswith("gateway-")
    assert seen["traceparent"] == TRACEPARENT
    assert seen["x-service-authorization"] == "Bearer svc-1"  # fetched at start, cached
    assert scripted.token_endpoint.requests[0].startswith("Basic ")

    with grpc.insecure_channel(scripted.grpc) as channel:
        unary(
            channel,
            "CreateRoom",
            pb.CreateRoomRequest(name="traced"),
            device_token,
            metadata=[("traceparent", TRACEPARENT)],
        )
    seen = scripted.core.metadata("CreateRoom")
    assert seen["traceparent"] == TRACEPARENT and seen["x-service-authorization"] == "Bearer svc-1"
    assert len(scripted.token_endpoint.requests) == 1


# ---------------------------------------------------------------- a core that accepts and never answers


# An empty HTTP/2 SETTINGS frame, and the ACK of the client's (RFC 9113 §6.5).
HTTP2_SETTINGS = bytes([0, 0, 0, 4, 0, 0, 0, 0, 0])
HTTP2_SETTINGS_ACK = bytes([0, 0, 0, 4, 1, 0, 0, 0, 0])


class SilentCore:
    """CHAT_SERVICE_URI for a core that is there and never answers (its handlers stuck):
    a TCP listener that accepts, completes the HTTP/2 greeting and then reads and
    ignores everything. Without the greeting grpc gives up on the connection after its
    connect timeout (250 ms with the gateway's channel options) and calls fail at once
    with UNAVAILABLE: a different outage."""

    def __init__(self):
        self.listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(128)
        self.target = f"127.0.0.1:{self.listener.getsockname()[1]}"
        self.accepted = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                connection, _ = self.listener.accept()
            except OSError:
                return  # closed
            self.accepted.append(connection)
            connection.sendall(HTTP2_SETTINGS + HTTP2_SETTINGS_ACK)
            threading.Thread(target=self._ignore, args=(connection,), daemon=True).start()

    @staticmethod
    def _ignore(connection):
        try:
            while connection.recv(65536):
                pass
        except OSError:
            pass

    def stop(self):
        self.listener.close()
        for connection in self.accepted:
            connection.close()


STORM_THREADS, STORM_TIMEOUT, STORM_CALLS = 2, 2.0, 200
STORM_BOUND = STORM_TIMEOUT + 0.5  # the bound: CORE_TIMEOUT_SEC + 0.5 s of being made


@pytest.fixture
def silent():
    core = SilentCore()
    deployment = start_gateway(
        gateway_env(core.target, CORE_THREADS=str(STORM_THREADS), CORE_TIMEOUT_SEC=str(STORM_TIMEOUT))
    )
    try:
        yield deployment
    finally:
        try:
            stop_cleanly(deployment.gateway)
        finally:
            core.stop()


def test_no_call_outlives_its_deadline_when_the_core_never_answers(silent):
    """CORE_THREADS=2: 2 calls on the threads, 8 queued for them, 100 waiting for a place and
    90 refused; each is answered within CORE_TIMEOUT_SEC + 0.5 s of being sent, not one
    CORE_TIMEOUT_SEC after the call queued before it."""
    metadata = [("authorization", f"Bearer {token(unique('storm'))}")]
    answers = {}  # call -> (seconds from its send to its answer, status code)
    done = threading.Event()
    with grpc.insecure_channel(silent.grpc) as channel:
        grpc.channel_ready_future(channel).result(timeout=10)
        stub = channel.unary_unary(
            "/chat.v1.ChatService/GetHistory",
            request_serializer=pb.GetHistoryRequest.SerializeToString,
            response_deserializer=pb.GetHistoryResponse.FromString,
        )

        def answered(i, sent):
            def record(future):
                answers[i] = (time.monotonic() - sent, future.code())
                if len(answers) == STORM_CALLS:
                    done.set()

            return record

        futures = []  # kept until answered
        for i in range(STORM_CALLS):
            sent = time.monotonic()
            # the client's own deadline is far beyond the gateway's: the gateway's is measured
            future = stub.future(pb.GetHistoryRequest(room_id=f"r{i}"), metadata=metadata, timeout=30)
            future.add_done_callback(answered(i, sent))
            futures.append(future)
        assert done.wait(30), f"{STORM_CALLS - len(answers)} calls never answered"
    codes = collections.Counter(code.name for _, code in answers.values())
    slowest = max(elapsed for elapsed, _ in answers.values())
    print(f"\n{STORM_CALLS} calls to a core that never answers: {dict(codes)}; slowest answered after {slowest:.2f}s")
    late = sorted(round(elapsed, 2) for elapsed, _ in answers.values() if elapsed > STORM_BOUND)
    assert late == [], f"{len(late)} calls answered after {STORM_BOUND}s: {late}"
    assert set(codes) <= {"DEADLINE_EXCEEDED", "RESOURCE_EXHAUSTED", "UNAVAILABLE"}, codes
