"""Keeping each device's last positions server-side (docs/architecture.md#resume).

A device that comes back without its token (an app restart: the same profile and device
id) resumes from this record. Positions come from what was delivered to the session
(``Session.position``) and from its acks (an Ack with room, epoch and offset), and reach
the store (chatgateway.store.resumepositions) at most once per heartbeat interval per
device, in one batch for the whole sweep (``note`` for each live session, then
``flush``), and when the session closes (``closed``: the disconnects of one reactor turn,
a drain's for instance, go in one batch on the next turn). Only rooms whose position
moved since the last write are written.
"""

from twisted.internet import defer
from twisted.logger import Logger

from chatgateway.store.resumepositions import merged


class DevicePositions:
    log = Logger()

    def __init__(self, records, clock):
        self._records = records  # an IResumePositions
        self._clock = clock
        self._written = {}  # session id -> {room id: (epoch, offset)} last written for it
        self._acked = {}  # session id -> {room id: (epoch, offset)} acknowledged since
        self._batch = {}  # (profile id, device id) -> {room id: (epoch, offset)} to write
        self._call = None  # the flush of this turn's disconnects

    def started(self, session, begins):
        """Where the session starts in its rooms ({room id: (epoch, offset)}): it holds every
        event up to there, so the record says so at the next write (a quiet room included)."""
        if begins:  # not kept per session: a room's later writes come from its deliveries
            batch = self._batch.setdefault((session.profile_id, session.device_id), {})
            for room_id, pos in begins.items():
                batch[room_id] = merged(batch.get(room_id), pos)

    def acked(self, session, ack):
        """An Ack of the session: its position counts for the record, if it has one."""
        if ack.room_id and ack.epoch and ack.offset and ack.room_id in session.member_rooms:
            acked = self._acked.setdefault(session.id, {})
            acked[ack.room_id] = merged(acked.get(ack.room_id), (ack.epoch, ack.offset))

    def note(self, session):
        """Add what moved of the session's positions to the next batch."""
        position = session.position
        current = {}
        for room_id in session.rooms:
            delivered = position(room_id)
            if delivered is not None:
                current[room_id] = delivered
        for room_id, acked in self._acked.pop(session.id, {}).items():
            current[room_id] = merged(current.get(room_id), acked)
        if not current:
            return
        written = self._written.setdefault(session.id, {})
        changed = {room_id: pos for room_id, pos in current.items() if written.get(room_id) != pos}
        if changed:
            written.update(changed)
            batch = self._batch.setdefault((session.profile_id, session.device_id), {})
            for room_id, pos in changed.items():
                batch[room_id] = merged(batch.get(room_id), pos)

    def flush(self):
        """Write the batch in one store call. A Deferred; a failure is logged, not raised."""
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call = None
        batch, self._batch = self._batch, {}
        if not batch:
            return defer.succeed(None)
        d = self._records.save(batch)
        d.addErrback(
            lambda f: self.log.warn(
                "writing the resume positions of {count} devices failed: {error}",
                count=len(batch),
                error=f.getErrorMessage(),
            )
        )
        return d

    def closed(self, session):
        """The session closed: its last positions are written on the next turn, with the others'."""
        self.note(session)
        self._written.pop(session.id, None)
        self._acked.pop(session.id, None)
        if self._batch and (self._call is None or not self._call.active()):
            self._call = self._clock.callLater(0, self.flush)
