"""The gateway's telemetry: what it counts, measures and traces, and where that goes.

- ``counts``: ``GatewayCounts``, the counts kept where things happen (messages received
  and sent, fan-outs, closes, rate limiting, dependency errors, open connections). The
  service tree builds one and passes it to the Gateway (and through it to the Sessions,
  the Fanout and the edges), the Redis connections and the instrumented core.
- ``connections``: the duration and the span of each device connection.
- ``corecalls``: ``InstrumentedCore``, a span and rpc.client.call.duration per call to the core.
- ``instruments``: the histograms and the tracer recorded into, and the observable
  instruments that read a GatewayCounts and the core client when metrics are collected.
- ``names``: metric names and attribute keys.
- ``providers``: ``Telemetry``, the SDK's meter and tracer providers, the OTLP exporters
  and the OTEL_* environment; ``TelemetryService`` flushes them at stop.
- ``exposition``: ``MetricsResource``, /metrics in the Prometheus text format.
- ``logs``: log levels, formats and redaction; ``readiness``: the dependency states of
  /readyz and grpc.health.v1.

Nothing is imported here, so using one module does not import the others (readiness
does not import OpenTelemetry).
"""
