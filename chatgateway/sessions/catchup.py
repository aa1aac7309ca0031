"""Catch-up: one session given every event of a room after a position, then live again.

docs/architecture.md#catch-up. A session catches up in a room when a device resumes
from a position (``Session.catch_up``), when it sees an offset gap in its own live
delivery (events shed under overload, a gateway-level fill that ran ahead of it),
and when it drained after falling behind (its outbox was full: sessions.behind).

The seam is exact: while a room catches up, its live events for this
session are held (at most HELD_MAX, the oldest dropped: the stream has them), and the
session is given, in order, the events after its position from the room's stream
(shared with every session of the gateway: sessions.streamreads), what the stream no
longer holds from the core's history, and for what neither holds a GapEvent naming
the room, the epoch and the first and last offsets missing. Then the held events are
merged by position (at or below the last given: dropped; the next: given; a hole:
read again), and the session rejoins live delivery, where it drops what is at or
below its position and catches up again on a hole.

Deliveries are paced (``Pacer``): at most STEP events to one session per step and
fanout.CHUNK per reactor turn over all sessions, each turn's frames corked, so live
traffic keeps flowing while a storm of devices catches up.
"""

from __future__ import annotations

import collections
import uuid
from contextlib import nullcontext

from twisted.internet import defer
from twisted.logger import Logger

from chatgateway.api import chat_pb2 as pb
from chatgateway.bus.roomstream import READ_CHUNK
from chatgateway.sessions.fanout import CHUNK

# Events given to one session per step of the pacer (then the next session's turn).
STEP = 100
# Live events held per catching room at most (the oldest dropped: they are read again).
HELD_MAX = 2 * READ_CHUNK
# A stream read that failed is tried again after these delays, then the core is asked.
RETRY_DELAYS_SEC = (0.1, 0.4, 1.6)
NOT_HELD = "neither the room's stream nor the core's history holds these events"


class Pacer:
    """Runs catch-up steps, at most ``budget`` deliveries per reactor turn, corked.

    A step is a callable returning the deliveries it made; it submits itself again
    when it has more to do, so sessions take turns."""

    def __init__(self, clock, corked=nullcontext, budget=CHUNK):
        self._clock = clock
        self._corked = corked
        self._budget = budget
        self._queue = collections.deque()
        self._timer = None

    def __len__(self):
        return len(self._queue)

    def submit(self, step):
        self._queue.append(step)
        if self._timer is None:
            self._timer = self._clock.callLater(0, self._run)

    def _run(self):
        self._timer = None
        spent = 0
        queue = self._queue
        with self._corked():
            while queue and spent < self._budget:
                spent += queue.popleft()() or 0
        if queue and self._timer is None:
            self._timer = self._clock.callLater(0, self._run)

    def stop(self):
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        self._queue.clear()


class _Entry:
    """One room of one session catching up (or behind: waiting for its outbox to drain)."""

    __slots__ = (
        "session",
        "room_id",
        "epoch",
        "offset",
        "held",
        "behind",
        "busy",
        "waiters",
        "pending",
        "top",
        "then",
        "past",
    )

    def __init__(self, session, room_id, epoch, offset):
        self.session = session
        self.room_id = room_id
        self.epoch = epoch
        self.offset = offset  # the last given to the session
        self.held = collections.deque(maxlen=HELD_MAX)  # live EncodedEvents arrived meanwhile
        self.behind = False  # the session's outbox is full: wait for it to drain, drop live events
        self.busy = False  # a read, a core call or deliveries under way
        self.waiters = []  # Deferreds fired when the room is live again
        self.pending = None  # deque of (offset, encoded or None, gap or None) to give
        self.top = 0  # the stream's last offset, as the last read said
        self.then = None  # what to do once pending is given (default: read on, or the seam)
        self.past = ()  # epochs this catch-up has left behind (their late live events are dropped)

    def live(self, encoded):
        """A live event of the room for this session, while it catches up."""
        if not self.behind:
            self.held.append(encoded)


