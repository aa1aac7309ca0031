"""How long each device connection lasts, and its span (kind SERVER, ``chatgateway.connection``).

The span is made when the connection ends, back-dated to its start, and parented by a
``traceparent`` header of the WebSocket handshake: an SDK span held open would cost
~2 KiB per idle connection. Without a trace exporter no span is made.
"""

from opentelemetry.trace import SpanKind
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from chatgateway.telemetry.names import TRANSPORT

_propagator = TraceContextTextMapPropagator()


class ConnectionSpans:
    """The start of every open session; its duration (and span, while tracing) when it ends."""

    def __init__(self, instruments, clock, wall_clock_ns):
        self._instruments = instruments
        self._clock = clock  # the latency clock (seconds)
        self._wall_clock_ns = wall_clock_ns  # for the span's start time (nanoseconds since the epoch)
        # session id -> clock() when it opened; while tracing, (clock(), wall-clock ns, the
        # handshake's traceparent/tracestate or None, room count).
        self._started = {}
        self._attributes = {}  # transport name -> {TRANSPORT: name}, made once per transport

    def opened(self, session):
        """A device's session is registered."""
        started = self._clock()
        if self._instruments.tracing:
            headers = getattr(session.transport, "http_headers", None) or {}
            carrier = None
            if "traceparent" in headers:
                carrier = {name: headers[name] for name in ("traceparent", "tracestate") if name in headers}
            self._started[session.id] = (started, self._wall_clock_ns(), carrier, len(session.rooms))
        else:
            self._started[session.id] = started

    def closed(self, session, transport):
        """A device's session is gone; False if it was not known to be open."""
        entry = self._started.pop(session.id, None)
        if entry is None:
            return False
        traced = type(entry) is tuple
        started = entry[0] if traced else entry
        attributes = self._attributes.get(transport)
        if attributes is None:
            attributes = self._attributes[transport] = {TRANSPORT: transport}
        self._instruments.connection_duration.record(self._clock() - started, attributes)
        if traced and self._instruments.tracing:
            _, start_ns, carrier, room_count = entry
            span = self._instruments.tracer.start_span(
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
        return True
