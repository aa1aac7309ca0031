"""Shared reads for catch-up: each room's stream, and the core's history, read once per gateway.

docs/architecture.md#catch-up. Many sessions of one gateway catching up in one room
(a reconnect storm, devices that fell behind together) need the same events. They
are read here once and shared:

- **The room's window.** Per room, the events of a contiguous range of offsets, parsed
  once (an EncodedEvent each, so every subprotocol encodes once for all recipients):
  filled by stream reads (READ_ROOM, READ_CHUNK entries each) and extended by the room's
  live events as the gateway receives them (``observe``: one dict lookup per live event
  of the room, not per device). A session asking for events after an offset the
  window holds gets them from memory; only a range the window does not hold is read,
  and a read already in flight that covers it is joined. A window unused for
  WINDOW_IDLE_SEC is dropped; it keeps at most WINDOW_MAX events (the oldest go).
- **The core's history** (``history``): a range the stream no longer holds is asked of
  the core (GetHistory FORWARD after a position, paged), once per (room, range), with
  the token of the first session that needs it (every session asking is a member of the
  room); the answer is kept HISTORY_KEEP_SEC for the sessions that follow.

Every READ_ROOM (the gateway-level fills of chatgateway.sessions.positions too, through
``read_room_stream``) and every GetHistory page is counted (GatewayCounts.catchup_read).
"""

from __future__ import annotations

from typing import NamedTuple

from twisted.internet import defer
from twisted.logger import Logger

from chatgateway.api import chat_pb2 as pb
from chatgateway.api import codec
from chatgateway.bus.roomstream import READ_CHUNK
from chatgateway.core.client import CoreError
from chatgateway.sessions.fanout import EncodedEvent

# Events a room's window keeps at most (the oldest go first).
WINDOW_MAX = 2 * READ_CHUNK
# A window no session read from for this long is dropped.
WINDOW_IDLE_SEC = 10.0
# Events per GetHistory page (the reference core's cap), and pages per range at most.
HISTORY_PAGE = 500
HISTORY_MAX_PAGES = 40
# An answer of the core is kept this long for other sessions needing the same range.
HISTORY_KEEP_SEC = 10.0


class Slice(NamedTuple):
    """What a read gives a session: the stream's epoch ("" when the room has none), its
    last offset, and events after the offset asked for, (offset, EncodedEvent), contiguous
    and in order; they start above ``after + 1`` when the stream no longer holds those."""

    epoch: str
    top: int
    events: list[tuple[int, EncodedEvent]]


class History(NamedTuple):
    """What the core's history gave for a range: events of the epoch in the range, in order,
    why it could not (all of) answer ("" when it did), and whether the range was read to its
    end (False: HISTORY_MAX_PAGES pages were read; ask again after the last event)."""

    events: list[tuple[int, EncodedEvent]]
    failed: str
    complete: bool = True


class _Span(NamedTuple):
    """A range the core answered in full: its events of the epoch in (after, end]; ``open``:
    to the end of what the core held (the rest of a lost epoch, which no longer grows)."""

    after: int
    end: int
    open: bool
    events: list[tuple[int, EncodedEvent]]
    at: float


class _Window:
    """Events of offsets after+1 .. top of one epoch, contiguous: events[i] has offset after+1+i."""

    __slots__ = ("epoch", "after", "floor", "events", "used", "timer")

    def __init__(self, epoch, events, floor=None):
        self.epoch = epoch
        self.after = events[0][0] - 1
        # The lowest offset asked for after which the stream held nothing before the window
        # (a read after ``floor`` began at after + 1): a later read after it would give the same.
        self.floor = self.after if floor is None else min(floor, self.after)
        self.events = []
        self.extend(events)
        self.used = 0.0
        self.timer = None

    @property
    def top(self):
        return self.after + len(self.events)

    def since(self, after, count):
        """Up to ``count`` events after ``after`` (from floor to top)."""
        start = max(0, after - self.after)
        return self.events[start : start + count]

    def extend(self, events):
        """Add ``events`` that start at or below top + 1 (their overlap is skipped)."""
        top = self.top
        for offset, encoded in events:
            if offset == top + 1:
                self.events.append((offset, encoded))
                top = offset
            elif offset > top + 1:
                return  # a hole: the window ends before it

    def trim(self):
        excess = len(self.events) - WINDOW_MAX
        if excess > 0:
            del self.events[:excess]
            self.after += excess
            self.floor = self.after


def room_event(room_id, payload):
    """An EncodedEvent of a stream entry (a serialized ServerEvent with its position), or None."""
    event = codec.parse_server_event(payload)
    if event is None or not event.offset:
        return None
    return EncodedEvent(event, payload, (room_id, event.epoch, event.offset))


