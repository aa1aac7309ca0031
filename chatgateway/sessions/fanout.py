"""Delivery of bus messages to the local sessions they concern.

Each event is parsed once and encoded at most once per subprotocol
(EncodedEvent caches the frames). At most CHUNK deliveries run before the
fan-out yields to the reactor (so Twisted reads and flushes sockets between
chunks): a fan-out larger than that, or one arriving after the budget is
spent, waits in a queue, and the queue is worked off CHUNK deliveries per
reactor turn in arrival order, so no recipient sees events reordered.
Consecutive queued events with the same recipients (a room's burst) wait as
one entry, up to MERGE_MAX, and each recipient is given all of them in turn:
with the Cork (sessions.corking) they reach it in one write instead of one
write per event, each in a different turn.

The queue is bounded (docs/operations.md#overload): when more than
``max_backlog`` deliveries are owed, the oldest queued room events are
dropped whole (never the one being delivered). The recipients of a room event
with a position catch up from the room's stream (sessions.catchup, paced);
those of one without a position (a core that does not follow the publish
contract) are told once per LOSS_NOTICE_INTERVAL_SEC, by a DATA_LOSS error
queued where the events were, that events were missed. Profile events (membership changes)
are never dropped, and their membership effect is applied on receipt in any
case.
"""

import collections
import uuid
from contextlib import nullcontext

import grpc
from twisted.logger import Logger

from chatgateway.api import chat_pb2 as pb
from chatgateway.api import codec
from chatgateway.sessions import calls
from chatgateway.sessions.outbox import ROOM, TYPING, classify
from chatgateway.sessions.session import error_detail

# Deliveries made before yielding to the reactor.
CHUNK = 500
# Queued events with the same recipients given to each recipient together, at most: the first
# of them reaches the last recipient when the last does (docs/performance.md#corked-writes).
MERGE_MAX = 8
# Deliveries owed (recipients not yet served, over every queued event) beyond which
# the oldest room events are dropped: about 2 s of work at ~40,000 deliveries/s.
MAX_BACKLOG = 80_000
# A device that lost events is told so at most once in this many seconds.
LOSS_NOTICE_INTERVAL_SEC = 5.0
# Drops are logged at most this often (the chatgateway.fanout.dropped metric counts each).
DROP_WARNING_INTERVAL_SEC = 5.0
LOSS_MESSAGE = "the gateway fell behind: events may have been missed"


class EncodedEvent:
    """One ServerEvent and its frames, encoded on first use per format."""

    __slots__ = ("event", "payload", "position", "_frames", "_policy")

    def __init__(self, event, payload=None, position=None):
        self.event = event
        self.payload = payload
        # (room id, epoch, offset) of a room event with a position, else None: what a
        # Session checks to deliver each room's events once and in order (sessions.catchup).
        self.position = position
        self._frames = {}
        self._policy = None

    @property
    def policy(self):
        """(kind, key) of chatgateway.sessions.outbox: how the event waits for a slow recipient."""
        if self._policy is None:
            policy = classify(self.event)
            # A room event waits keyed by its position (so a connection that closes with it
            # unsent can say which events its device never got: Outbox.close).
            self._policy = (ROOM, self.position) if policy[0] == ROOM and self.position else policy
        return self._policy

    def frame(self, key, encode):
        """The cached frame for ``key``, made by ``encode(self)`` the first time."""
        frame = self._frames.get(key)
        if frame is None:
            frame = self._frames[key] = encode(self)
        return frame


class _Queued:
    """Events waiting for (some of) their recipients, the same for each: given in order, per recipient."""

    __slots__ = ("events", "recipients", "served", "starts", "droppable", "notice")

    def __init__(self, encoded, recipients, started, droppable=False, notice=False):
        self.events = [encoded]
        self.recipients = recipients
        self.served = 0  # recipients[:served] have them
        self.starts = [started]  # when each event arrived
        self.droppable = droppable
        self.notice = notice


