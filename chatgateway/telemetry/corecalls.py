"""Calls to the core, instrumented: a span and an rpc.client.call.duration measurement each.

The span is of kind CLIENT, named ``chat.v1.ChatService/<Method>``, parented by the
caller's W3C trace context when it sent one; its context goes to the core as
``traceparent``/``tracestate`` gRPC metadata. Without a trace exporter no span is
made and the caller's trace context is passed on unchanged.
"""

from opentelemetry import trace
from opentelemetry.trace import SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
from twisted.internet import defer
from twisted.python.failure import Failure
from zope.interface import implementer

from chatgateway.api import chat_pb2 as pb
from chatgateway.core import ICoreClient
from chatgateway.telemetry.names import ERROR_TYPE, RPC_METHOD, RPC_STATUS, RPC_SYSTEM

# From the API: chatgateway.core.client (and grpc with it) is not imported for one name.
SERVICE = pb.DESCRIPTOR.services_by_name["ChatService"].full_name
# Answers of the core that say it is not there (as chatgateway.core.client counts them).
CORE_TRANSPORT_FAILURES = ("UNAVAILABLE", "DEADLINE_EXCEEDED")

_propagator = TraceContextTextMapPropagator()


@implementer(ICoreClient)
class InstrumentedCore:
    """A CoreClient whose every call is a span and an rpc.client.call.duration measurement.

    Recorded into the instruments of the GatewayCounts ``counts``, which also counts the
    core's transport failures. Everything else is the wrapped client's (``breaker``,
    ``readiness``, ``start``...).
    """

    def __init__(self, core, counts):
        self._core = core
        self._counts = counts

    def __getattr__(self, name):
        return getattr(self._core, name)

    def call(self, method, request, token, device_id="", traceparent=None, tracestate=None, timeout=None):
        instruments = self._counts.instruments
        clock = self._counts.clock
        full_method = f"{SERVICE}/{method}"
        span = None
        options = {}
        if instruments.tracing:
            carrier = {"traceparent": traceparent, "tracestate": tracestate} if traceparent else {}
            parent = _propagator.extract({k: v for k, v in carrier.items() if v})
            span = instruments.tracer.start_span(
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
                    self._counts.dependency_error("core", status)
            instruments.rpc_duration.record(clock() - started, attributes)
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
