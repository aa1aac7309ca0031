"""OpenTelemetry for the gateway: the one module that owns the meter, the tracer and the instruments.

Other modules call the small functions below at the points where things happen
(``received``, ``sent``, ``fanned_out``, ``session_opened``...); only this module
knows OpenTelemetry. ``configure`` builds the providers once per process (twistd
calls it through ``TelemetryService``); until then, and with ``OTEL_SDK_DISABLED=true``,
every function still counts but nothing is exported.

Export:
- Prometheus text format at ``/metrics`` on HTTP_PORT (``MetricsResource``), always;
- OTLP (metrics and traces) when the standard ``OTEL_EXPORTER_OTLP_ENDPOINT`` (or a
  per-signal ``OTEL_EXPORTER_OTLP_{TRACES,METRICS}_ENDPOINT``) is set, over
  ``OTEL_EXPORTER_OTLP_PROTOCOL`` (``http/protobuf``, the default, or ``grpc``); the
  exporters read their other OTEL_EXPORTER_OTLP_* variables themselves. Spans are
  sampled per ``OTEL_TRACES_SAMPLER``/``OTEL_TRACES_SAMPLER_ARG`` (the SDK's default:
  parentbased_always_on).

Cost. A synchronous SDK measurement costs about 8 us on the development machine
(attribute hashing, locks), more than delivering an event to a WebSocket. So counts
are kept as plain integers on the reactor thread where they happen (one dict
update) and handed to the SDK by observable instruments when metrics are
collected; synchronous SDK calls happen once per connection or per call to the
core, never per delivered event. The fan-out latency histogram is recorded for one
fan-out in FANOUT_SAMPLE_EVERY (and for every chunked one): see ``fanned_out``.
``bench/telemetry_overhead.py`` measures what is left.

Traces. One span per call to the core (kind CLIENT, named ``chat.v1.ChatService/<Method>``,
parented by the caller's W3C trace context when it sent one), whose context goes to the
core as ``traceparent``/``tracestate`` gRPC metadata; one span per connection (kind
SERVER, ``chatgateway.connection``, recorded when the connection ends, back-dated to its
start), parented by a ``traceparent`` header of the WebSocket handshake. Without a trace exporter no span is made and the caller's trace
context is passed on unchanged.
"""

import collections
import json
import os
import time

from opentelemetry import trace
from opentelemetry.metrics import NoOpMeter, Observation
from opentelemetry.trace import SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
from twisted.application import service
from twisted.internet import defer, threads
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web import resource

from chatgateway.api import chat_pb2 as pb

# The latency clock: monotonic, independent of the reactor's (possibly fake) clock.
clock = time.perf_counter

SERVICE = "chat.v1.ChatService"
SCOPE = "chatgateway"

# Metric names (OpenTelemetry semantic conventions where one exists: rpc.client.call.duration).
ACTIVE_CONNECTIONS = "chatgateway.server.active_connections"
CONNECTION_DURATION = "chatgateway.server.connection.duration"
CONNECTION_CLOSES = "chatgateway.server.connection.closes"
RECEIVED_MESSAGES = "chatgateway.server.received.messages"
SENT_MESSAGES = "chatgateway.server.sent.messages"
FANOUT_DURATION = "chatgateway.fanout.duration"
FANOUT_DROPPED = "chatgateway.fanout.dropped"
RATE_LIMITED = "chatgateway.server.commands.rate_limited"
DEPENDENCY_ERRORS = "chatgateway.dependency.errors"
RPC_CLIENT_CALL_DURATION = "rpc.client.call.duration"
CORE_CALLS_IN_FLIGHT = "chatgateway.core.calls.in_flight"
BREAKER_STATE = "chatgateway.core.breaker.state"

# Attribute keys.
TRANSPORT = "chatgateway.transport"
MESSAGE_KIND = "chatgateway.message.kind"
CLOSE_CODE = "chatgateway.close_code"
DEPENDENCY = "chatgateway.dependency"
STATE = "chatgateway.breaker.state"
ERROR_TYPE = "error.type"
RPC_SYSTEM = "rpc.system.name"
RPC_METHOD = "rpc.method"
RPC_STATUS = "rpc.response.status_code"

