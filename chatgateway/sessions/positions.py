"""Gap-free live delivery: each room's positions checked as its events arrive.

docs/architecture.md#positions-and-the-room-stream. Per room subscribed on this gateway
(not per device) the last delivered position (epoch, offset) is kept. An event of the
room with the next offset goes on to the fan-out; one at or below the last is a
duplicate and dropped; one beyond the next means events were missed (a pub/sub message
lost): the gateway reads the room's stream after its last offset, once for the room,
holds the room's newer live events meanwhile, then delivers stream and held events
merged by offset (at or below the last: dropped; the rest in order). After the bus
resubscribed (``resync``: messages of every room may have been missed), each room with a
position is read the same way.

What the stream cannot fill (trimmed past the last offset, its epoch gone, or unreadable
for FILL_RETRY_SEC) is passed on by ``lost(room_id)``: each of the room's sessions with a
position catches up from it on its own (chatgateway.sessions.catchup: the core's history,
then gap events; one without a position gets a DATA_LOSS notice), and delivery goes on
from what there is. An event of another epoch than the room's means the stream was lost:
``lost`` too, and the room starts again from that event. Events without a position
(typing, a core that does not follow the contract) pass unchecked.
"""

from twisted.internet import defer
from twisted.logger import Logger

from chatgateway.api import codec
from chatgateway.bus import channels
from chatgateway.bus.roomstream import READ_CHUNK

ROOM_PREFIX = channels.room("")
# A stream that cannot be read is tried again after these delays (the publishing connection
# comes back a moment after the subscriber, or Redis is briefly away), then given up.
FILL_RETRY_DELAYS_SEC = (0.05, 0.1, 0.2, 0.4, 0.8, 1.6, 3.2)


class _Room:
    __slots__ = ("epoch", "offset", "filling", "again", "held", "attempts", "ended")

    def __init__(self, epoch, offset):
        self.epoch = epoch
        self.offset = offset  # the last delivered
        self.ended = None  # (epoch, last delivered offset) of the epoch before this one
        self.filling = False  # a read of the stream is in flight
        self.again = False  # read once more when it ends (the bus resubscribed meanwhile)
        self.held = []  # (offset, epoch, event, payload) arrived while filling
        self.attempts = 0


