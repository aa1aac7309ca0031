"""Delivery of bus messages to the local sessions they concern.

Each event is parsed once and encoded at most once per subprotocol
(EncodedEvent caches the frames). A fan-out larger than CHUNK recipients is
spread over reactor turns so a huge room cannot stall other connections;
events queue behind it in arrival order, so no recipient sees them reordered.
"""

import collections

from google.protobuf.message import DecodeError
from twisted.logger import Logger

from chatgateway import telemetry
from chatgateway.api import chat_pb2 as pb
from chatgateway.outbox import classify

CHUNK = 500


class EncodedEvent:
    """One ServerEvent and its frames, encoded on first use per format."""

    __slots__ = ("event", "payload", "_frames", "_policy")

    def __init__(self, event, payload=None):
        self.event = event
        self.payload = payload
        self._frames = {}
        self._policy = None

    @property
    def policy(self):
        """(kind, key) of chatgateway.outbox: how the event waits for a slow recipient."""
        if self._policy is None:
            self._policy = classify(self.event)
        return self._policy

    def frame(self, key, encode):
        """The cached frame for ``key``, made by ``encode(self)`` the first time."""
        frame = self._frames.get(key)
        if frame is None:
            frame = self._frames[key] = encode(self)
        return frame


class Fanout:
    log = Logger()

    def __init__(self, registry, on_membership, reactor):
        self._registry = registry
        self._on_membership = on_membership
        self._reactor = reactor
        self._queue = collections.deque()  # [EncodedEvent, [sessions], next index]
        self._pumping = None

    def receive(self, channel, payload):
        """Bus receiver: deliver one serialized ServerEvent."""
        started = telemetry.clock()
        event = pb.ServerEvent()
        try:
            event.ParseFromString(payload)
        except DecodeError:
            self.log.warn("dropped an unparsable event on {channel}", channel=channel)
            return
        kind, _, key = channel.partition(":")[2].partition(":")
        if kind == "room":
            recipients = self._registry.room_sessions(key)
            if event.HasField("typing_event"):
                sender = event.typing_event.profile_id
                recipients = [s for s in recipients if s.profile_id != sender]
        elif kind == "profile":
            if event.HasField("subscription_event"):
                self._on_membership(event.subscription_event)
            recipients = self._registry.profile_sessions(key)
        else:
            return
        if recipients:
            self.deliver(EncodedEvent(event, payload), recipients, started)

    def deliver(self, encoded, recipients, started=None):
        if not self._queue and len(recipients) <= CHUNK:
            for session in tuple(recipients):
                session.deliver(encoded)
            telemetry.fanned_out(encoded.event, len(recipients), started)
            return
        self._queue.append([encoded, list(recipients), 0, started])
        if self._pumping is None:
            self._pumping = self._reactor.callLater(0, self._pump)

    def _pump(self):
        self._pumping = None
        budget = CHUNK
        while self._queue and budget > 0:
            item = self._queue[0]
            encoded, recipients, start, started = item
            end = min(len(recipients), start + budget)
            for session in recipients[start:end]:
                session.deliver(encoded)
            budget -= end - start
            if end == len(recipients):
                self._queue.popleft()
                telemetry.fanned_out(encoded.event, len(recipients), started, chunked=True)
            else:
                item[2] = end
        if self._queue:
            self._pumping = self._reactor.callLater(0, self._pump)

    def stop(self):
        if self._pumping is not None and self._pumping.active():
            self._pumping.cancel()
        self._pumping = None
        self._queue.clear()