# Session transports by class name (edge.websocket.DeviceProtocol, edge.grpc.GrpcDevice).
TRANSPORTS = {"DeviceProtocol": "websocket", "GrpcDevice": "grpc"}
BREAKER_STATES = ("closed", "open", "half-open")
# Answers of the core that say it is not there (as chatgateway.core.client counts them).
CORE_TRANSPORT_FAILURES = ("UNAVAILABLE", "DEADLINE_EXCEEDED")

# Seconds; fan-out runs from microseconds (one device) to a second (a huge room, chunked).
FANOUT_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
CONNECTION_BUCKETS = (1, 5, 30, 60, 300, 900, 1800, 3600, 7200, 14400, 28800, 86400)
RPC_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0)
# The longest a stop waits for OTLP to take the last spans and metrics.
FLUSH_TIMEOUT_SEC = 3.0
# One fan-out in this many is timed into FANOUT_DURATION (chunked ones always are).
FANOUT_SAMPLE_EVERY = 128

# The standard OpenTelemetry variables this module reads itself (the SDK and the
# exporters read more OTEL_* variables: every OTEL_* name is passed through).
ENVIRONMENT = (
    "OTEL_SDK_DISABLED",
    "OTEL_SERVICE_NAME",
    "OTEL_RESOURCE_ATTRIBUTES",
    "OTEL_TRACES_SAMPLER",
    "OTEL_TRACES_SAMPLER_ARG",
    "OTEL_TRACES_EXPORTER",
    "OTEL_METRICS_EXPORTER",
    "OTEL_EXPORTER_OTLP_ENDPOINT",
    "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
    "OTEL_EXPORTER_OTLP_METRICS_ENDPOINT",
    "OTEL_EXPORTER_OTLP_PROTOCOL",
    "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL",
    "OTEL_EXPORTER_OTLP_METRICS_PROTOCOL",
    "OTEL_EXPORTER_OTLP_HEADERS",
    "OTEL_METRIC_EXPORT_INTERVAL",
)

_propagator = TraceContextTextMapPropagator()
log = Logger(namespace="chatgateway.telemetry")


# ---------------------------------------------------------------- counts (reactor thread)


def _kinds(*names):
    return {name: 0 for name in names}


# Pre-filled so the dicts never change size (they are copied by the collecting thread)
# and every series exists from the start.
_received = _kinds(
    *(f.name for f in pb.ClientCommand.DESCRIPTOR.oneofs_by_name["command"].fields), "ack", "auth", "empty", "other"
)
# A defaultdict: a payload kind added to the proto later counts without a change here
# (None, no payload, is reported as "other"); dict.copy() of it is atomic under the GIL.
_sent = collections.defaultdict(int, _kinds(*(f.name for f in pb.ServerEvent.DESCRIPTOR.oneofs_by_name["payload"].fields)))
_active = _kinds(*TRANSPORTS.values(), "other")
_closes = collections.defaultdict(int)  # (transport, code) -> count; new keys are rare
_rate_limited = [0]
_dependency_errors = collections.defaultdict(int)  # (dependency, error type) -> count
_fanouts = [0]
_dropped = collections.defaultdict(int, _kinds("message"))  # payload kind -> deliveries shed by an overloaded fan-out


def received(request):
    """A StreamRequest from a device (Session.handle)."""
    kind = request.WhichOneof("payload")
    if kind == "command":
        kind = request.command.WhichOneof("command")
    elif kind is None:
        kind = "auth" if request.auth_token else "empty"
    if kind in _received:
        _received[kind] += 1
    else:
        _received["other"] += 1


def sent(event, count=1):
    """``count`` deliveries of a ServerEvent (Session.send: one; a fan-out: its recipients)."""
    _sent[event.WhichOneof("payload")] += count


def fanned_out(event, recipients, started, chunked=False):
    """A fan-out ended: ``recipients`` deliveries of ``event``, begun at ``started`` (``clock()``).

    Counted every time; timed for one in FANOUT_SAMPLE_EVERY, and for every chunked
    one (spread over reactor turns: the ones worth seeing). Sampling keeps the SDK's
    per-measurement cost off the per-event path; the histogram's quantiles stay
    right, its count is not the number of fan-outs (SENT_MESSAGES counts).
    """
    _sent[event.WhichOneof("payload")] += recipients
    count = _fanouts[0] = _fanouts[0] + 1
    if (chunked or not count % FANOUT_SAMPLE_EVERY) and started is not None:
        _instruments.fanout_duration.record(clock() - started)