class CatchUps:
    """The catch-up engine of a gateway.

    ``reads``: a sessions.streamreads.StreamReads. ``live_position(room_id)``: the
    (epoch, offset) the gateway's live delivery reached in a room, or None
    (sessions.positions.RoomPositions.position; ``ended_position``: the same of the room's
    previous epoch, RoomPositions.ended). ``counts``: a GatewayCounts.
    """

    log = Logger()

    def __init__(self, reads, live_position, pacer, clock, counts, ended_position=None):
        self.reads = reads
        self._live_position = live_position
        # ended_position(room_id): (epoch, offset) the gateway received of the room's previous epoch.
        self._ended_position = ended_position or (lambda room_id: None)
        self.pacer = pacer
        self._clock = clock
        self._counts = counts

    # ------------------------------------------------------------ entry points

    def start(self, session, room_id, epoch, offset):
        """Give ``session`` every event of the room after (epoch, offset); a Deferred fired
        when the room is live again for it. An empty epoch, or a room the session is not
        delivered, is live at once."""
        if not epoch or session.closed or room_id not in session.rooms:
            return defer.succeed(None)
        d = defer.Deferred()
        entry = session.catching.get(room_id)
        if entry is None:
            last = session.delivered.get(room_id)
            if last is not None and last[1] == epoch and last[2] > offset:
                offset = last[2]  # given already: never twice
            entry = session.catching[room_id] = _Entry(session, room_id, epoch, offset)
            entry.waiters.append(d)
            self._next(entry)
        else:
            entry.waiters.append(d)  # already catching (from where it was given up to)
            if entry.behind and not session.behind:
                entry.behind = False
                self._next(entry)
        return d

    def hole(self, session, last, encoded):
        """``encoded`` is beyond the next offset of the room for ``session`` (at ``last``):
        hold it and give what lies between first."""
        room_id = last[0]
        entry = session.catching[room_id] = _Entry(session, room_id, last[1], last[2])
        entry.held.append(encoded)
        self._next(entry, fresh=True)

    def fall_behind(self, session, position, last):
        """``session`` (behind) was not given ``position``: the room waits for its outbox to drain."""
        room_id, epoch, offset = position
        if last is not None:
            epoch, start = last[1], last[2]  # (of another epoch: its rest comes first, then this one's)
        else:
            start = offset - 1
        entry = session.catching[room_id] = _Entry(session, room_id, epoch, start)
        entry.behind = True

    def shed(self, position, recipients):
        """The overloaded fan-out dropped the room event at ``position`` before giving it to
        ``recipients``: each catches up from its own position in the room."""
        room_id, epoch, offset = position
        for session in recipients:
            if session.closed or room_id in session.catching:
                continue  # a catching room reads on to the gateway's live position anyway
            last = session.delivered.get(room_id)
            # From its own position (of another epoch: that epoch's rest first), else from the shed one.
            at = (last[1], last[2]) if last is not None else (epoch, offset - 1)
            entry = session.catching[room_id] = _Entry(session, room_id, *at)
            self._next(entry)

    def drained(self, session):
        """The outbox of ``session`` drained: its rooms that fell behind catch up."""
        for entry in list(session.catching.values()):
            if entry.behind:
                entry.behind = False
                if not entry.busy:
                    self._next(entry)

    # ------------------------------------------------------------ the steps

    def _gone(self, entry):
        session = entry.session
        return session.closed or entry.room_id not in session.rooms or session.catching.get(entry.room_id) is not entry

    def _next(self, entry, attempt=0, fresh=False):
        """Read what follows the entry's position (``fresh``: held events lie beyond it)."""
        if self._gone(entry):
            self._finish(entry)
            return
        if entry.behind:
            entry.busy = False
            return
        entry.busy = True
        d = self.reads.read(entry.room_id, entry.epoch, entry.offset, fresh or bool(entry.held))
        d.addCallbacks(self._sliced, self._read_failed, (entry,), None, (entry, attempt))

    def _sliced(self, read, entry):
        if self._gone(entry):
            self._finish(entry)
            return
        if read.epoch != entry.epoch:
            # The position is of another epoch (the stream was lost since): what the core
            # holds of that epoch (up to what the gateway received of it, when it knows: what
            # the core lacks of that is a gap), then the new epoch's stream from its start.
            known = None
            for seen in (self._live_position(entry.room_id), self._ended_position(entry.room_id)):
                if seen is not None and seen[0] == entry.epoch and seen[1] > entry.offset:
                    known = seen[1]
            self._from_core(entry, None, read.epoch or None, [], 0, known)
            return
        session = entry.session
        if any(held.position[1] != entry.epoch for held in entry.held):
            # The stream is of this epoch: a held event of another is a late one of a lost epoch.
            entry.held = collections.deque((h for h in entry.held if h.position[1] == entry.epoch), maxlen=HELD_MAX)
        if entry.offset > read.top:
            entry.offset = read.top  # a position beyond the room's: nothing to give
            session.delivered[entry.room_id] = (entry.room_id, entry.epoch, entry.offset)
        events = read.events
        first = events[0][0] if events else read.top + 1
        if not events and entry.held:
            held = entry.held[0].position
            if held[1] == entry.epoch and held[2] > first:
                first = held[2]  # held beyond what the stream holds: what lies between is not there
        if first > entry.offset + 1:
            # The stream no longer holds (offset, first): the core's history for them.
            self._from_core(entry, first - 1, None, events, read.top)
            return
        self._give(entry, [(offset, encoded, None) for offset, encoded in events], read.top)

    def _read_failed(self, failure, entry, attempt):
        if self._gone(entry):
            self._finish(entry)
            return
        if attempt < len(RETRY_DELAYS_SEC):
            self._clock.callLater(RETRY_DELAYS_SEC[attempt], self._next, entry, attempt + 1)
            return
        self.log.warn(
            "could not read the stream of room {room} to catch a device up: {error}; asking the core",
            room=entry.room_id,
            error=failure.getErrorMessage(),
        )
        live = self._live_position(entry.room_id)
        until = live[1] if live is not None and live[0] == entry.epoch and live[1] > entry.offset else None
        self._from_core(entry, until, None, [], until or 0)

    def _from_core(self, entry, until, next_epoch, then_events, top, known=None):
        """Ask the core for the entry's epoch after its offset up to ``until`` (None: all it
        holds); give that, gaps for what it lacks, then ``then_events`` (or move to ``next_epoch``).
        ``known``: an offset of the epoch the gateway knows existed (what the core lacks up to it is a gap)."""
        session = entry.session
        d = self.reads.history(entry.room_id, entry.epoch, entry.offset, until, session.token, session.device_id)
        d.addCallback(self._historied, entry, until, next_epoch, then_events, top, known)
        d.addErrback(lambda failure: self.log.failure("catch-up from the core failed", failure))

    def _historied(self, history, entry, until, next_epoch, then_events, top, known=None):
        if self._gone(entry):
            self._finish(entry)
            return
        items = []
        expected = entry.offset + 1
        for offset, encoded in history.events:
            if offset > expected:
                items.append((offset - 1, None, (expected, offset - 1, NOT_HELD)))
            items.append((offset, encoded, None))
            expected = offset + 1
        if not history.complete and history.events:
            # More than one answer holds: give this much, then ask on from where it ended.
            self._give(entry, items, None, lambda: self._from_core(entry, until, next_epoch, then_events, top, known))
            return
        if until is not None and expected <= until:
            items.append((until, None, (expected, until, history.failed or NOT_HELD)))
        elif until is None and known is not None and expected <= known:
            items.append((known, None, (expected, known, history.failed or NOT_HELD)))
        elif until is None and history.failed:
            items.append((expected, None, (expected, 0, history.failed)))  # 0: the end is not known
        items.extend((offset, encoded, None) for offset, encoded in then_events)
        if next_epoch is not None:
            self._give(entry, items, 0, lambda: self._new_epoch(entry, next_epoch))
        elif until is None and not then_events and top == 0:
            self._give(entry, items, 0, lambda: self._seam(entry))
        else:
            self._give(entry, items, max(top, until or 0))

    def _new_epoch(self, entry, epoch):
        entry.past = (*entry.past, entry.epoch)
        entry.epoch, entry.offset = epoch, 0
        entry.session.delivered[entry.room_id] = (entry.room_id, epoch, 0)
        self._next(entry)

    def _give(self, entry, items, top, then=None):
        """Give ``items`` (paced); ``top``: the stream's last offset the read saw (None: as before)."""
        entry.pending = collections.deque(items)
        if top is not None:
            entry.top = top
        entry.then = then
        if items:
            self.pacer.submit(lambda: self._step(entry))
        else:
            self._step(entry)  # nothing to give: on at once

    def _step(self, entry):
        """Give the entry's session up to STEP of its pending events; the deliveries made."""
        if self._gone(entry):
            self._finish(entry)
            return 0
        session, room_id = entry.session, entry.room_id
        pending = entry.pending
        given = 0
        while pending and given < STEP:
            offset, encoded, gap = pending[0]
            if gap is not None:
                if not self._send_gap(entry, *gap):
                    entry.behind = True
                    break
                pending.popleft()
                given += 1
                continue
            if offset <= entry.offset:
                pending.popleft()
                continue
            if not session.give(encoded):
                entry.behind = True  # not given: read again once the outbox drains
                break
            pending.popleft()
            entry.offset = offset
            session.delivered[room_id] = encoded.position
            given += 1
        if entry.behind:
            entry.pending = entry.then = None
            entry.busy = False
            return given
        if pending:
            self.pacer.submit(lambda: self._step(entry))
            return given
        then, entry.pending, entry.then = entry.then, None, None
        if then is not None:
            then()
        elif entry.offset < entry.top:
            self._next(entry)
        else:
            self._seam(entry)
        return given

    def _send_gap(self, entry, first, last, reason):
        """Tell the session's device of the gap; False when it did not fit (the device is behind)."""
        session = entry.session
        if session.behind:
            return False
        gap = pb.GapEvent(room_id=entry.room_id, epoch=entry.epoch, first_offset=first, last_offset=last, reason=reason)
        session.send(pb.ServerEvent(id=uuid.uuid4().hex, gap=gap))
        if session.behind:
            return False
        self._counts.gap_sent()
        if last:
            entry.offset = max(entry.offset, last)
            session.delivered[entry.room_id] = (entry.room_id, entry.epoch, entry.offset)
        return True

    def _seam(self, entry):
        """Given up to the stream's top: merge the held live events, then rejoin live delivery."""
        if self._gone(entry):
            self._finish(entry)
            return
        held = entry.held
        items = []
        expected = entry.offset + 1
        while held:
            _, epoch, offset = held[0].position
            if epoch in entry.past:
                held.popleft()  # of an epoch given up to its end already
                continue
            if epoch != entry.epoch or offset > expected:
                self._next(entry)  # a hole (or the stream was lost): read on; the rest stays held
                return
            encoded = held.popleft()
            if offset == expected:
                items.append((offset, encoded, None))
                expected += 1
        if items:
            self._give(entry, items, None, lambda: self._seam(entry))
            return
        live = self._live_position(entry.room_id)
        if live is not None and live[0] == entry.epoch and live[1] > entry.offset and live[1] > entry.top:
            self._next(entry)  # the gateway received more than the last read saw: read on
            return
        # Live from here: the next live event must follow this position (nothing may be given
        # out of it, even when the catch-up had nothing to give).
        entry.session.delivered[entry.room_id] = (entry.room_id, entry.epoch, entry.offset)
        self._finish(entry)

    def _finish(self, entry):
        session = entry.session
        if session.catching.get(entry.room_id) is entry:
            del session.catching[entry.room_id]
        entry.busy = False
        entry.pending = entry.then = None
        waiters, entry.waiters = entry.waiters, []
        for d in waiters:
            d.callback(None)
