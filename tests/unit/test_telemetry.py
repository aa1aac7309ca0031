"""Telemetry: what the hooks count, what /metrics shows, the span of a forwarded call and its propagation."""

import io
import json
import subprocess
import sys

import grpc
import pytest
import pytest_twisted
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode
from prometheus_client.parser import text_string_to_metric_families
from twisted.internet import defer
from twisted.web.test.requesthelper import DummyRequest

from chatgateway.api import chat_pb2 as pb
from chatgateway.bus import channels
from chatgateway.core import breaker as circuit
from chatgateway.core.client import CoreClient
from chatgateway.edge.connect import ConnectService
from chatgateway.edge.grpc import GrpcDevice
from chatgateway.edge.websocket import DeviceProtocol
from chatgateway.sessions.session import ISessionTransport
from chatgateway.telemetry.corecalls import InstrumentedCore
from chatgateway.telemetry.counts import GatewayCounts, transport_name
from chatgateway.telemetry.exposition import MetricsResource
from chatgateway.telemetry.providers import Telemetry
from support.fakecore import FakeCore as GrpcFakeCore
from support.wsharness import Harness

DEVICE_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
DEVICE_SPAN = "00f067aa0ba902b7"
TRACEPARENT = f"00-{DEVICE_TRACE}-{DEVICE_SPAN}-01"


def scrape(t):
    """{(sample name, frozenset of labels without otel_scope_*): value}."""
    from prometheus_client import generate_latest

    samples = {}
    for family in text_string_to_metric_families(generate_latest(t.registry).decode()):
        for sample in family.samples:
            labels = frozenset((k, v) for k, v in sample.labels.items() if not k.startswith("otel_scope"))
            samples[(sample.name, labels)] = sample.value
    return samples


def value(samples, name, **labels):
    return samples.get((name, frozenset(labels.items())), 0.0)


def test_counts_of_a_websocket_session_show_in_the_prometheus_text(telemetry_counts):
    t, counts = telemetry_counts()
    h = Harness(counts=counts, MAX_EVENTS_PER_SECOND=2)
    h.core.rooms = {"alice": ["r1"], "bob": ["r1"]}
    alice = h.connect("alice/phone")
    bob = h.connect("bob/phone", protocols=["chat.v1.proto"])
    alice.command(request_id="1", typing={"room_id": "r1", "typing": True})
    alice.command(request_id="2", read_marker={"room_id": "r1", "event_id": "e0"})
    alice.command(request_id="3", typing={"room_id": "r1", "typing": False})  # over the limit of 2/s
    h.publish(channels.room("r1"), pb.ServerEvent(id="m1", message=pb.RoomEvent(id="m1", room_id="r1")))
    h.flush()

    samples = scrape(t)
    assert value(samples, "chatgateway_server_active_connections", chatgateway_transport="websocket") == 2
    assert value(samples, "chatgateway_server_received_messages_total", chatgateway_message_kind="typing") == 2
    assert value(samples, "chatgateway_server_received_messages_total", chatgateway_message_kind="read_marker") == 1
    assert value(samples, "chatgateway_server_commands_rate_limited_total") == 1
    assert value(samples, "chatgateway_server_sent_messages_total", chatgateway_message_kind="connected") == 2
    assert value(samples, "chatgateway_server_sent_messages_total", chatgateway_message_kind="command_result") == 3
    # the room event went to both; alice's typing to bob only; the receipt to both
    assert value(samples, "chatgateway_server_sent_messages_total", chatgateway_message_kind="message") == 2
    assert value(samples, "chatgateway_server_sent_messages_total", chatgateway_message_kind="typing_event") == 1
    assert value(samples, "chatgateway_server_sent_messages_total", chatgateway_message_kind="receipt_event") == 2

    bob.client.sendClose(1000)
    h.flush()
    h.gateway.evict("gw-test", alice.server.session.id)  # the gateway closes alice (4001)
    h.flush()
    samples = scrape(t)
    assert value(samples, "chatgateway_server_active_connections", chatgateway_transport="websocket") == 0
    assert (
        value(samples, "chatgateway_server_connection_duration_seconds_count", chatgateway_transport="websocket") == 2
    )
    assert (
        value(
            samples,
            "chatgateway_server_connection_closes_total",
            chatgateway_transport="websocket",
            chatgateway_close_code="4001",
        )
        == 1
    )
    h.stop()


