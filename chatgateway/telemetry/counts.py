"""What the gateway counts where things happen: ``GatewayCounts``.

The service tree builds one and hands it to what records into it (the Gateway and,
through it, every Session, the Fanout and the edges; the Redis connections; the
instrumented core); ``Telemetry.observe`` makes the observable instruments read it.

Cost. A synchronous SDK measurement costs about 8 us on the development machine
(attribute hashing, locks), more than delivering an event to a WebSocket. So counts
are kept as plain integers on the reactor thread where they happen (one dict
update) and handed to the SDK by observable instruments when metrics are
collected; synchronous SDK calls happen once per connection or per call to the
core, never per delivered event. The fan-out latency histogram is recorded for one
fan-out in ``fanout_sample_every`` (and for every chunked one): see ``fanned_out``.
``bench/telemetry_overhead.py`` measures what is left.
"""

import collections
import time

from chatgateway.api import chat_pb2 as pb
from chatgateway.telemetry.connections import ConnectionSpans
from chatgateway.telemetry.instruments import Instruments

# The ``transport_name`` of the session transports of chatgateway.edge: their series exist from the start.
TRANSPORTS = ("websocket", "grpc")
# How a connect's membership cache lookup ended: the rooms were cached, were not (the core
# was asked), or the cache could not be read (the core was asked).
MEMBERSHIP_LOOKUP_RESULTS = ("hit", "miss", "error")
# Where catch-up (chatgateway.sessions.catchup) read the events it delivered: the room's
# stream (one read of up to READ_CHUNK entries) or the core's history (one GetHistory page).
CATCHUP_SOURCES = ("stream", "core")
# The shared limits (chatgateway.sessions.sharedlimits), the call signals a device may be
# relayed and the presence statuses announced: their series exist from the start.
LIMIT_KINDS = ("profile", "room")
SIGNAL_KINDS = ("offer", "answer", "ice", "end", "taken")
PRESENCE_STATUSES = ("online", "offline")
# How a session's open went for resuming (chatgateway.sessions.resume): it catches up in at
# least one room, it starts live everywhere, or the token it gave was ignored.
RESUME_RESULTS = ("resumed", "live", "token_ignored")
# One fan-out in this many is timed into the fan-out duration histogram (chunked ones always are).
FANOUT_SAMPLE_EVERY = 128


def transport_name(transport):
    """The ``transport_name`` a session transport (or its class) declares; "other" when it declares none."""
    return getattr(transport, "transport_name", "other")


def _kinds(*names):
    return {name: 0 for name in names}