class Fanout:
    log = Logger()

    def __init__(self, registry, on_membership, reactor, counts, max_backlog=MAX_BACKLOG, corked=nullcontext):
        self._registry = registry
        self._corked = corked  # a chunk's frames for one device leave in one write (sessions.corking)
        self._on_membership = on_membership
        self._reactor = reactor
        self._counts = counts  # a GatewayCounts: deliveries are counted per event, not per recipient
        self.max_backlog = max_backlog
        self._queue = collections.deque()  # of _Queued, oldest first
        self._backlog = 0  # deliveries of events owed by the queue (DATA_LOSS notices aside)
        self._spent = 0  # deliveries made since the pump last ran
        self._pumping = None
        self._noticed = set()  # sessions told of a loss in the current notice window
        self._notice_window = float("-inf")
        self._warned_at = None
        self._unreported = [0, 0, 0]  # events, deliveries dropped and devices told since the last warning
        self.observe = None  # observe(room_id, encoded): every positioned room event received
        self.on_shed = None  # on_shed(position, recipients): a positioned event shed (they catch up)

    @property
    def backlog(self):
        """Deliveries owed by the queue."""
        return self._backlog

    def receive(self, channel, payload):
        """Bus receiver: deliver one serialized ServerEvent."""
        started = self._counts.clock()
        event = codec.parse_server_event(payload)
        if event is None:
            self.log.warn("dropped an unparsable event on {channel}", channel=channel)
            return
        self.receive_event(channel, event, payload, started)

    def receive_event(self, channel, event, payload, started=None):
        """Deliver ``event`` (parsed from ``payload``) received on ``channel``."""
        if started is None:
            started = self._counts.clock()
        kind, _, key = channel.partition(":")[2].partition(":")
        if kind == "room":
            recipients = self._registry.room_sessions(key)
            if event.HasField("typing_event"):
                sender = event.typing_event.profile_id
                recipients = [s for s in recipients if s.profile_id != sender]
            elif event.HasField("presence_event"):
                subject = event.presence_event.profile_id
                recipients = [s for s in recipients if s.profile_id != subject]
        elif kind == "profile":
            # Applied now, whatever becomes of the delivery: it changes what this gateway routes.
            if event.HasField("subscription_event"):
                self._on_membership(event.subscription_event, event)
            recipients = self._registry.profile_sessions(key)
            if event.HasField("call_signal_event"):
                recipients = calls.recipients(event.call_signal_event, recipients)
        else:
            return
        if kind == "room" and event.offset:
            encoded = EncodedEvent(event, payload, (key, event.epoch, event.offset))
            if self.observe is not None:
                self.observe(key, encoded)  # the catch-up window of the room (sessions.streamreads)
        else:
            encoded = EncodedEvent(event, payload)
        if recipients:
            self.deliver(encoded, recipients, started, droppable=kind == "room")

    def deliver(self, encoded, recipients, started=None, droppable=False):
        """Deliver ``encoded`` to ``recipients`` now, or queue it behind earlier events.

        A ``droppable`` event may be shed (with a DATA_LOSS notice) while the backlog is over the bound.
        """
        count = len(recipients)
        queue = self._queue
        if not queue and self._spent + count <= CHUNK:
            self._spent += count
            for session in tuple(recipients):
                session.deliver(encoded)
            self._counts.fanned_out(encoded.event, count, started)
            return
        recipients = list(recipients)
        tail = queue[-1] if queue else None
        if (
            tail is not None
            and not tail.served
            and not tail.notice
            and tail.droppable == droppable
            and len(tail.events) < MERGE_MAX
            and tail.recipients == recipients
        ):
            tail.events.append(encoded)
            tail.starts.append(started)
        else:
            queue.append(_Queued(encoded, recipients, started, droppable))
        self._backlog += count
        if self._backlog > self.max_backlog:
            self._shed()
        if self._pumping is None:
            self._pumping = self._reactor.callLater(0, self._corked_pump)

    def _corked_pump(self):
        with self._corked():
            self._pump()

    def _pump(self):
        self._pumping = None
        self._spent = 0
        budget = CHUNK
        queue = self._queue
        while queue and budget > 0:
            item = queue[0]
            events, recipients, start = item.events, item.recipients, item.served
            width = len(events)
            end = min(len(recipients), start + max(1, budget // width))
            if width == 1:
                encoded = events[0]
                for session in recipients[start:end]:
                    session.deliver(encoded)
            else:
                for session in recipients[start:end]:
                    for encoded in events:
                        session.deliver(encoded)
            spent = (end - start) * width
            budget -= spent
            if not item.notice:
                self._backlog -= spent
            if end == len(recipients):
                queue.popleft()
                chunked = len(recipients) > CHUNK
                for encoded, started in zip(events, item.starts, strict=True):
                    self._counts.fanned_out(encoded.event, len(recipients), started, chunked=chunked)
            else:
                item.served = end
        if queue:
            self._pumping = self._reactor.callLater(0, self._corked_pump)
        elif self._noticed and self._reactor.seconds() - self._notice_window >= LOSS_NOTICE_INTERVAL_SEC:
            self._noticed = set()  # the window is over: let closed sessions go

    # ------------------------------------------------------------ overload

    def _shed(self):
        """Drop the oldest droppable events until the backlog is within the bound.

        Never the event being delivered (its order must hold for those still
        waiting), nor the newest (a single fan-out larger than the bound still
        goes out). The recipients of a room event with a position catch up from
        the room's stream (``on_shed``: sessions.catchup); those of an event
        without one get a DATA_LOSS notice in its place.
        """
        queue = self._queue
        lost = []
        shed = []  # (position of the first shed event, its recipients) per room and recipients
        events = deliveries = 0
        gap = None  # where the first dropped event was: the notice goes there
        at = 0
        while self._backlog > self.max_backlog:
            at = self._oldest_droppable(at)
            if at is None:
                break
            item = queue[at]
            encoded = item.events.pop(0)  # the oldest of the entry's events
            item.starts.pop(0)
            if not item.events:
                del queue[at]
            count = len(item.recipients)
            self._backlog -= count
            events += 1
            deliveries += count
            self._counts.fanout_dropped(encoded.event, count)
            if encoded.position is not None and self.on_shed is not None:
                # A room event with a position: its recipients catch up from the room's stream.
                if not shed or shed[-1][1] is not item.recipients or shed[-1][0][0] != encoded.position[0]:
                    shed.append((encoded.position, item.recipients))
            elif encoded.policy[0] != TYPING and (not lost or lost[-1] is not item.recipients):
                lost.append(item.recipients)  # typing is ephemeral: nothing to catch up on
                if gap is None:
                    gap = at
        if not events:
            return
        for position, recipients in shed:
            self.on_shed(position, recipients)
        told = self._notify([session for recipients in lost for session in recipients], gap) if lost else 0
        self._warn(events, deliveries, told)

    def _oldest_droppable(self, start):
        """Index of the entry of the oldest droppable queued event from ``start``, the newest
        event excepted; or None."""
        queue = self._queue
        last = len(queue) - 1
        for i in range(start, len(queue)):
            item = queue[i]
            if item.droppable and not item.served and (i < last or len(item.events) > 1):
                return i
        return None

    def _notify(self, lost, gap):
        """Queue a DATA_LOSS notice at ``gap`` for the sessions in ``lost`` not told lately; how many."""
        now = self._reactor.seconds()
        if now - self._notice_window >= LOSS_NOTICE_INTERVAL_SEC:
            self._notice_window = now
            self._noticed = set()
        noticed = self._noticed
        fresh = []
        for session in lost:
            if session not in noticed:
                noticed.add(session)
                fresh.append(session)
        if not fresh:
            return 0
        # Notices are not counted in the backlog: at most one per session per window, they
        # are bounded by the number of local sessions, and replace the deliveries dropped.
        queue = self._queue
        before = queue[gap - 1] if gap > 0 else None
        if before is not None and before.notice:
            before.recipients.extend(fresh)  # the same gap, grown
        else:
            event = pb.ServerEvent(id=uuid.uuid4().hex, error=error_detail(grpc.StatusCode.DATA_LOSS, LOSS_MESSAGE))
            queue.insert(gap, _Queued(EncodedEvent(codec.stamp(event, now)), fresh, None, notice=True))
        return len(fresh)

    def _warn(self, events, deliveries, told):
        unreported = self._unreported
        unreported[0] += events
        unreported[1] += deliveries
        unreported[2] += told
        now = self._reactor.seconds()
        if self._warned_at is not None and now - self._warned_at < DROP_WARNING_INTERVAL_SEC:
            return
        self.log.warn(
            "fan-out overloaded (more than {limit} deliveries waiting): dropped {events} events "
            "({deliveries} deliveries); {told} devices told events were missed",
            limit=self.max_backlog,
            events=unreported[0],
            deliveries=unreported[1],
            told=unreported[2],
        )
        self._warned_at = now
        self._unreported = [0, 0, 0]

    def stop(self):
        if self._pumping is not None and self._pumping.active():
            self._pumping.cancel()
        self._pumping = None
        self._queue.clear()
        self._backlog = self._spent = 0
        self._noticed = set()