def fanout_dropped(event, recipients):
    """An overloaded fan-out dropped ``event`` before delivering it to ``recipients`` devices."""
    _dropped[event.WhichOneof("payload")] += recipients


def transport_name(transport):
    """"websocket" or "grpc" for a session transport (or its class)."""
    cls = transport if isinstance(transport, type) else type(transport)
    return TRANSPORTS.get(cls.__name__, "other")


def connection_closing(transport, code):
    """The gateway closes a device's connection with ``code`` (a close code of DESIGN §5)."""
    _closes[(transport_name(transport), int(code))] += 1


def rate_limited():
    """A command refused by the per-connection rate limit."""
    _rate_limited[0] += 1


def dependency_error(dependency, error_type):
    """A failed operation on a dependency: "redis" or "core"; ``error_type`` is short and bounded."""
    _dependency_errors[(dependency, str(error_type))] += 1


# ---------------------------------------------------------------- connections


# session id -> clock() when it opened; while tracing, (clock(), wall-clock ns, the handshake's
# traceparent/tracestate or None, room count). The connection span is made when the
# connection ends, back-dated to its start: an SDK span held open would cost ~2 KiB per
# idle connection.
_connections = {}


def session_opened(session):
    """A device's session is registered (Gateway.open_session)."""
    _active[transport_name(session.transport)] += 1
    started = clock()
    if _current is not None and _current.tracing:
        headers = getattr(session.transport, "http_headers", None) or {}
        carrier = None
        if "traceparent" in headers:
            carrier = {name: headers[name] for name in ("traceparent", "tracestate") if name in headers}
        _connections[session.id] = (started, time.time_ns(), carrier, len(session.rooms))
    else:
        _connections[session.id] = started


def session_closed(session):
    """A device's session is gone (Gateway.session_closed)."""
    entry = _connections.pop(session.id, None)
    if entry is None:
        return
    transport = transport_name(session.transport)
    _active[transport] -= 1
    traced = type(entry) is tuple
    started = entry[0] if traced else entry
    _instruments.connection_duration.record(clock() - started, _attributes(TRANSPORT, transport))
    if traced and _current is not None and _current.tracing:
        _, start_ns, carrier, room_count = entry
        span = _current.tracer.start_span(
            "chatgateway.connection",
            context=_propagator.extract(carrier) if carrier else None,
            kind=SpanKind.SERVER,
            attributes={
                TRANSPORT: transport,
                "chatgateway.session_id": session.id,
                "chatgateway.gateway_id": session.gateway.config.gateway_id,
                "chatgateway.room_count": room_count,
            },
            start_time=start_ns,
        )
        span.end()


# ---------------------------------------------------------------- calls to the core


class InstrumentedCore:
    """A CoreClient whose every call is a span and an rpc.client.call.duration measurement.

    Everything else is the wrapped client's (``breaker``, ``readiness``, ``start``...).
    """

    def __init__(self, core):
        self._core = core

    def __getattr__(self, name):
        return getattr(self._core, name)

    def call(self, method, request, token, device_id="", traceparent=None, tracestate=None, timeout=None):
        full_method = f"{SERVICE}/{method}"
        span = None
        options = {}
        if _current is not None and _current.tracing:
            carrier = {"traceparent": traceparent, "tracestate": tracestate} if traceparent else {}
            parent = _propagator.extract({k: v for k, v in carrier.items() if v})
            span = _current.tracer.start_span(
                full_method,
                context=parent,
                kind=SpanKind.CLIENT,
                attributes={RPC_SYSTEM: "grpc", RPC_METHOD: full_method},
            )
            outgoing = {}
            _propagator.inject(outgoing, context=trace.set_span_in_context(span))
            traceparent, tracestate = outgoing.get("traceparent"), outgoing.get("tracestate")
        if traceparent:
            options["traceparent"] = traceparent
            if tracestate:
                options["tracestate"] = tracestate
        if timeout is not None:
            options["timeout"] = timeout
        started = clock()
        try:
            d = self._core.call(method, request, token, device_id, **options)
        except Exception as e:  # noqa: BLE001 - a synchronous failure ends the span like an asynchronous one
            d = defer.fail(e)

        def done(result):
            status = _status_name(result)
            attributes = {RPC_SYSTEM: "grpc", RPC_METHOD: full_method, RPC_STATUS: status}
            if status != "OK":
                attributes[ERROR_TYPE] = status
                if status in CORE_TRANSPORT_FAILURES:
                    dependency_error("core", status)
            _instruments.rpc_duration.record(clock() - started, attributes)
            if span is not None:
                span.set_attribute(RPC_STATUS, status)
                if status != "OK":
                    span.set_attribute(ERROR_TYPE, status)
                    span.set_status(Status(StatusCode.ERROR, _message(result)))
                span.end()
            return result

        return d.addBoth(done)


