"""The instruments: histograms and a tracer to record into, and the observable ones that read counts.

``Instruments`` holds what is recorded synchronously (three histograms, the tracer);
``Instruments.unconfigured()`` records nothing, for a process or a test without
telemetry. ``observe_counts`` and ``observe_core`` create the observable instruments,
whose callbacks read a GatewayCounts and the core client when metrics are collected.
"""

from opentelemetry import trace
from opentelemetry.metrics import NoOpMeter, Observation

from chatgateway.telemetry.names import (
    ACTIVE_CONNECTIONS,
    BREAKER_STATE,
    CATCHUP_READS,
    CATCHUP_SOURCE,
    CLOSE_CODE,
    CONNECTION_CLOSES,
    CONNECTION_DURATION,
    CONNECTS_REFUSED,
    CORE_CALLS_IN_FLIGHT,
    DEPENDENCY,
    DEPENDENCY_ERRORS,
    ERROR_TYPE,
    FANOUT_DROPPED,
    FANOUT_DURATION,
    FELL_BEHIND,
    GAPS_SENT,
    LIMIT_KIND,
    LIMITED,
    LIMITS_UNCHECKED,
    LOOKUP_RESULT,
    MEMBERSHIP_LOOKUPS,
    MESSAGE_KIND,
    ONLINE_PROFILES,
    PRESENCE_EVENTS,
    PRESENCE_STATUS,
    RATE_LIMITED,
    RECEIVED_MESSAGES,
    RESUME_OPENS,
    RESUME_RESULT,
    RPC_CLIENT_CALL_DURATION,
    SCOPE,
    SENT_MESSAGES,
    SIGNAL_KIND,
    SIGNALS_RELAYED,
    STATE,
    TRANSPORT,
)

# Seconds; fan-out runs from microseconds (one device) to a second (a huge room, chunked).
FANOUT_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
CONNECTION_BUCKETS = (1, 5, 30, 60, 300, 900, 1800, 3600, 7200, 14400, 28800, 86400)
RPC_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0)
BREAKER_STATES = ("closed", "open", "half-open")


class Instruments:
    """The histograms of one meter, and the tracer spans are made with (``tracing``: a real one)."""

    def __init__(self, meter, tracer=None):
        self.tracing = tracer is not None
        self.tracer = tracer if tracer is not None else trace.NoOpTracer()
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

    @classmethod
    def unconfigured(cls):
        """Instruments that record nothing and trace nothing."""
        return cls(NoOpMeter(SCOPE))