def test_fanout_is_counted_every_time_and_timed_one_in_n_and_when_chunked(monkeypatch, telemetry_counts):
    t, counts = telemetry_counts(fanout_sample_every=4)
    monkeypatch.setattr("chatgateway.sessions.fanout.CHUNK", 2)
    h = Harness(counts=counts)
    h.core.rooms = {f"p{i}": ["big"] for i in range(5)}
    for i in range(5):
        h.connect(f"p{i}/d")
    h.core.rooms["solo"] = ["small"]
    h.connect("solo/d")
    for n in range(8):
        h.publish(channels.room("small"), pb.ServerEvent(id=f"s{n}", message=pb.RoomEvent(id=f"s{n}", room_id="small")))
    h.publish(channels.room("big"), pb.ServerEvent(id="b", message=pb.RoomEvent(id="b", room_id="big")))
    while h.gateway.fanout._pumping is not None:
        h.advance(0)
    samples = scrape(t)
    assert value(samples, "chatgateway_server_sent_messages_total", chatgateway_message_kind="message") == 8 + 5
    # 8 small fan-outs: 2 of them timed (every 4th); the chunked one always
    assert value(samples, "chatgateway_fanout_duration_seconds_count") == 3
    h.stop()


def test_metrics_resource_answers_prometheus_and_openmetrics(telemetry_counts):
    request = DummyRequest([b""])
    assert b"not configured" in MetricsResource().render_GET(request)
    assert request.responseCode == 503

    t, counts = telemetry_counts()
    counts.sent(pb.ServerEvent(message=pb.RoomEvent()), 3)
    request = DummyRequest([b""])
    body = MetricsResource(t).render_GET(request).decode()
    assert request.responseHeaders.getRawHeaders(b"content-type")[0].startswith(b"text/plain; version=0.0.4")
    assert 'chatgateway_server_sent_messages_total{chatgateway_message_kind="message"' in body
    request = DummyRequest([b""])
    request.requestHeaders.setRawHeaders(b"accept", [b"application/openmetrics-text; version=1.0.0"])
    body = MetricsResource(t).render_GET(request).decode()
    assert request.responseHeaders.getRawHeaders(b"content-type")[0].startswith(b"application/openmetrics-text")
    assert body.rstrip().endswith("# EOF")


def test_breaker_state_and_dependency_errors_are_observed(telemetry_counts):
    from twisted.internet import task

    t, counts = telemetry_counts()

    class Core:
        breaker = circuit.CircuitBreaker(task.Clock(), failures=1, cooldown=10)
        in_flight = 3

    t.observe_core(Core())
    samples = scrape(t)
    assert value(samples, "chatgateway_core_breaker_state", chatgateway_breaker_state="closed") == 1
    assert value(samples, "chatgateway_core_breaker_state", chatgateway_breaker_state="open") == 0
    assert value(samples, "chatgateway_core_calls_in_flight") == 3
    Core.breaker.failed()
    counts.dependency_error("redis", "TimeoutError")
    samples = scrape(t)
    assert value(samples, "chatgateway_core_breaker_state", chatgateway_breaker_state="open") == 1
    assert (
        value(samples, "chatgateway_dependency_errors_total", chatgateway_dependency="redis", error_type="TimeoutError")
        == 1
    )