def _status_name(result):
    if not isinstance(result, Failure):
        return "OK"
    code = getattr(result.value, "code", None)
    return getattr(code, "name", None) or "UNKNOWN"


def _message(failure):
    return getattr(failure.value, "message", None) or failure.getErrorMessage()


def instrument_core(core):
    """Wrap the core client; its breaker state and calls in flight are observed from now on."""
    _observed["core"] = core
    return InstrumentedCore(core)


_observed = {}  # "core" -> the CoreClient whose breaker and in-flight calls are observed


# ---------------------------------------------------------------- the providers


def _attributes(key, value, _cache={}):  # noqa: B006 - a deliberate cache of small dicts
    attributes = _cache.get((key, value))
    if attributes is None:
        attributes = _cache[(key, value)] = {key: value}
    return attributes


class _NoInstruments:
    """What records before ``configure`` (and with the SDK disabled): nothing."""

    def __init__(self):
        meter = NoOpMeter(SCOPE)
        self.fanout_duration = meter.create_histogram(FANOUT_DURATION)
        self.connection_duration = meter.create_histogram(CONNECTION_DURATION)
        self.rpc_duration = meter.create_histogram(RPC_CLIENT_CALL_DURATION)


_instruments = _NoInstruments()
_current = None  # the Telemetry of this process, once configured


def _true(value):
    return (value or "").strip().lower() == "true"


def _endpoint(environ, signal):
    return environ.get(f"OTEL_EXPORTER_OTLP_{signal}_ENDPOINT") or environ.get("OTEL_EXPORTER_OTLP_ENDPOINT")


def _protocol(environ, signal):
    value = environ.get(f"OTEL_EXPORTER_OTLP_{signal}_PROTOCOL") or environ.get("OTEL_EXPORTER_OTLP_PROTOCOL")
    return (value or "http/protobuf").strip().lower()


def _exporter_wanted(environ, variable):
    """OTEL_{TRACES,METRICS}_EXPORTER: unset or "otlp" export over OTLP; "none" does not."""
    names = {n.strip().lower() for n in (environ.get(variable) or "otlp").split(",")}
    return "otlp" in names


def _otlp_span_exporter(environ):
    if _protocol(environ, "TRACES") == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
    else:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    return OTLPSpanExporter()


def _otlp_metric_exporter(environ):
    if _protocol(environ, "METRICS") == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import OTLPMetricExporter
    else:
        from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter
    return OTLPMetricExporter()


