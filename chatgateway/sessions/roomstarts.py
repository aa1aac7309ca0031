"""Where a session starts in each of its rooms, so a quiet room can be resumed too
(docs/architecture.md#resume).

A session that is live in a room from its open has every event of the room up to the
room's position at that moment. For a room with events, the gateway knows that position
(``RoomPositions.position``). For a room the gateway has seen no event of since it
subscribed it (a quiet room) it does not, and without it a device that leaves before
the room's next event could not say where to resume from there: it would come back to
live events, the ones published while it was away lost. So, at open, the rooms the
gateway has no position of are read from their streams' position keys (READ_ROOM with
nothing to read: the epoch and last offset), once per room for the whole gateway (reads
in flight are shared; an answer is kept LEARNED_SEC; ``("", 0)`` for a room without an
event yet), before the session is registered:
an event published after the read is then one the session receives or resumes from.
What cannot be read in READ_WAIT_SEC is left out (that room starts live, as before).
"""

from twisted.internet import defer
from twisted.logger import Logger

# Past any real offset: READ_ROOM then reads no entry, only the room's epoch and last offset.
NOTHING_AFTER = 2**53
# How long a room's position read here stands in for the gateway's own: when events came
# meanwhile RoomPositions knows a newer one; a stale one only resumes a device too early.
LEARNED_SEC = 30.0
# Longest a connect waits for those reads.
READ_WAIT_SEC = 2.0
# Rooms read per connect at most (a profile in thousands of quiet rooms starts live in the rest).
MAX_READS_PER_OPEN = 64


class RoomStarts:
    """``bus``: its ``read_room_stream``; ``room_position(room_id)``: the gateway's last
    delivered position of a room, or None."""

    log = Logger()

    def __init__(self, bus, room_position, clock):
        self._bus = bus
        self._room_position = room_position
        self._clock = clock
        self._learned = {}  # room id -> ((epoch, offset), read at)
        self._reading = {}  # room id -> Deferred of the read in flight

    def known(self, room_id):
        """The room's position as this gateway knows it now, or None."""
        position = self._room_position(room_id)
        if position is not None:
            return position
        learned = self._learned.get(room_id)
        if learned is not None and self._clock.seconds() - learned[1] < LEARNED_SEC:
            return learned[0]
        return None

    async def starts(self, room_ids, fresh=()):
        """{room id: (epoch, offset)} of the rooms in ``room_ids``, read for those not known
        and for those in ``fresh`` (whose answer must be of now, not of a while ago)."""
        starts, reads = {}, {}
        for room_id in room_ids:
            position = None if room_id in fresh else self.known(room_id)
            if position is not None:
                starts[room_id] = position
            elif len(reads) < MAX_READS_PER_OPEN:
                reads[room_id] = self._read(room_id)
        if reads:
            await within(defer.DeferredList(list(reads.values()), consumeErrors=True), READ_WAIT_SEC, self._clock)
            for room_id, read in reads.items():
                if read.called and read.result is not None:
                    starts[room_id] = read.result
        return starts

    def _read(self, room_id):
        """A Deferred firing with the room's position now (None if it cannot be read); a read
        in flight for the room is shared."""
        reading = self._reading.get(room_id)
        if reading is None:
            reading = self._bus.read_room_stream(room_id, NOTHING_AFTER, 1)
            reading.addCallbacks(self._read_done, self._read_failed, (room_id,), None, (room_id,))
            if not reading.called:
                self._reading[room_id] = reading
        d = defer.Deferred()

        def answered(position):
            d.callback(position)
            return position

        reading.addCallback(answered)
        return d

    def _read_done(self, read, room_id):
        self._reading.pop(room_id, None)
        # No event yet: ("", 0), before whatever epoch comes. Kept like the others: once the
        # room has events while the gateway is subscribed, RoomPositions knows better; stale,
        # a start resumes a device at most LEARNED_SEC of the room's events early.
        position = (read.epoch, read.top) if read.epoch else ("", 0)
        self._learned[room_id] = (position, self._clock.seconds())
        if len(self._learned) > 100_000:  # bounded: the oldest half goes
            for stale in sorted(self._learned, key=lambda r: self._learned[r][1])[:50_000]:
                del self._learned[stale]
        return position

    def _read_failed(self, failure, room_id):
        self._reading.pop(room_id, None)
        self.log.warn(
            "reading the position of room {room} failed: {error}", room=room_id, error=failure.getErrorMessage()
        )
        return None


def within(d, seconds, clock):
    """A Deferred firing (with None) when ``d`` does or after ``seconds``, whichever is first."""
    done = defer.Deferred()
    timer = clock.callLater(seconds, lambda: done.called or done.callback(None))

    def fired(result):
        if timer.active():
            timer.cancel()
        if not done.called:
            done.callback(None)

    d.addBoth(fired)
    return done