def test_otlp_exporters_are_made_from_the_standard_variables_only_when_an_endpoint_is_set():
    assert Telemetry("gw", environ={}).exporting == []
    t = Telemetry("gw", environ={"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4318"})
    assert t.exporting == ["metrics to http://127.0.0.1:4318", "traces to http://127.0.0.1:4318"]
    assert t.tracing
    t.shutdown(timeout=0.1)
    t = Telemetry(
        "gw",
        environ={
            "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://127.0.0.1:4317",
            "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc",
            "OTEL_METRICS_EXPORTER": "none",
        },
    )
    assert t.exporting == ["traces to http://127.0.0.1:4317"]
    t.shutdown(timeout=0.1)
    t = Telemetry("gw", environ={"OTEL_SDK_DISABLED": "true", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://x:4318"})
    assert t.exporting == [] and not t.tracing
    assert Telemetry("gw", environ={"OTEL_SERVICE_NAME": "edge-eu"}).resource.attributes["service.instance.id"] == "gw"


# ---------------------------------------------------------------- traces of forwarded calls


@pytest.fixture
def grpc_core():
    fake = GrpcFakeCore()
    fake.answers["GetHistory"] = lambda request, context: pb.GetHistoryResponse()
    fake.answers["DeleteRoom"] = lambda request, context: context.abort(grpc.StatusCode.NOT_FOUND, "no such room")
    yield fake
    fake.stop()


@pytest.fixture
def traced(grpc_core, telemetry_counts):
    """A gateway whose core is a real CoreClient (instrumented) to a scripted gRPC core; spans in memory.

    (harness, span exporter, telemetry, the CoreClient)."""
    from twisted.internet import reactor

    exporter = InMemorySpanExporter()
    t, counts = telemetry_counts(span_exporter=exporter, simple_spans=True)
    h = Harness(counts=counts)
    client = CoreClient(grpc_core.target, reactor, 5.0, 2, "gw-test")
    client.start()
    h.gateway.core = InstrumentedCore(client, counts)
    yield h, exporter, t, client
    h.stop()
    pytest_twisted.blockon(client.stop())


def connect_call(h, method, body, **headers):
    """POST a Connect call; a Deferred firing with the request once answered."""
    request = DummyRequest([method.encode()])
    request.method = b"POST"
    request.content = io.BytesIO(json.dumps(body).encode())
    request.requestHeaders.setRawHeaders(b"content-type", [b"application/json"])
    request.requestHeaders.setRawHeaders(b"authorization", [b"Bearer alice/phone"])
    for name, value in headers.items():
        request.requestHeaders.setRawHeaders(name.encode(), [value.encode()])
    service = ConnectService(h.gateway)
    d = request.notifyFinish().addCallback(lambda _: request)
    service.getChildWithDefault(method.encode(), request).render(request)
    return d


@pytest_twisted.ensureDeferred
async def test_span_of_a_forwarded_call_has_the_devices_parent_and_goes_to_the_core(traced, grpc_core):
    h, exporter, _, _ = traced
    request = await connect_call(h, "GetHistory", {"roomId": "r1"}, traceparent=TRACEPARENT, tracestate="vendor=1")
    assert request.responseCode in (None, 200)

    [span] = exporter.get_finished_spans()
    assert span.name == "chat.v1.ChatService/GetHistory"
    assert span.kind == SpanKind.CLIENT
    assert span.parent is not None and span.parent.is_remote
    assert format(span.parent.trace_id, "032x") == DEVICE_TRACE
    assert format(span.parent.span_id, "016x") == DEVICE_SPAN
    assert format(span.context.trace_id, "032x") == DEVICE_TRACE
    assert span.attributes["rpc.method"] == "chat.v1.ChatService/GetHistory"
    assert span.attributes["rpc.system.name"] == "grpc"
    assert span.attributes["rpc.response.status_code"] == "OK"
    # the core was called as a child of the gateway's span, in the same trace, with the tracestate
    metadata = grpc_core.metadata("GetHistory")
    assert metadata["traceparent"] == f"00-{DEVICE_TRACE}-{format(span.context.span_id, '016x')}-01"
    assert metadata["tracestate"] == "vendor=1"


@pytest_twisted.ensureDeferred
async def test_failed_call_span_has_the_status_and_the_metric_its_code(traced, grpc_core):
    h, exporter, t, _ = traced
    request = await connect_call(h, "DeleteRoom", {"roomId": "nope"}, traceparent=TRACEPARENT)
    assert request.responseCode == 404
    [span] = exporter.get_finished_spans()
    assert span.status.status_code == StatusCode.ERROR
    assert span.attributes["rpc.response.status_code"] == "NOT_FOUND"
    assert span.attributes["error.type"] == "NOT_FOUND"
    samples = scrape(t)
    key = dict(
        rpc_method="chat.v1.ChatService/DeleteRoom",
        rpc_response_status_code="NOT_FOUND",
        rpc_system_name="grpc",
        error_type="NOT_FOUND",
    )
    assert value(samples, "rpc_client_call_duration_seconds_count", **key) == 1


@pytest_twisted.ensureDeferred
async def test_a_call_without_trace_context_starts_a_trace(traced, grpc_core):
    h, exporter, _, _ = traced
    await connect_call(h, "GetHistory", {"roomId": "r1"})
    [span] = exporter.get_finished_spans()
    assert span.parent is None
    trace_id, span_id = format(span.context.trace_id, "032x"), format(span.context.span_id, "016x")
    passed = grpc_core.metadata("GetHistory")["traceparent"]
    assert passed.startswith(f"00-{trace_id}-{span_id}-")
    assert int(passed[-2:], 16) & 1  # sampled (the SDK also sets W3C level 2's random-trace-id flag)


@pytest_twisted.ensureDeferred
async def test_sampling_follows_the_device_and_otel_traces_sampler(traced, grpc_core, monkeypatch, telemetry_counts):
    h, exporter, _, client = traced
    unsampled = f"00-{DEVICE_TRACE}-{DEVICE_SPAN}-00"
    await connect_call(h, "GetHistory", {"roomId": "r1"}, traceparent=unsampled)
    assert exporter.get_finished_spans() == ()  # parentbased_always_on: the device said not sampled
    passed = grpc_core.metadata("GetHistory")["traceparent"]
    assert passed.startswith(f"00-{DEVICE_TRACE}-") and passed.endswith("-00")

    monkeypatch.setenv("OTEL_TRACES_SAMPLER", "always_off")
    exporter = InMemorySpanExporter()
    _, counts = telemetry_counts(span_exporter=exporter, simple_spans=True)
    h.gateway.core = InstrumentedCore(client, counts)
    await connect_call(h, "GetHistory", {"roomId": "r1"}, traceparent=TRACEPARENT)
    assert exporter.get_finished_spans() == ()


@pytest_twisted.ensureDeferred
async def test_without_a_trace_exporter_the_devices_context_passes_unchanged(grpc_core, telemetry_counts):
    from twisted.internet import reactor

    _, counts = telemetry_counts()
    h = Harness(counts=counts)
    client = CoreClient(grpc_core.target, reactor, 5.0, 2, "gw-test")
    client.start()
    h.gateway.core = InstrumentedCore(client, counts)
    try:
        await connect_call(h, "GetHistory", {"roomId": "r1"}, traceparent=TRACEPARENT, tracestate="vendor=1")
        metadata = grpc_core.metadata("GetHistory")
        assert metadata["traceparent"] == TRACEPARENT
        assert metadata["tracestate"] == "vendor=1"
        await connect_call(h, "GetHistory", {"roomId": "r1"}, traceparent="not-a-traceparent")
        assert "traceparent" not in grpc_core.metadata("GetHistory")
    finally:
        h.stop()
        await client.stop()


def test_connection_span_is_parented_by_the_handshake_traceparent(telemetry_counts):
    exporter = InMemorySpanExporter()
    _, counts = telemetry_counts(span_exporter=exporter, simple_spans=True)
    h = Harness(counts=counts)
    h.core.rooms = {"alice": ["r1"]}
    connection = h.connect("alice/phone", headers={"traceparent": TRACEPARENT})
    assert exporter.get_finished_spans() == ()  # still open
    connection.client.sendClose(1000)
    h.flush()
    [span] = exporter.get_finished_spans()
    assert span.name == "chatgateway.connection"
    assert span.kind == SpanKind.SERVER
    assert format(span.parent.span_id, "016x") == DEVICE_SPAN
    assert span.attributes["chatgateway.transport"] == "websocket"
    assert span.attributes["chatgateway.session_id"]
    h.stop()


def test_instrumented_core_passes_everything_else_through():
    class Core:
        breaker = "the breaker"

        def readiness(self):
            return defer.succeed("up")

        def call(self, method, request, token, device_id="", **options):
            self.options = options
            return defer.succeed("answer")

    core = Core()
    wrapped = InstrumentedCore(core, GatewayCounts())
    assert wrapped.breaker == "the breaker"
    assert wrapped.readiness().result == "up"
    assert wrapped.call("GetHistory", None, "t", timeout=2.0).result == "answer"
    assert core.options == {"timeout": 2.0}


# ---------------------------------------------------------------- counts objects and transport names


def test_two_gateway_counts_share_nothing(telemetry_counts):
    first, second = GatewayCounts(), GatewayCounts()
    first.received(pb.StreamRequest(command=pb.ClientCommand(typing=pb.TypingCommand(room_id="r1"))))
    first.sent(pb.ServerEvent(message=pb.RoomEvent()), 2)
    first.fanned_out(pb.ServerEvent(message=pb.RoomEvent()), 3, first.clock())
    first.fanout_dropped(pb.ServerEvent(message=pb.RoomEvent()), 4)
    first.connection_closing(DeviceProtocol, 4001)
    first.rate_limited()
    first.dependency_error("redis", "TimeoutError")
    assert first.received_counts()["typing"] == 1 and first.sent_counts()["message"] == 5
    assert first.dropped_counts()["message"] == 4 and first.rate_limited_count() == 1
    assert first.close_counts() == {("websocket", 4001): 1}
    assert first.dependency_error_counts() == {("redis", "TimeoutError"): 1}
    assert second.received_counts()["typing"] == 0 and second.sent_counts()["message"] == 0
    assert second.dropped_counts()["message"] == 0 and second.rate_limited_count() == 0
    assert second.close_counts() == {} and second.dependency_error_counts() == {}

    # Two gateways in one process, each with its own Telemetry: each /metrics shows its own devices only.
    (t1, counts1), (t2, counts2) = telemetry_counts(), telemetry_counts()
    h = Harness(counts=counts1)
    other = h.peer("gw-other", counts=counts2)
    h.core.rooms = {"alice": ["r1"], "bob": ["r1"], "carol": ["r1"]}
    h.connect("alice/phone")
    other.connect("bob/phone")
    other.connect("carol/phone")
    assert counts1.active_counts()["websocket"] == 1 and counts2.active_counts()["websocket"] == 2
    active = "chatgateway_server_active_connections"
    assert value(scrape(t1), active, chatgateway_transport="websocket") == 1
    assert value(scrape(t2), active, chatgateway_transport="websocket") == 2
    h.stop()
    other.stop()


def test_a_redis_connection_counts_its_failures_into_the_counts_it_is_given():
    from twisted.internet import task

    from chatgateway.redisconn.connection import ConnectionError, RedisConnection
    from chatgateway.redisconn.uri import parse_uri

    counts, other = GatewayCounts(), GatewayCounts()
    connection = RedisConnection(parse_uri("redis://127.0.0.1:1/0"), task.Clock(), "test", counts=counts)
    failure = connection.execute("GET", "k")  # never started: not connected
    failure.addErrback(lambda f: f.trap(ConnectionError))
    assert counts.dependency_error_counts() == {("redis", "not_connected"): 1}
    assert other.dependency_error_counts() == {}


def test_the_transport_name_is_the_one_the_transport_declares():
    assert "transport_name" in ISessionTransport.names()
    assert (DeviceProtocol.transport_name, GrpcDevice.transport_name) == ("websocket", "grpc")

    class Pigeon:
        transport_name = "pigeon"

    assert transport_name(Pigeon) == transport_name(Pigeon()) == "pigeon"
    # A class named like an edge's but declaring nothing is "other": the name decides nothing.
    assert transport_name(type("DeviceProtocol", (), {})()) == "other"
    counts = GatewayCounts()
    counts.connection_closing(Pigeon(), 4429)
    assert counts.close_counts() == {("pigeon", 4429): 1}

    # A WebSocket transport that says it is something else is counted as what it says.
    h = Harness(counts=counts)
    h.factory.protocol = type("PigeonProtocol", (DeviceProtocol,), {"__slots__": (), "transport_name": "pigeon"})
    h.core.rooms = {"alice": ["r1"]}
    connection = h.connect("alice/phone")
    assert counts.active_counts()["pigeon"] == 1 and counts.active_counts()["websocket"] == 0
    h.gateway.evict("gw-test", connection.server.session.id)  # the gateway closes it (4001)
    h.flush()
    assert counts.close_counts()[("pigeon", 4001)] == 1
    assert counts.active_counts()["pigeon"] == 0
    h.stop()


def test_importing_readiness_does_not_import_opentelemetry():
    program = (
        "import sys, chatgateway.telemetry, chatgateway.telemetry.readiness\n"
        "loaded = sorted(m for m in sys.modules if m.startswith('opentelemetry'))\n"
        "assert not loaded, loaded\n"
    )
    subprocess.run([sys.executable, "-c", program], check=True)