class Telemetry:
    """The meter provider (Prometheus reader, OTLP reader) and the tracer provider of a process."""

    def __init__(self, gateway_id="", environ=None, span_exporter=None, metric_readers=(), simple_spans=False):
        from opentelemetry.exporter.prometheus import PrometheusMetricReader
        from opentelemetry.sdk.metrics import MeterProvider
        from opentelemetry.sdk.metrics.export import PeriodicExportingMetricReader
        from opentelemetry.sdk.resources import Resource
        from prometheus_client import CollectorRegistry

        environ = os.environ if environ is None else environ
        self.disabled = _true(environ.get("OTEL_SDK_DISABLED"))
        attributes = {"service.version": _version()}
        if not environ.get("OTEL_SERVICE_NAME"):
            attributes["service.name"] = "chatgateway"
        if gateway_id:
            attributes["service.instance.id"] = gateway_id
        self.resource = Resource.create(attributes)

        self.registry = CollectorRegistry(auto_describe=True)
        readers = [PrometheusMetricReader(registry=self.registry), *metric_readers]
        self.exporting = []  # what goes out over OTLP, for the log line
        if not self.disabled and _endpoint(environ, "METRICS") and _exporter_wanted(environ, "OTEL_METRICS_EXPORTER"):
            readers.append(PeriodicExportingMetricReader(_otlp_metric_exporter(environ)))
            self.exporting.append(f"metrics to {_endpoint(environ, 'METRICS')}")
        self.meter_provider = MeterProvider(metric_readers=readers, resource=self.resource)
        self.meter = self.meter_provider.get_meter(SCOPE, _version())

        if span_exporter is None and not self.disabled and _endpoint(environ, "TRACES"):
            if _exporter_wanted(environ, "OTEL_TRACES_EXPORTER"):
                span_exporter = _otlp_span_exporter(environ)
                self.exporting.append(f"traces to {_endpoint(environ, 'TRACES')}")
        self.tracer_provider = None
        self.tracer = trace.NoOpTracer()
        if span_exporter is not None and not self.disabled:
            from opentelemetry.sdk.trace import TracerProvider
            from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor

            # sampler=None: the SDK reads OTEL_TRACES_SAMPLER / OTEL_TRACES_SAMPLER_ARG.
            self.tracer_provider = TracerProvider(resource=self.resource)
            processor = SimpleSpanProcessor if simple_spans else BatchSpanProcessor
            self.tracer_provider.add_span_processor(processor(span_exporter))
            self.tracer = self.tracer_provider.get_tracer(SCOPE, _version())
        self._create_instruments()

    @property
    def tracing(self):
        return self.tracer_provider is not None

    def _create_instruments(self):
        meter = self.meter
        self.fanout_duration = meter.create_histogram(
            FANOUT_DURATION,
            unit="s",
            description="From a bus message's receipt to its last write to a device (sampled; see the docs).",
            explicit_bucket_boundaries_advisory=FANOUT_BUCKETS,
        )
        self.connection_duration = meter.create_histogram(
            CONNECTION_DURATION,
            unit="s",
            description="How long device connections lasted.",
            explicit_bucket_boundaries_advisory=CONNECTION_BUCKETS,
        )
        self.rpc_duration = meter.create_histogram(
            RPC_CLIENT_CALL_DURATION,
            unit="s",
            description="Calls to the core chat service, by method and gRPC status.",
            explicit_bucket_boundaries_advisory=RPC_BUCKETS,
        )
        meter.create_observable_up_down_counter(
            ACTIVE_CONNECTIONS,
            [_observe(_active, TRANSPORT)],
            unit="{connection}",
            description="Device connections open now, by transport.",
        )
        meter.create_observable_counter(
            RECEIVED_MESSAGES,
            [_observe(_received, MESSAGE_KIND)],
            unit="{message}",
            description="Messages received from devices, by kind (command kind, ack, auth, empty).",
        )
        meter.create_observable_counter(
            SENT_MESSAGES,
            [_observe(_sent, MESSAGE_KIND)],
            unit="{message}",
            description="Messages sent to devices, by kind (ServerEvent payload).",
        )
        meter.create_observable_counter(
            CONNECTION_CLOSES,
            [_observe_pairs(_closes, TRANSPORT, CLOSE_CODE)],
            unit="{connection}",
            description="Connections the gateway closed, by transport and close code (4429 slow consumer, 1008 policy...).",
        )
        meter.create_observable_counter(
            FANOUT_DROPPED,
            [_observe(_dropped, MESSAGE_KIND)],
            unit="{message}",
            description="Deliveries dropped because the fan-out backlog was over its bound (chatgateway.sessions.fanout.MAX_BACKLOG).",
        )
        meter.create_observable_counter(
            RATE_LIMITED,
            [lambda options: [Observation(_rate_limited[0])]],
            unit="{command}",
            description="Commands refused by the per-connection rate limit (MAX_EVENTS_PER_SECOND).",
        )
        meter.create_observable_counter(
            DEPENDENCY_ERRORS,
            [_observe_pairs(_dependency_errors, DEPENDENCY, ERROR_TYPE)],
            unit="{error}",
            description="Failed operations on Redis and transport failures of the core.",
        )
        meter.create_observable_gauge(
            BREAKER_STATE,
            [_observe_breaker],
            unit="1",
            description="State of the circuit breaker of the calls to the core: 1 for the current state.",
        )
        meter.create_observable_up_down_counter(
            CORE_CALLS_IN_FLIGHT,
            [_observe_in_flight],
            unit="{call}",
            description="Calls to the core in flight (running or waiting for a thread).",
        )

    def shutdown(self, timeout=FLUSH_TIMEOUT_SEC):
        """Flush and stop the providers (blocking: OTLP exports what is left, within ``timeout``)."""
        millis = int(timeout * 1000)
        if self.tracer_provider is not None:
            self.tracer_provider.force_flush(millis)
            self.tracer_provider.shutdown()
        self.meter_provider.shutdown(timeout_millis=millis)


