"""Observability of a real `twistd chatgateway --dev` process: /metrics, OTLP, logs.

- a Prometheus text-format scrape of /metrics shows the connected devices (WebSocket
  and gRPC) and the messages they exchanged;
- spans and metrics reach an OTLP/HTTP receiver run by the test (the standard
  OTEL_EXPORTER_OTLP_ENDPOINT), the span of a forwarded call parented by the
  trace context the device sent;
- at LOG_LEVEL=debug, in both LOG_FORMATs, no token (header, query, first frame,
  refused, Connect, gRPC) and no secret appears in the log; json lines parse;
- the Dockerfile's HEALTHCHECK command answers for the running process.
"""

import json
import subprocess
import sys
import time

import pytest
import pytest_twisted
from dockerfile_parse import DockerfileParser
from integration.conftest import SECRET, DevGateway
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import (
    ExportMetricsServiceRequest,
    ExportMetricsServiceResponse,
)
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from prometheus_client.parser import text_string_to_metric_families
from twisted.internet import threads
from twisted.web import resource, server

from chatgateway.api import chat_pb2 as pb
from chatgateway.api import codec
from chatgateway.auth.devtokens import mint_token
from chatgateway.client.wsclient import ClosedError, GatewayClient
from support.chat import unique
from support.grpcclient import ConnectError, StreamDevice, connect_call
from support.processes import REPO_ROOT, Twistd, free_port

DEVICE_TRACE = "0af7651916cd43dd8448eb211c80319c"
DEVICE_SPAN = "b7ad6b7169203331"


class OtlpReceiver(resource.Resource):
    """POST /v1/traces and /v1/metrics (OTLP/HTTP, protobuf): keeps what arrives."""

    isLeaf = True

    def __init__(self):
        super().__init__()
        self.spans = []  # (resource attributes, span)
        self.metric_names = set()

    def render_POST(self, request):
        body = request.content.read()
        if request.path == b"/v1/traces":
            export = ExportTraceServiceRequest.FromString(body)
            for resource_spans in export.resource_spans:
                attributes = {a.key: a.value.string_value for a in resource_spans.resource.attributes}
                for scope in resource_spans.scope_spans:
                    self.spans.extend((attributes, span) for span in scope.spans)
            answer = ExportTraceServiceResponse()
        elif request.path == b"/v1/metrics":
            export = ExportMetricsServiceRequest.FromString(body)
            for resource_metrics in export.resource_metrics:
                for scope in resource_metrics.scope_metrics:
                    self.metric_names.update(m.name for m in scope.metrics)
            answer = ExportMetricsServiceResponse()
        else:
            request.setResponseCode(404)
            return b""
        request.setHeader(b"content-type", b"application/x-protobuf")
        return answer.SerializeToString()


@pytest.fixture(scope="module")
def otlp():
    from twisted.internet import reactor

    receiver = OtlpReceiver()
    site = server.Site(receiver)
    site.noisy = False
    port = reactor.listenTCP(0, site, interface="127.0.0.1")
    receiver.url = f"http://127.0.0.1:{port.getHost().port}"
    yield receiver
    port.stopListening()


def start_gateway(log_format, extra_env=None):
    port, grpc_port = free_port(), free_port()
    env = {
        "JWT_SECRET": SECRET,
        "MAX_EVENTS_PER_SECOND": "1000",
        "LOG_LEVEL": "debug",
        "LOG_FORMAT": log_format,
        **(extra_env or {}),
    }
    process = Twistd(
        "chatgateway",
        ["--dev", "--http-port", port, "--grpc-port", grpc_port],
        env=env,
        port=port,
        also_ports=[grpc_port],
    )
    process.start()
    return DevGateway(process, port, grpc_port)


def stop_gateway(gateway):
    code = gateway.process.stop()
    assert code in (0, -15), gateway.process.log_tail()
    assert "Traceback (most recent call last)" not in gateway.process.log_text(), gateway.process.log_tail(80)


@pytest.fixture(scope="module")
def observed(otlp):
    """A gateway at LOG_LEVEL=debug, LOG_FORMAT=json, exporting to the test's OTLP receiver."""
    gateway = start_gateway(
        "json",
        {
            "OTEL_EXPORTER_OTLP_ENDPOINT": otlp.url,
            "OTEL_BSP_SCHEDULE_DELAY": "100",
            "OTEL_METRIC_EXPORT_INTERVAL": "500",
            "OTEL_SERVICE_NAME": "chatgateway-under-test",
        },
    )
    yield gateway
    stop_gateway(gateway)


def scrape(gateway):
    """{(name, frozenset(labels without otel_scope_*)): value} of GET /metrics."""
    import urllib.request

    with urllib.request.urlopen(gateway.http + "/metrics", timeout=5) as answer:
        assert answer.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        text = answer.read().decode()
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = frozenset((k, v) for k, v in sample.labels.items() if not k.startswith("otel_scope"))
            samples[(sample.name, labels)] = sample.value
    return samples