def observe_counts(meter, counts):
    """Observable instruments on ``meter`` reading the GatewayCounts ``counts`` at each collection."""

    def rate_limited(options):
        return [Observation(counts.rate_limited_count())]

    for create, name, callback, unit, description in (
        (
            meter.create_observable_up_down_counter,
            ACTIVE_CONNECTIONS,
            _by_name(counts.active_counts, TRANSPORT),
            "{connection}",
            "Device connections open now, by transport.",
        ),
        (
            meter.create_observable_counter,
            RECEIVED_MESSAGES,
            _by_name(counts.received_counts, MESSAGE_KIND),
            "{message}",
            "Messages received from devices, by kind (command kind, ack, auth, empty).",
        ),
        (
            meter.create_observable_counter,
            SENT_MESSAGES,
            _by_name(counts.sent_counts, MESSAGE_KIND),
            "{message}",
            "Messages sent to devices, by kind (ServerEvent payload).",
        ),
        (
            meter.create_observable_counter,
            CONNECTION_CLOSES,
            _by_pair(counts.close_counts, TRANSPORT, CLOSE_CODE),
            "{connection}",
            "Connections the gateway closed, by transport and close code (4429 slow consumer, 1008 policy...).",
        ),
        (
            meter.create_observable_counter,
            FANOUT_DROPPED,
            _by_name(counts.dropped_counts, MESSAGE_KIND),
            "{message}",
            "Deliveries dropped because the fan-out backlog was over its bound (chatgateway.sessions.fanout.MAX_BACKLOG).",
        ),
        (
            meter.create_observable_counter,
            RATE_LIMITED,
            rate_limited,
            "{command}",
            "Commands refused by the per-connection rate limit (MAX_EVENTS_PER_SECOND).",
        ),
        (
            meter.create_observable_counter,
            MEMBERSHIP_LOOKUPS,
            _by_name(counts.membership_lookup_counts, LOOKUP_RESULT),
            "{lookup}",
            "Membership cache lookups of connects, by result (hit: no core call; miss, error: the core was asked).",
        ),
        (
            meter.create_observable_counter,
            CATCHUP_READS,
            _by_name(counts.catchup_read_counts, CATCHUP_SOURCE),
            "{read}",
            "Reads made to fill gaps and catch devices up, by source (stream: READ_ROOM; core: GetHistory pages).",
        ),
        (
            meter.create_observable_counter,
            RESUME_OPENS,
            _by_name(counts.resume_counts, RESUME_RESULT),
            "{session}",
            "Sessions opened, by how their resume went (resumed: catching up in a room; live; token_ignored).",
        ),
        (
            meter.create_observable_counter,
            GAPS_SENT,
            lambda options: [Observation(counts.gaps_sent_count())],
            "{event}",
            "Gap events sent to devices: events of a room neither its stream nor the core's history held.",
        ),
        (
            meter.create_observable_counter,
            LIMITED,
            _by_name(counts.limit_refused_counts, LIMIT_KIND),
            "{command}",
            "Commands refused by a limit shared across gateways, by kind (profile: PROFILE_EVENTS_PER_SECOND, room: ROOM_EVENTS_PER_SECOND).",
        ),
        (
            meter.create_observable_counter,
            LIMITS_UNCHECKED,
            _by_name(counts.limit_unchecked_counts, LIMIT_KIND),
            "{check}",
            "Shared limit checks let in unchecked because the store failed (fail open), by kind.",
        ),
        (
            meter.create_observable_counter,
            SIGNALS_RELAYED,
            _by_name(counts.signal_counts, SIGNAL_KIND),
            "{signal}",
            "Call signals published to callees' profile channels, by kind (taken: an answer told to the answerer's other devices).",
        ),
        (
            meter.create_observable_counter,
            PRESENCE_EVENTS,
            _by_name(counts.presence_counts, PRESENCE_STATUS),
            "{event}",
            "presenceEvents this gateway published (one per room told), by status.",
        ),
        (
            meter.create_observable_gauge,
            ONLINE_PROFILES,
            lambda options: [Observation(counts.online_profiles())],
            "{profile}",
            "Profiles online across every gateway (a lease live or in its grace), as this gateway's last sweep counted.",
        ),
        (
            meter.create_observable_counter,
            FELL_BEHIND,
            lambda options: [Observation(counts.behind_count())],
            "{device}",
            "Times a device's outbox was full of room events: fed none until it drained, then caught up.",
        ),
        (
            meter.create_observable_counter,
            CONNECTS_REFUSED,
            _by_name(counts.connects_refused_counts, TRANSPORT),
            "{connection}",
            "New connections refused by the per-process connection rate (MAX_CONNECTS_PER_SECOND), by transport.",
        ),
        (
            meter.create_observable_counter,
            DEPENDENCY_ERRORS,
            _by_pair(counts.dependency_error_counts, DEPENDENCY, ERROR_TYPE),
            "{error}",
            "Failed operations on Redis and transport failures of the core.",
        ),
    ):
        create(name, [callback], unit=unit, description=description)


def observe_core(meter, core):
    """Observable instruments on ``meter`` reading the core client's breaker state and calls in flight."""
    states = {name: {STATE: name} for name in BREAKER_STATES}

    def breaker_state(options):
        breaker = getattr(core, "breaker", None)
        if breaker is None:
            return []
        state = breaker.state
        return [Observation(1 if name == state else 0, attributes) for name, attributes in states.items()]

    meter.create_observable_gauge(
        BREAKER_STATE,
        [breaker_state],
        unit="1",
        description="State of the circuit breaker of the calls to the core: 1 for the current state.",
    )
    meter.create_observable_up_down_counter(
        CORE_CALLS_IN_FLIGHT,
        [lambda options: [Observation(core.in_flight)]],
        unit="{call}",
        description="Calls to the core in flight (running or waiting for a thread).",
    )


def _by_name(reading, key):
    """A callback observing each ``name: value`` of ``reading()`` with the attribute ``key: name``."""
    attributes = {}  # name -> {key: name}, made once per name

    def callback(options):
        observations = []
        for name, value in reading().items():
            name = name or "other"
            labels = attributes.get(name)
            if labels is None:
                labels = attributes[name] = {key: name}
            observations.append(Observation(value, labels))
        return observations

    return callback


def _by_pair(reading, first, second):
    """A callback observing each ``(a, b): value`` of ``reading()`` with the attributes ``first: a, second: b``."""

    def callback(options):
        return [Observation(value, {first: a, second: b}) for (a, b), value in reading().items()]

    return callback