def _observe(counts, key):
    def callback(options):
        return [Observation(value, _attributes(key, name or "other")) for name, value in counts.copy().items()]

    return callback


def _observe_pairs(counts, first, second):
    def callback(options):
        return [Observation(value, {first: a, second: b}) for (a, b), value in counts.copy().items()]

    return callback


def _observe_breaker(options):
    core = _observed.get("core")
    breaker = getattr(core, "breaker", None)
    if breaker is None:
        return []
    state = breaker.state
    return [Observation(1 if name == state else 0, _attributes(STATE, name)) for name in BREAKER_STATES]


def _observe_in_flight(options):
    core = _observed.get("core")
    return [] if core is None else [Observation(core.in_flight)]


def _version():
    try:
        from importlib.metadata import version

        return version("chatgateway")
    except Exception:  # noqa: BLE001 - not installed (a checkout on sys.path)
        return "0"


def configure(gateway_id="", environ=None, **kwargs):
    """Build this process's Telemetry (replacing one built before) and record through it."""
    global _current, _instruments
    if _current is not None:
        _current.shutdown()
    _current = Telemetry(gateway_id, environ, **kwargs)
    _instruments = _current if not _current.disabled else _NoInstruments()
    return _current


def reset():
    """Back to the unconfigured state (tests)."""
    global _current, _instruments
    if _current is not None:
        _current.shutdown()
    _current = None
    _instruments = _NoInstruments()
    _observed.clear()
    _connections.clear()


def current():
    return _current


# ---------------------------------------------------------------- twistd: service and /metrics


class TelemetryService(service.Service):
    """Configures telemetry when built; flushes it when it stops.

    Added first to the service tree, it stops after the others (the gateway's drain
    included), so the spans of connections closed by the drain are exported too; the
    flush runs in a thread, bounded by FLUSH_TIMEOUT_SEC.
    """

    name = "telemetry"

    def __init__(self, config, reactor, environ=None):
        self._reactor = reactor
        self.telemetry = configure(config.gateway_id, environ)

    def startService(self):
        super().startService()
        if self.telemetry.exporting:
            log.info("OpenTelemetry: exporting {what} over OTLP", what=" and ".join(self.telemetry.exporting))

    def stopService(self):
        super().stopService()
        return threads.deferToThreadPool(self._reactor, self._reactor.getThreadPool(), self._flush)

    def _flush(self):
        try:
            self.telemetry.shutdown()
        except Exception as e:  # noqa: BLE001 - never let telemetry fail a shutdown
            log.warn("OpenTelemetry shutdown failed: {error}", error=e)


class MetricsResource(resource.Resource):
    """``GET /metrics``: the Prometheus text format (OpenMetrics when asked for).

    Rendered on the reactor thread, where the observed counts live (prometheus_client's
    own Twisted resource renders in a thread pool).
    """

    isLeaf = True

    def render_GET(self, request):
        from prometheus_client import exposition

        if _current is None:
            request.setResponseCode(503)
            request.setHeader(b"content-type", b"application/json")
            return json.dumps({"error": "telemetry is not configured"}).encode("utf-8")
        accept = request.getHeader(b"accept")
        encoder, content_type = exposition.choose_encoder(accept.decode("latin-1") if accept else None)
        body = encoder(_current.registry)
        request.setHeader(b"content-type", content_type.encode("ascii"))
        request.setHeader(b"cache-control", b"no-store")
        return body
