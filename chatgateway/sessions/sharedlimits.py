"""Limits per profile and per room, across gateways (docs/operations.md#limits-per-profile-and-per-room).

Besides the per-connection limit (MAX_EVENTS_PER_SECOND, in process): every command of a
profile, from any of its devices on any gateway, counts against PROFILE_EVENTS_PER_SECOND;
every event sent into a room (a message, typing, a read marker, a forwarded SendEvent),
from anyone anywhere, against ROOM_EVENTS_PER_SECOND. Each check is one GCRA script in the
store's Redis (chatgateway.store.gcra; a command's two limits in one script, counting
against both or neither), in process with CACHE_URI=memory://. A refusal is
RESOURCE_EXHAUSTED with ``retry_after_ms`` in the error's meta.

When the store cannot answer, the command is let in (fail open) and a warning is logged at
most every WARN_EVERY_SEC: a Redis outage must not stop the chat, and the per-connection
limit still holds.
"""

import math

import grpc
from twisted.internet import defer
from twisted.logger import Logger

from chatgateway.api import chat_pb2 as pb
from chatgateway.store.gcra import make_gcra

WARN_EVERY_SEC = 30.0
PROFILE = "profile"
ROOM = "room"
KINDS = (PROFILE, ROOM)


class LimitExceeded(Exception):
    """A shared limit refused a command: RESOURCE_EXHAUSTED with a retry hint."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED

    def __init__(self, kind, retry_after_sec):
        self.kind = kind
        self.retry_after_ms = max(1, math.ceil(retry_after_sec * 1000))
        self.message = f"{kind} rate limit exceeded; retry after {self.retry_after_ms} ms"
        self.meta = {"limit": kind, "retry_after_ms": str(self.retry_after_ms)}
        super().__init__(self.message)


def room_of(which, command):
    """The room a command sends an event into, or None."""
    if which in ("room_event", "typing", "read_marker"):
        return command.room_id or None
    if which == "call" and command.method == "SendEvent" and command.HasField("body"):
        request = pb.SendEventRequest()
        if command.body.Unpack(request):
            return request.event.room_id or None
    return None


class SharedLimits:
    log = Logger()

    def __init__(self, config, store, clock, counts):
        self._gcra = make_gcra(store, clock, config.cache_uri)
        self._clock = clock
        self._counts = counts
        self._rates = {
            PROFILE: (config.profile_events_per_second, config.profile_events_burst),
            ROOM: (config.room_events_per_second, config.room_events_burst),
        }
        self.enabled = any(rate > 0 for rate, _ in self._rates.values())
        self._warned_at = None
        self._unchecked = 0  # since the last warning

    def admit(self, profile_id, which, command):
        """Deferred firing (None) when the command may go on; fails with LimitExceeded."""
        if not self.enabled:
            return defer.succeed(None)
        checks = [(PROFILE, profile_id)]
        room_id = room_of(which, command)
        if room_id is not None:
            checks.append((ROOM, room_id))
        return self._check(checks)

    def admit_call(self, profile_id, method, request):
        """``admit`` for a forwarded call outside a stream (gRPC unary, Connect HTTP)."""
        if not self.enabled:
            return defer.succeed(None)
        checks = [(PROFILE, profile_id)]
        if method == "SendEvent" and request.event.room_id:
            checks.append((ROOM, request.event.room_id))
        return self._check(checks)

    def _check(self, checks):
        limits = [(kind, key, *self._rates[kind]) for kind, key in checks if self._rates[kind][0] > 0]
        if not limits:
            return defer.succeed(None)
        d = defer.maybeDeferred(self._gcra.check, limits)
        d.addCallbacks(self._decided, self._fail_open, errbackArgs=([kind for kind, *_ in limits],))
        return d

    def _decided(self, outcome):
        kind, wait = outcome
        if kind is not None:
            self._counts.limit_refused(kind)
            raise LimitExceeded(kind, wait)

    def _fail_open(self, failure, kinds):
        for kind in kinds:
            self._counts.limit_unchecked(kind)
        self._unchecked += 1
        now = self._clock.seconds()
        if self._warned_at is None or now - self._warned_at >= WARN_EVERY_SEC:
            self.log.warn(
                "shared rate limits not checked ({count} checks let in): the store failed: {error}",
                count=self._unchecked,
                error=failure.getErrorMessage(),
            )
            self._warned_at = now
            self._unchecked = 0
        return None