class RoomPositions:
    """Checks room events' positions before ``deliver(channel, event, payload)``.

    ``bus``: its ``read_room_stream(room_id, after, count)`` fills gaps. ``lost(room_id)``:
    events of the room may have been missed that the stream cannot give (its sessions catch up).
    ``clock``: for the retries of a read that failed.
    """

    log = Logger()

    def __init__(self, bus, deliver, lost, clock):
        self._bus = bus
        self._deliver = deliver
        self._lost = lost
        self._clock = clock
        self._rooms = {}  # room id -> _Room
        self.filled = 0  # events delivered from streams (for tests and logs)
        self.duplicates = 0

    def position(self, room_id):
        """(epoch, last delivered offset) of a room, or None."""
        room = self._rooms.get(room_id)
        return None if room is None else (room.epoch, room.offset)

    def ended(self, room_id):
        """(epoch, last delivered offset) of the room's epoch before its current one, or None
        (what a catch-up in that lost epoch knows it held: sessions.catchup)."""
        room = self._rooms.get(room_id)
        return None if room is None else room.ended

    def receive(self, channel, payload):
        """Bus receiver for event channels: parse, check the position, deliver."""
        event = codec.parse_server_event(payload)
        if event is None:
            self.log.warn("dropped an unparsable event on {channel}", channel=channel)
            return
        offset = event.offset
        if not offset or not channel.startswith(ROOM_PREFIX):
            self._deliver(channel, event, payload)
            return
        room_id = channel[len(ROOM_PREFIX) :]
        room = self._rooms.get(room_id)
        if room is None:
            self._rooms[room_id] = _Room(event.epoch, offset)
            self._deliver(channel, event, payload)
        elif room.filling:
            room.held.append((offset, event.epoch, event, payload))
        else:
            self._check(room_id, room, channel, offset, event.epoch, event, payload, None)

    def resync(self):
        """The bus resubscribed: read every room's stream after its last offset."""
        for room_id, room in list(self._rooms.items()):
            if room.filling:
                room.again = True
            else:
                self._fill(room_id, room)

    def forget(self, room_id):
        """The room's channel is no longer subscribed: its position means nothing any more."""
        self._rooms.pop(room_id, None)

    # ------------------------------------------------------------ internals

    def _check(self, room_id, room, channel, offset, epoch, event, payload, covered):
        """One live (or held) event of a room not filling. ``covered``: the last offset the
        stream read just now held; a gap at or below it cannot be filled."""
        if epoch != room.epoch:
            # The stream was lost (a new epoch): positions are void; start again from here (the
            # room's new position first, so the sessions catching up see the new epoch live).
            room.ended = (room.epoch, room.offset)
            room.epoch, room.offset = epoch, offset
            self._lost(room_id)
            self._deliver(channel, event, payload)
        elif offset <= room.offset:
            self.duplicates += 1
        elif offset == room.offset + 1 or (covered is not None and offset - 1 <= covered):
            if offset != room.offset + 1:
                self._lost(room_id)  # the stream did not hold what came before it
            room.offset = offset
            self._deliver(channel, event, payload)
        else:
            room.held.append((offset, epoch, event, payload))
            self._fill(room_id, room)

    def _fill(self, room_id, room):
        room.filling = True
        room.again = False
        try:
            d = self._bus.read_room_stream(room_id, room.offset, READ_CHUNK)
        except Exception as e:  # noqa: BLE001 - a bus that cannot even send counts as a failed read
            d = defer.fail(e)
        d.addCallbacks(self._filled, self._failed, (room_id, room), None, (room_id, room))

    def _filled(self, read, room_id, room):
        if self._rooms.get(room_id) is not room:
            return  # forgotten meanwhile
        room.attempts = 0
        channel = channels.room(room_id)
        if read.epoch != room.epoch:
            # This epoch's stream is gone: what was missed of it cannot be known.
            self._lost(room_id)
            if not read.epoch:
                del self._rooms[room_id]  # no stream at all: start from the next event seen
                self._release(room_id, None, room.held)
                return
            room.ended = (room.epoch, room.offset)
            room.epoch, room.offset = read.epoch, 0  # the new epoch's stream, from its start
            self._fill(room_id, room)
            return
        events = read.events
        if events and events[0][0] > room.offset + 1:
            self._lost(room_id)  # trimmed past the last offset: go on from its oldest
        elif not events and read.top > room.offset:
            # Nothing after the last offset is left (trimmed, expired): go on from what is held.
            self._lost(room_id)
            room.offset = min(item[0] for item in room.held) - 1 if room.held else read.top
        for offset, payload in events:
            if offset <= room.offset:
                continue
            event = codec.parse_server_event(payload)
            if event is None:
                self.log.warn("skipped an unparsable event in the stream of room {room}", room=room_id)
                continue
            room.offset = offset
            self.filled += 1
            self._deliver(channel, event, payload)
        if room.again or (len(events) >= READ_CHUNK and room.offset < read.top):
            self._fill(room_id, room)  # more to read before the held events
            return
        self._release(room_id, room, room.held, read.top)

    def _release(self, room_id, room, held, covered=None):
        """The fill is over: the held events, merged by offset, through the check again."""
        if room is not None:
            room.filling = False
            room.held = []
        channel = channels.room(room_id)
        held.sort(key=lambda item: item[0])
        for i, (offset, epoch, event, payload) in enumerate(held):
            current = self._rooms.get(room_id)
            if current is None:
                current = self._rooms[room_id] = _Room(epoch, offset)
                self._deliver(channel, event, payload)
            elif current.filling:
                current.held.extend(held[i:])  # another gap: the rest waits for that fill
                return
            else:
                self._check(room_id, current, channel, offset, epoch, event, payload, covered)

    def _failed(self, failure, room_id, room):
        if self._rooms.get(room_id) is not room:
            return
        if room.attempts < len(FILL_RETRY_DELAYS_SEC):
            delay = FILL_RETRY_DELAYS_SEC[room.attempts]
            room.attempts += 1
            self._clock.callLater(delay, self._retry, room_id, room)
            return
        self.log.warn(
            "could not read the stream of room {room}: {error}; its devices are told events were missed",
            room=room_id,
            error=failure.getErrorMessage(),
        )
        room.attempts = 0
        self._lost(room_id)
        held, room.held = room.held, []
        room.filling = False
        if held:
            # Go on from what there is: the first held event becomes the room's position.
            held.sort(key=lambda item: item[0])
            room.epoch, room.offset = held[0][1], held[0][0] - 1
        self._release(room_id, room, held)

    def _retry(self, room_id, room):
        if self._rooms.get(room_id) is room:
            self._fill(room_id, room)