def value(samples, name, **labels):
    return samples.get((name, frozenset(labels.items())), 0.0)


def delta(after, before, name, **labels):
    return value(after, name, **labels) - value(before, name, **labels)


async def until(predicate, timeout=10.0, what="condition"):
    """Wait (off the reactor thread) until predicate() is true."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"no {what} within {timeout}s")
        await threads.deferToThread(time.sleep, 0.05)


@pytest_twisted.ensureDeferred
async def test_scrape_shows_connected_devices_and_message_counters(observed):
    base = scrape(observed)
    alice_id, bob_id, carol_id = unique("alice"), unique("bob"), unique("carol")
    alice = await GatewayClient.connect(observed.url, observed.token(alice_id, "phone"))
    await alice.next_event("connected")
    bob = await GatewayClient.connect(observed.url, observed.token(bob_id, "phone"), subprotocol=codec.PROTO)
    await bob.next_event("connected")
    carol = StreamDevice(observed.grpc, observed.token(carol_id, "tablet"))
    await carol.anext_event("connected")

    connected = scrape(observed)
    assert delta(connected, base, "chatgateway_server_active_connections", chatgateway_transport="websocket") == 2
    assert delta(connected, base, "chatgateway_server_active_connections", chatgateway_transport="grpc") == 1
    assert delta(connected, base, "chatgateway_server_sent_messages_total", chatgateway_message_kind="connected") == 3

    room = (await alice.call("CreateRoom", pb.CreateRoomRequest(name="metrics", member_ids=[bob_id, carol_id]))).room
    await bob.next_event("subscription_event")
    await carol.anext_event("subscription_event")
    # the room's own events (creation, members) have arrived everywhere: a fence per device
    fence = await alice.send_message(room.id, "fence")
    await bob.next_event("message", lambda e: e.message.id == fence.id)
    await carol.anext_event("message", lambda e: e.message.id == fence.id)
    await alice.next_event("message", lambda e: e.message.id == fence.id)

    before = scrape(observed)
    sent = [await alice.send_message(room.id, f"m{i}") for i in range(3)]
    for event in sent:
        await bob.next_event("message", lambda e, i=event.id: e.message.id == i)
        await carol.anext_event("message", lambda e, i=event.id: e.message.id == i)
        await alice.next_event("message", lambda e, i=event.id: e.message.id == i)
    after = scrape(observed)
    assert (
        delta(after, before, "chatgateway_server_received_messages_total", chatgateway_message_kind="room_event") == 3
    )
    assert (
        delta(after, before, "chatgateway_server_sent_messages_total", chatgateway_message_kind="command_result") == 3
    )
    assert delta(after, before, "chatgateway_server_sent_messages_total", chatgateway_message_kind="message") == 9
    calls = dict(rpc_method="chat.v1.ChatService/SendEvent", rpc_response_status_code="OK", rpc_system_name="grpc")
    assert delta(after, before, "rpc_client_call_duration_seconds_count", **calls) == 3
    assert value(after, "chatgateway_core_breaker_state", chatgateway_breaker_state="closed") == 1

    await bob.close()
    carol.close()
    await until(
        lambda: (
            delta(scrape(observed), base, "chatgateway_server_active_connections", chatgateway_transport="grpc") == 0
        ),
        what="the gRPC stream to end",
    )
    closed = scrape(observed)
    assert delta(closed, base, "chatgateway_server_active_connections", chatgateway_transport="websocket") == 1
    assert (
        delta(closed, base, "chatgateway_server_connection_duration_seconds_count", chatgateway_transport="websocket")
        == 1
    )
    assert (
        delta(closed, base, "chatgateway_server_connection_duration_seconds_count", chatgateway_transport="grpc") == 1
    )
    await alice.close()


@pytest_twisted.ensureDeferred
async def test_otlp_receives_the_span_of_a_forwarded_call_with_the_devices_parent(observed, otlp):
    profile = unique("tracer")
    traceparent = f"00-{DEVICE_TRACE}-{DEVICE_SPAN}-01"
    await threads.deferToThread(
        connect_call,
        observed.http,
        "CreateRoom",
        pb.CreateRoomRequest(name="traced"),
        token=observed.token(profile),
        headers={"traceparent": traceparent},
    )

    def ours():
        return [
            (attributes, span)
            for attributes, span in otlp.spans
            if span.name == "chat.v1.ChatService/CreateRoom" and span.trace_id.hex() == DEVICE_TRACE
        ]

    await until(lambda: ours(), what="the span over OTLP")
    [(attributes, span)] = ours()
    assert span.parent_span_id.hex() == DEVICE_SPAN
    assert span.kind == span.SPAN_KIND_CLIENT
    assert attributes["service.name"] == "chatgateway-under-test"
    assert attributes["service.instance.id"].startswith("gateway-")
    span_attributes = {a.key: a.value.string_value for a in span.attributes}
    assert span_attributes["rpc.method"] == "chat.v1.ChatService/CreateRoom"
    assert span_attributes["rpc.response.status_code"] == "OK"

    # a WebSocket connection is a span too, parented by its handshake's traceparent
    client = await GatewayClient.connect(
        observed.url, observed.token(unique("ws")), headers={"traceparent": traceparent}
    )
    await client.next_event("connected")
    await client.close()
    await until(
        lambda: any(
            s.name == "chatgateway.connection" and s.parent_span_id.hex() == DEVICE_SPAN for _, s in otlp.spans
        ),
        what="the connection span",
    )
    await until(lambda: "chatgateway.server.active_connections" in otlp.metric_names, what="metrics over OTLP")
    assert {"rpc.client.call.duration", "chatgateway.server.sent.messages"} <= otlp.metric_names


async def exercise_every_token_path(gateway):
    """Connect with each kind of credential, good and bad; every token used."""
    tokens = []

    def token(profile, device=None, **kwargs):
        tokens.append(gateway.token(profile, device, **kwargs))
        return tokens[-1]

    by_header = await GatewayClient.connect(gateway.url, token(unique("header"), "h"))
    await by_header.next_event("connected")
    await by_header.call("CreateRoom", pb.CreateRoomRequest(name="logged"))
    by_query = await GatewayClient.connect(gateway.url, token(unique("query"), "q"), auth="query")
    await by_query.next_event("connected")
    frame_profile = unique("frame")
    by_frame = await GatewayClient.connect(gateway.url, token(frame_profile), auth="frame", device_id="f")
    await by_frame.next_event("connected")
    # a fresh token in a later frame (token refresh), then a command to fence it
    by_frame.send_raw(json.dumps({"authToken": token(frame_profile, "f")}).encode())
    await by_frame.call("CreateRoom", pb.CreateRoomRequest(name="after refresh"))
    bad = mint_token(
        "another-secret-0123456789abcdefgh",
        unique("mallory"),
        issuer="chatgateway-dev",
        audience="service_chat_gateway",
    )
    tokens.append(bad)
    with pytest.raises(ClosedError):
        await GatewayClient.connect(gateway.url, bad)
    refused = await GatewayClient.connect(gateway.url, bad, auth="frame")
    assert (await refused.closed)[0] == 4401
    refused = await GatewayClient.connect(gateway.url, bad, auth="query")
    assert (await refused.closed)[0] == 4401
    # Connect HTTP and gRPC carry tokens in headers/metadata
    await threads.deferToThread(
        connect_call, gateway.http, "CreateRoom", pb.CreateRoomRequest(name="c"), token=token(unique("connect"))
    )
    stream = StreamDevice(gateway.grpc, token(unique("grpc"), "g"))
    await stream.anext_event("connected")
    stream.close()
    with pytest.raises(ConnectError):
        await threads.deferToThread(connect_call, gateway.http, "CreateRoom", pb.CreateRoomRequest(name="c"), token=bad)
    for client in (by_header, by_query, by_frame):
        await client.close()
    return tokens


def assert_nothing_secret(log, tokens):
    assert log.count("\n") > 20
    for token in tokens:
        header, payload, signature = token.split(".")
        assert token not in log
        assert signature not in log
        assert f"{header}.{payload}" not in log
    assert SECRET not in log
    assert "another-secret-0123456789abcdefgh" not in log


@pytest_twisted.ensureDeferred
async def test_no_token_or_secret_in_the_json_debug_log(observed):
    tokens = await exercise_every_token_path(observed)
    log = observed.process.log_text()
    assert_nothing_secret(log, tokens)
    records = [json.loads(line) for line in log.splitlines() if line.startswith("{")]
    assert len(records) > 20
    assert {"debug", "info"} <= {r["level"] for r in records}
    assert all({"time", "level", "namespace", "message"} <= set(r) for r in records)
    connected = [r for r in records if r["message"].startswith("device ") and "connected with" in r["message"]]
    assert connected and all("profile_id" in r and "device_id" in r for r in connected)


@pytest_twisted.ensureDeferred
async def test_no_token_or_secret_in_the_text_debug_log():
    gateway = start_gateway("text")
    try:
        tokens = await exercise_every_token_path(gateway)
        log = gateway.process.log_text()
        assert "#debug]" in log
        assert_nothing_secret(log, tokens)
    finally:
        stop_gateway(gateway)


def test_the_dockerfiles_healthcheck_command_answers_for_the_running_gateway(observed):
    healthcheck = next(
        i["value"]
        for i in DockerfileParser(str(REPO_ROOT / "Dockerfile")).structure
        if i["instruction"] == "HEALTHCHECK"
    )
    command = json.loads(healthcheck.split("CMD", 1)[1].strip())
    assert command[0] == "python"
    run = [sys.executable, *command[1:]]
    assert subprocess.run(run, env={"HTTP_PORT": str(observed.port)}, timeout=30).returncode == 0
    assert subprocess.run(run, env={"HTTP_PORT": str(free_port())}, timeout=30, capture_output=True).returncode != 0