class GatewayCounts:
    """The gateway's counts, and the synchronous measurements that go with them.

    ``instruments`` (chatgateway.telemetry.instruments) are the histograms and the
    tracer of the process's Telemetry; without them nothing but the counts is kept.
    ``clock`` is the latency clock: monotonic, independent of the reactor's (possibly
    fake) clock. The ``*_counts`` methods are the readings: copies, safe to take from
    the thread that collects metrics.
    """

    def __init__(
        self,
        instruments=None,
        clock=time.perf_counter,
        wall_clock_ns=time.time_ns,
        fanout_sample_every=FANOUT_SAMPLE_EVERY,
    ):
        self.instruments = instruments if instruments is not None else Instruments.unconfigured()
        self.clock = clock
        self.fanout_sample_every = fanout_sample_every
        self._connections = ConnectionSpans(self.instruments, clock, wall_clock_ns)
        # Pre-filled so every series exists from the start.
        self._received = _kinds(
            *(f.name for f in pb.ClientCommand.DESCRIPTOR.oneofs_by_name["command"].fields),
            "ack",
            "auth",
            "empty",
            "other",
        )
        # A defaultdict: a payload kind added to the proto later counts without a change here
        # (None, no payload, is reported as "other"); dict.copy() of it is atomic under the GIL.
        self._sent = collections.defaultdict(
            int, _kinds(*(f.name for f in pb.ServerEvent.DESCRIPTOR.oneofs_by_name["payload"].fields))
        )
        self._active = collections.defaultdict(int, _kinds(*TRANSPORTS, "other"))
        self._closes = collections.defaultdict(int)  # (transport, code) -> count; new keys are rare
        self._rate_limited = 0
        self._connects_refused = collections.defaultdict(int, _kinds(*TRANSPORTS))
        self._dependency_errors = collections.defaultdict(int)  # (dependency, error type) -> count
        self._fanouts = 0
        self._dropped = collections.defaultdict(int, _kinds("message"))  # payload kind -> deliveries shed
        self._lookups = _kinds(*MEMBERSHIP_LOOKUP_RESULTS)  # a connect's membership cache lookups, by result
        self._catchup_reads = _kinds(*CATCHUP_SOURCES)  # reads made for catch-up and gap fills, by source
        self._gaps = 0  # gap events sent to devices
        self._resumes = _kinds(*RESUME_RESULTS)  # sessions opened, by how their resume went
        self._behind = 0  # times a device fell behind (its outbox full of room events)
        self._limited = _kinds(*LIMIT_KINDS)  # commands refused by a shared limit, by kind
        self._unchecked = _kinds(*LIMIT_KINDS)  # shared limit checks let in because the store failed
        self._signals = _kinds(*SIGNAL_KINDS)  # call signals relayed, by kind
        self._presence = _kinds(*PRESENCE_STATUSES)  # presenceEvents published (one per room told)
        self.online_profiles = lambda: 0  # profiles online across gateways (set by the Gateway's Presence)

    # ------------------------------------------------------------ what happens (reactor thread)

    def received(self, request):
        """A StreamRequest from a device (Session.handle)."""
        kind = request.WhichOneof("payload")
        if kind == "command":
            kind = request.command.WhichOneof("command")
        elif kind is None:
            kind = "auth" if request.auth_token else "empty"
        if kind in self._received:
            self._received[kind] += 1
        else:
            self._received["other"] += 1

    def sent(self, event, count=1):
        """``count`` deliveries of a ServerEvent (Session.send: one; a fan-out: its recipients)."""
        self._sent[event.WhichOneof("payload")] += count

    def fanned_out(self, event, recipients, started, chunked=False):
        """A fan-out ended: ``recipients`` deliveries of ``event``, begun at ``started`` (``clock()``).

        Counted every time; timed for one in ``fanout_sample_every``, and for every
        chunked one (spread over reactor turns: the ones worth seeing). Sampling keeps
        the SDK's per-measurement cost off the per-event path; the histogram's
        quantiles stay right, its count is not the number of fan-outs (the sent
        messages count).
        """
        self._sent[event.WhichOneof("payload")] += recipients
        count = self._fanouts = self._fanouts + 1
        if (chunked or not count % self.fanout_sample_every) and started is not None:
            self.instruments.fanout_duration.record(self.clock() - started)

    def fanout_dropped(self, event, recipients):
        """An overloaded fan-out dropped ``event`` before delivering it to ``recipients`` devices."""
        self._dropped[event.WhichOneof("payload")] += recipients

    def connection_closing(self, transport, code):
        """The gateway closes a device's connection with ``code`` (a close code of docs/protocol.md)."""
        self._closes[(transport_name(transport), int(code))] += 1

    def rate_limited(self):
        """A command refused by the per-connection rate limit."""
        self._rate_limited += 1

    def connect_refused(self, transport):
        """A new connection of ``transport`` ("websocket", "grpc") refused by MAX_CONNECTS_PER_SECOND."""
        self._connects_refused[transport] += 1

    def dependency_error(self, dependency, error_type):
        """A failed operation on a dependency: "redis" or "core"; ``error_type`` is short and bounded."""
        self._dependency_errors[(dependency, str(error_type))] += 1

    def membership_lookup(self, result):
        """A connect looked its profile's rooms up in the membership cache: one of MEMBERSHIP_LOOKUP_RESULTS."""
        self._lookups[result] += 1

    def catchup_read(self, source):
        """One read for catch-up or a gap fill: "stream" (a READ_ROOM) or "core" (a GetHistory page)."""
        self._catchup_reads[source] += 1

    def resume_opened(self, result):
        """A session opened: one of RESUME_RESULTS."""
        self._resumes[result] += 1

    def gap_sent(self):
        """A device was sent a GapEvent: events of a room that neither the stream nor the core held."""
        self._gaps += 1

    def fell_behind(self):
        """A device's outbox was full: it is fed no room events until it drains (then catches up)."""
        self._behind += 1

    def limit_refused(self, kind):
        """A command refused by the shared limit ``kind`` ("profile", "room")."""
        self._limited[kind] += 1

    def limit_unchecked(self, kind):
        """A shared limit check of ``kind`` let in because the store could not answer (fail open)."""
        self._unchecked[kind] += 1

    def signal_relayed(self, kind):
        """A call signal of ``kind`` ("offer"... "taken") published to a profile's channel."""
        self._signals[kind] = self._signals.get(kind, 0) + 1

    def presence_announced(self, status, rooms):
        """A profile's presence ``status`` (a PresenceEvent.Status) published to ``rooms`` rooms."""
        name = pb.PresenceEvent.Status.Name(status).lower()
        self._presence[name] = self._presence.get(name, 0) + rooms

    def session_opened(self, session):
        """A device's session is registered (Gateway.open_session)."""
        self._active[transport_name(session.transport)] += 1
        self._connections.opened(session)

    def session_closed(self, session):
        """A device's session is gone (Gateway.session_closed)."""
        transport = transport_name(session.transport)
        if self._connections.closed(session, transport):
            self._active[transport] -= 1

    # ------------------------------------------------------------ readings (any thread)

    def received_counts(self):
        """{kind: messages received}: a command's kind, "ack", "auth", "empty" or "other"."""
        return self._received.copy()

    def sent_counts(self):
        """{ServerEvent payload kind (None: none): deliveries}."""
        return self._sent.copy()

    def active_counts(self):
        """{transport: sessions open now}."""
        return self._active.copy()

    def close_counts(self):
        """{(transport, close code): connections the gateway closed}."""
        return self._closes.copy()

    def dropped_counts(self):
        """{payload kind: deliveries an overloaded fan-out dropped}."""
        return self._dropped.copy()

    def connects_refused_counts(self):
        """{transport: new connections refused by the connection rate}."""
        return self._connects_refused.copy()

    def dependency_error_counts(self):
        """{(dependency, error type): failed operations}."""
        return self._dependency_errors.copy()

    def membership_lookup_counts(self):
        """{result: membership cache lookups}: "hit", "miss" or "error"."""
        return self._lookups.copy()

    def catchup_read_counts(self):
        """{source: reads}: "stream" (READ_ROOM calls) and "core" (GetHistory pages) made to fill gaps."""
        return self._catchup_reads.copy()

    def behind_count(self):
        """Times a device fell behind."""
        return self._behind

    def resume_counts(self):
        """{result: sessions opened}: "resumed", "live", "token_ignored"."""
        return self._resumes.copy()

    def gaps_sent_count(self):
        """GapEvents sent to devices."""
        return self._gaps

    def limit_refused_counts(self):
        """{kind: commands refused by the shared limit}: "profile", "room"."""
        return self._limited.copy()

    def limit_unchecked_counts(self):
        """{kind: shared limit checks let in unchecked}."""
        return self._unchecked.copy()

    def signal_counts(self):
        """{kind: call signals relayed}."""
        return self._signals.copy()

    def presence_counts(self):
        """{status: presenceEvents published}."""
        return self._presence.copy()

    def rate_limited_count(self):
        """Commands refused by the rate limit."""
        return self._rate_limited