def history_event(room_id, message):
    """An EncodedEvent of a RoomEvent from the core's history, shaped as the core publishes it."""
    event = pb.ServerEvent(id=message.id, message=message, epoch=message.epoch, offset=message.offset)
    if message.HasField("sent_at"):
        event.timestamp.CopyFrom(message.sent_at)
    return EncodedEvent(event, None, (room_id, message.epoch, message.offset))


class StreamReads:
    """``bus``: its ``read_room_stream``; ``core``: its ``call``; ``counts``: a GatewayCounts."""

    log = Logger()

    def __init__(self, bus, core, counts, clock):
        self._bus = bus
        self._core = core
        self._counts = counts
        self._clock = clock
        self._windows = {}  # room id -> _Window
        self._reading = {}  # room id -> {after: [Deferred]}: stream reads in flight
        self._histories = {}  # (room, epoch, after, until) -> Deferred list (in flight) or (History, at)
        self._spans = {}  # (room, epoch) -> _Span: the last range answered in full, for ranges inside it
        # live_position(room_id): (epoch, offset) the gateway's live delivery reached (RoomPositions.position).
        self.live_position = lambda room_id: None
        # subscribed(room_id): a Deferred fired once the room's channel is subscribed (Redis confirmed
        # it). A read made before could miss an event published between it and the subscription.
        self.subscribed = lambda room_id: defer.succeed(None)

    # ------------------------------------------------------------ the stream

    def read_room_stream(self, room_id, after, count=READ_CHUNK):
        """The bus's read, counted (chatgateway.sessions.positions fills gaps through it)."""
        self._counts.catchup_read("stream")
        return self._bus.read_room_stream(room_id, after, count)

    def read(self, room_id, epoch, after, fresh=False):
        """A Deferred Slice: events of the room after ``after`` (of ``epoch``), from the window
        when it holds them, else from a stream read shared with every session asking.
        ``fresh``: the caller knows of events beyond the gateway's live position (do read)."""
        window = self._windows.get(room_id)
        if window is not None and window.epoch == epoch and window.floor <= after < window.top:
            window.used = self._clock.seconds()
            return defer.succeed(Slice(epoch, window.top, window.since(after, READ_CHUNK)))
        if not fresh and self.live_position(room_id) == (epoch, after):
            # At the gateway's live position: nothing to read (a device that missed nothing).
            return defer.succeed(Slice(epoch, after, []))
        waiting = self._reading.setdefault(room_id, {})
        d = defer.Deferred()
        for start, waiters in waiting.items():
            if start <= after < start + READ_CHUNK:
                waiters.append((after, epoch, d))  # that read covers this range
                return d
        waiting[after] = [(after, epoch, d)]
        ready = self.subscribed(room_id)
        ready.addBoth(lambda _: self._start(room_id, after))
        return d

    def _start(self, room_id, after):
        try:
            read = self.read_room_stream(room_id, after, READ_CHUNK)
        except Exception as e:  # noqa: BLE001 - a bus that cannot even send counts as a failed read
            read = defer.fail(e)
        read.addCallbacks(self._read, self._read_failed, (room_id, after), None, (room_id, after))

    def _read(self, read, room_id, start):
        waiters = self._take(room_id, start)
        events = [(offset, encoded) for offset, payload in read.events if (encoded := room_event(room_id, payload))]
        if events and read.epoch:
            self._remember(room_id, read.epoch, events, start)
        cut = len(read.events) >= READ_CHUNK
        for after, epoch, d in waiters:
            mine = [item for item in events if item[0] > after]
            if not mine and cut and after < read.top and after != start:
                # Joined a read that ended before this range began: read on from here.
                self.read(room_id, epoch, after).chainDeferred(d)
            else:
                d.callback(Slice(read.epoch, read.top, mine))

    def _read_failed(self, failure, room_id, start):
        for _, _, d in self._take(room_id, start):
            d.errback(failure)

    def _take(self, room_id, start):
        waiting = self._reading.get(room_id, {})
        waiters = waiting.pop(start, [])
        if not waiting:
            self._reading.pop(room_id, None)
        return waiters

    def _remember(self, room_id, epoch, events, start):
        """Keep a read's events in the room's window: joined to it when they touch, else instead."""
        window = self._windows.get(room_id)
        first, last = events[0][0], events[-1][0]
        if window is not None and window.epoch == epoch and first <= window.top + 1 and last >= window.after:
            if first <= window.after:  # before the window (and reaching it): the read first
                older = _Window(epoch, [item for item in events if item[0] <= window.after], start)
                if older.top == window.after:
                    window.events = older.events + window.events
                    window.after, window.floor = older.after, older.floor
            window.extend(events)
        else:
            if window is not None and window.timer is not None and window.timer.active():
                window.timer.cancel()
            window = self._windows[room_id] = _Window(epoch, events, start)
            window.timer = self._clock.callLater(WINDOW_IDLE_SEC, self._idle, room_id, window)
        window.used = self._clock.seconds()
        window.trim()

    def observe(self, room_id, encoded):
        """A live event of the room, as the gateway delivers it: the room's window grows by it."""
        window = self._windows.get(room_id)
        if window is None:
            return
        _, epoch, offset = encoded.position
        if epoch != window.epoch:
            self.forget(room_id)  # the stream was lost: the window's epoch is over
        elif offset == window.top + 1:
            window.events.append((offset, encoded))
            if len(window.events) > WINDOW_MAX + READ_CHUNK:
                window.trim()

    def forget(self, room_id):
        """No local session is left in the room: its window goes."""
        window = self._windows.pop(room_id, None)
        if window is not None and window.timer is not None and window.timer.active():
            window.timer.cancel()

    def _idle(self, room_id, window):
        if self._windows.get(room_id) is not window:
            return
        left = window.used + WINDOW_IDLE_SEC - self._clock.seconds()
        if left > 0:
            window.timer = self._clock.callLater(left, self._idle, room_id, window)
        else:
            del self._windows[room_id]

    def window(self, room_id):
        """(epoch, after, top) of the room's window, or None (for tests and logs)."""
        window = self._windows.get(room_id)
        return None if window is None else (window.epoch, window.after, window.top)

    # ------------------------------------------------------------ the core's history

    def history(self, room_id, epoch, after, until, token, device_id):
        """A Deferred History: the room's events of ``epoch`` in (after, until] (``until`` None:
        to the end of what the core holds), asked of the core once for every session needing it."""
        key = (room_id, epoch, after, until)
        now = self._clock.seconds()
        span = self._spans.get((room_id, epoch))
        if span is not None and span.at + HISTORY_KEEP_SEC > now and span.after <= after:
            if (until is not None and until <= span.end) or (until is None and span.open):
                # Inside a range answered for another session: no call.
                inside = [item for item in span.events if after < item[0] and (until is None or item[0] <= until)]
                return defer.succeed(History(inside, ""))
        known = self._histories.get(key)
        if isinstance(known, tuple):
            if known[1] + HISTORY_KEEP_SEC > now:
                return defer.succeed(known[0])
            del self._histories[key]
            known = None
        d = defer.Deferred()
        if known is not None:
            known.append(d)
            return d
        self._histories[key] = [d]
        run = defer.Deferred.fromCoroutine(self._ask(room_id, epoch, after, until, token, device_id))
        run.addBoth(self._answered, key)
        return d

    async def _ask(self, room_id, epoch, after, until, token, device_id):
        events = []
        position = after
        for _ in range(HISTORY_MAX_PAGES):
            request = pb.GetHistoryRequest(
                room_id=room_id,
                direction=pb.GetHistoryRequest.FORWARD,
                limit=HISTORY_PAGE,
                after_epoch=epoch,
                after_offset=position,
            )
            self._counts.catchup_read("core")
            try:
                page = await self._core.call("GetHistory", request, token, device_id)
            except CoreError as e:
                return History(events, f"the core's history could not be read ({e.detail().status})")
            before, beyond = position, False
            for message in page.events:
                if message.epoch == epoch and message.offset > position:
                    if until is not None and message.offset > until:
                        beyond = True
                        break
                    events.append((message.offset, history_event(room_id, message)))
                    position = message.offset
            if beyond or position == before or not page.next_cursor or (until is not None and position >= until):
                return History(events, "")
        return History(events, "", complete=False)

    def _answered(self, result, key):
        waiters = self._histories.get(key)
        if isinstance(result, BaseException) or hasattr(result, "getErrorMessage"):
            self.log.warn("catch-up from the core's history failed: {error}", error=result)
            result = History([], "the core's history could not be read")
        self._histories[key] = (result, self._clock.seconds())
        room_id, epoch, after, until = key
        if not result.failed and result.complete:
            end = until if until is not None else (result.events[-1][0] if result.events else after)
            self._spans[(room_id, epoch)] = _Span(after, end, until is None, result.events, self._clock.seconds())
        for d in waiters if isinstance(waiters, list) else ():
            d.callback(result)
        if len(self._histories) > 256:
            now = self._clock.seconds()
            for k, v in list(self._histories.items()):
                if isinstance(v, tuple) and v[1] + HISTORY_KEEP_SEC <= now:
                    del self._histories[k]
            for k, v in list(self._spans.items()):
                if v.at + HISTORY_KEEP_SEC <= now:
                    del self._spans[k]
