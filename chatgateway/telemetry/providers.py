"""The OpenTelemetry SDK of a process: its providers, exporters and the OTEL_* environment.

``Telemetry`` builds a meter provider (a Prometheus reader always, for /metrics; an
OTLP one when configured) and, with a trace exporter, a tracer provider.
``TelemetryService`` flushes them when the service tree stops.

OTLP (metrics and traces) is used when the standard ``OTEL_EXPORTER_OTLP_ENDPOINT``
(or a per-signal ``OTEL_EXPORTER_OTLP_{TRACES,METRICS}_ENDPOINT``) is set, over
``OTEL_EXPORTER_OTLP_PROTOCOL`` (``http/protobuf``, the default, or ``grpc``); the
exporters read their other OTEL_EXPORTER_OTLP_* variables themselves. Spans are
sampled per ``OTEL_TRACES_SAMPLER``/``OTEL_TRACES_SAMPLER_ARG`` (the SDK's default:
parentbased_always_on). With ``OTEL_SDK_DISABLED=true`` every count is still kept,
but nothing is exported, timed or traced.

The SDK is imported when a Telemetry is built, not with this module.
"""

import os

from opentelemetry import trace
from twisted.application import service
from twisted.internet import threads
from twisted.logger import Logger

from chatgateway.telemetry import instruments
from chatgateway.telemetry.names import SCOPE

# The longest a stop waits for OTLP to take the last spans and metrics.
FLUSH_TIMEOUT_SEC = 3.0

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
    """The meter provider (Prometheus reader, OTLP reader) and the tracer provider of a process.

    ``instruments`` are what GatewayCounts records into (nothing while disabled);
    ``observe(counts)`` and ``observe_core(core)`` add the observable instruments;
    ``registry`` is what /metrics renders.
    """

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
        if self.disabled:
            self.instruments = instruments.Instruments.unconfigured()
        else:
            self.instruments = instruments.Instruments(self.meter, self.tracer if self.tracing else None)

    @property
    def tracing(self):
        return self.tracer_provider is not None

    def observe(self, counts):
        """Report the GatewayCounts ``counts`` from now on (once per Telemetry)."""
        instruments.observe_counts(self.meter, counts)

    def observe_core(self, core):
        """Report the core client's breaker state and calls in flight from now on (once per Telemetry)."""
        instruments.observe_core(self.meter, core)

    def shutdown(self, timeout=FLUSH_TIMEOUT_SEC):
        """Flush and stop the providers (blocking: OTLP exports what is left, within ``timeout``)."""
        millis = int(timeout * 1000)
        if self.tracer_provider is not None:
            self.tracer_provider.force_flush(millis)
            self.tracer_provider.shutdown()
        self.meter_provider.shutdown(timeout_millis=millis)


def _version():
    try:
        from importlib.metadata import version

        return version("chatgateway")
    except Exception:  # noqa: BLE001 - not installed (a checkout on sys.path)
        return "0"


class TelemetryService(service.Service):
    """Logs what a Telemetry exports when it starts; flushes it when it stops.

    Added first to the service tree, it stops after the others (the gateway's drain
    included), so the spans of connections closed by the drain are exported too; the
    flush runs in a thread, bounded by FLUSH_TIMEOUT_SEC.
    """

    log = Logger(namespace="chatgateway.telemetry")

    def __init__(self, telemetry, reactor):
        self.setName("telemetry")
        self._reactor = reactor
        self.telemetry = telemetry

    def startService(self):
        super().startService()
        if self.telemetry.exporting:
            self.log.info("OpenTelemetry: exporting {what} over OTLP", what=" and ".join(self.telemetry.exporting))

    def stopService(self):
        super().stopService()
        return threads.deferToThreadPool(self._reactor, self._reactor.getThreadPool(), self._flush)

    def _flush(self):
        try:
            self.telemetry.shutdown()
        except Exception as e:  # noqa: BLE001 - never let telemetry fail a shutdown
            self.log.warn("OpenTelemetry shutdown failed: {error}", error=e)
