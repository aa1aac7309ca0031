"""Resuming a device where it left off, when its session opens (docs/architecture.md#resume).

What a device gives when it opens a session (``ResumeRequest``): a resume token from an
earlier ``connected`` (the first request's ``resume_token``, the WebSocket handshake's
``?resume_token=``, or the gRPC stream's ``x-resume-token`` metadata) and explicit
positions per room (the first request's ``positions``). With them, and with the
server-side record of the device's positions (chatgateway.store.resumepositions), the
plan (``plan``) says, per room the profile is a member of now, where to catch up from:

- the device's explicit position of the room wins;
- else the furthest of the token's and the record's positions within one epoch, the
  record's if their epochs differ (it was written later);
- a room the device is no longer a member of gives nothing (left while away), whatever
  its positions; a room with no position starts live.

A token is read only for the profile and device the connection authenticated as; one of
another profile or device, tampered, expired or malformed is ignored (logged, and the
device is told in an ``error`` notice after ``connected``) and the connect goes on as
without it. The session then catches up (``Session.catch_up``) in each planned room and
``connected`` says ``resumed``; it carries a new token with the positions the session
starts from.
"""

import uuid

import grpc
from twisted.internet import defer
from twisted.logger import Logger

from chatgateway.api import chat_pb2 as pb
from chatgateway.auth.resumetokens import MAX_OFFSET, ResumeTokenError, ResumeTokens, token_secret
from chatgateway.sessions.devicepositions import DevicePositions
from chatgateway.sessions.roomstarts import RoomStarts, within
from chatgateway.store.resumepositions import make_resume_positions, merged

BACKWARD = pb.GetHistoryRequest.BACKWARD
# Explicit positions read from one request; more are ignored (a device has them in its record).
MAX_EXPLICIT_POSITIONS = 10_000
# Longest a connect waits for the device's server-side record (a slow store): then it goes on without.
RECORD_WAIT_SEC = 2.0
# Rooms joined while away whose join is looked for per resume (one GetHistory each), how
# many of a room's latest events are looked through, and for how long.
MAX_JOIN_LOOKUPS = 4
JOIN_LOOKBACK = 100
JOIN_WAIT_SEC = 2.0


class ResumeRequest:
    """What a device asked to resume from: a token (or "") and explicit positions."""

    __slots__ = ("token", "positions")

    def __init__(self, token="", positions=None):
        self.token = token or ""
        self.positions = positions or {}  # room id -> (epoch, offset)

    @classmethod
    def of(cls, request, fallback_token=""):
        """The resume info of the StreamRequest that signs in (its token wins over the handshake's)."""
        positions = {}
        for position in request.positions[:MAX_EXPLICIT_POSITIONS]:
            # Without an epoch only offset 0 means something: "none of the room's events".
            if position.room_id and 0 <= position.offset <= MAX_OFFSET and (position.epoch or not position.offset):
                positions[position.room_id] = (position.epoch, position.offset)
        return cls(request.resume_token or fallback_token, positions)

    def __bool__(self):
        return bool(self.token or self.positions)


def plan(member_rooms, explicit, token_positions, record):
    """{room id: (epoch, offset)} to catch up from, for the rooms in ``member_rooms``."""
    planned = {}
    for room_id in member_rooms:
        position = explicit.get(room_id)
        if position is None:
            kept, recorded = token_positions.get(room_id), record.get(room_id)
            if kept is not None and recorded is not None:
                position = merged(kept, recorded)
            else:
                position = recorded if recorded is not None else kept
        if position is not None:
            planned[room_id] = position
    return planned


def ignored_notice(reason):
    """The notice after ``connected`` to a device whose token was ignored."""
    return pb.ServerEvent(
        id=uuid.uuid4().hex,
        error=pb.ErrorDetail(
            code=grpc.StatusCode.FAILED_PRECONDITION.value[0],
            status=grpc.StatusCode.FAILED_PRECONDITION.name,
            message=f"resume token ignored ({reason}): resuming from explicit positions and the gateway's record",
        ),
    )


class Resumption:
    """The open-time part of a resume, for one gateway, in two steps around the session's
    registration: ``resolve`` (before: reads what it needs) and ``finish`` (after).

    ``tokens``: chatgateway.auth.resumetokens.ResumeTokens; ``records``: an IResumePositions;
    ``room_starts``: chatgateway.sessions.roomstarts.RoomStarts.
    """

    log = Logger()

    def __init__(self, tokens, records, room_starts, clock, counts, core=None):
        self._core = core  # for the joins of rooms joined while away (GetHistory)
        self.tokens = tokens
        self.records = records
        self.device_positions = DevicePositions(records, clock)  # what the record is written from
        self.room_starts = room_starts
        self._clock = clock
        self._counts = counts  # chatgateway.telemetry.counts.GatewayCounts

    @classmethod
    def of(cls, config, store, bus, core, clock, room_position, counts):
        """The gateway's: tokens with the shared key, records beside its store, both kept
        RESUME_POSITIONS_TTL_SEC; rooms' positions from the gateway's, else read from ``bus``."""
        ttl = config.resume_positions_ttl_sec
        tokens = ResumeTokens(token_secret(config), ttl, clock)
        starts = RoomStarts(bus, room_position, clock)
        return cls(tokens, make_resume_positions(store, ttl, clock), starts, clock, counts, core)

    async def record(self, profile_id, device_id):
        """The device's server-side record; {} when it cannot be read within RECORD_WAIT_SEC
        (the resume goes on without it)."""
        outcome = defer.Deferred()  # not a timeout on the read itself: a store's command is not cancelled
        timer = self._clock.callLater(RECORD_WAIT_SEC, lambda: outcome.called or outcome.callback(None))

        def arrived(result):
            if timer.active():
                timer.cancel()
            if not outcome.called:
                outcome.callback([result])  # a Failure too, as a value

        self.records.load(profile_id, device_id).addBoth(arrived)
        answer = await outcome
        if answer is not None and isinstance(answer[0], dict):
            return answer[0]
        why = "no answer in time" if answer is None else answer[0].getErrorMessage()
        self.log.warn("reading the resume positions of {device} failed: {error}", device=device_id, error=why)
        return {}

    async def resolve(self, profile_id, device_id, rooms, request, record, token=None):
        """Before the session is registered: (plan, starts, notice). ``starts``: where the
        session starts in each room it is live in (the room's position now, read when the
        gateway has none). A planned position without an epoch (the device held none of the
        room's events, the room had none yet) becomes the start of the room's epoch now. A room
        the device's record and token do not know, while the record knows others, was joined
        while the device was away: it catches up from its join (``joins``)."""
        request = request or ResumeRequest()
        token_positions, notice = {}, None
        if request.token:
            try:
                token_positions = self.tokens.read(request.token, profile_id, device_id).positions
            except ResumeTokenError as e:
                self.log.info(
                    "resume token of {profile}/{device} ignored: {reason}",
                    profile=profile_id,
                    device=device_id,
                    reason=str(e),
                )
                notice = ignored_notice(e)
        planned = plan(rooms, request.positions, token_positions, record)
        explicit = {room_id for room_id in planned if room_id in request.positions}
        unplanned = [room_id for room_id in rooms if room_id not in planned or not planned[room_id][0]]
        epochless = {room_id for room_id in unplanned if room_id in planned}
        joined = [r for r in rooms if record and r not in planned and r not in record and r not in token_positions]
        lookups = defer.Deferred.fromCoroutine(self.joins(profile_id, device_id, joined, token)) if joined else None
        starts = await self.room_starts.starts(unplanned, fresh=epochless) if unplanned else {}
        if lookups is not None:
            planned.update(await lookups)
        for room_id, (epoch, _) in list(planned.items()):
            if not epoch:
                now = starts.get(room_id)
                if now is not None and now[0]:
                    planned[room_id] = (now[0], 0)  # every event of the epoch came after the device's
                else:
                    del planned[room_id]  # still no event: live
        return planned, {r: p for r, p in starts.items() if r not in planned}, notice, explicit

    async def joins(self, profile_id, device_id, room_ids, token):
        """{room id: the position just before the profile's join} of rooms joined while the
        device was away, found in each room's latest JOIN_LOOKBACK events at the core: the
        SYSTEM event ``member_added`` naming the profile (the reference core's). At most
        MAX_JOIN_LOOKUPS rooms, JOIN_WAIT_SEC; a room whose join is not found starts live."""
        if self._core is None or token is None:
            return {}
        found = {}

        async def look(room_id):
            request = pb.GetHistoryRequest(room_id=room_id, limit=JOIN_LOOKBACK, direction=BACKWARD)
            response = await self._core.call("GetHistory", request, token, device_id)
            for event in response.events:  # newest first: the latest join
                fields = event.payload.fields
                if (
                    event.type == pb.RoomEvent.SYSTEM
                    and event.epoch
                    and event.offset
                    and fields["action"].string_value == "member_added"
                    and fields["profile_id"].string_value == profile_id
                ):
                    found[room_id] = (event.epoch, event.offset - 1)
                    return

        looks = [defer.Deferred.fromCoroutine(look(room_id)) for room_id in room_ids[:MAX_JOIN_LOOKUPS]]
        for d in looks:
            d.addErrback(lambda f: self.log.info("looking for a join failed: {error}", error=f.getErrorMessage()))
        await within(defer.DeferredList(looks), JOIN_WAIT_SEC, self._clock)
        return dict(found)

    def finish(self, session, resolved, replaced=()):
        """After the registration: (plan, starts, the token ``connected`` carries, the notices
        to send after it). ``replaced``: the device's sessions on this gateway it replaces (a
        reconnect after a blink): what they were given is newer than the record, so it counts too."""
        planned, starts, notice, explicit = resolved
        for older in replaced:
            for room_id in older.rooms & planned.keys() - explicit:  # the device's own positions win
                given = older.position(room_id)
                if given is not None:
                    planned[room_id] = merged(planned[room_id], given)
            for room_id in older.rooms & starts.keys():
                given = older.position(room_id)
                start = starts[room_id]
                if given is not None and not (given[0] == start[0] and given[1] >= start[1]):
                    planned[room_id] = given  # it had not been given everything up to now
        planned = {room_id: p for room_id, p in planned.items() if room_id in session.member_rooms}
        begins = {**{r: p for r, p in starts.items() if r in session.member_rooms}, **planned}
        self._counts.resume_opened("token_ignored" if notice is not None else "resumed" if planned else "live")
        notices = () if notice is None else (notice,)
        return planned, begins, self.tokens.issue(session.profile_id, session.device_id, begins), notices

    def start(self, session, planned, begins):
        """Catch the session up in every planned room (it is live in the others); the record
        learns where it ``begins`` in each."""
        for room_id, (epoch, offset) in sorted(planned.items()):
            d = session.catch_up(room_id, epoch, offset)
            d.addErrback(self._failed, session, room_id)
        self.device_positions.started(session, begins)

    def _failed(self, failure, session, room_id):
        self.log.failure("catching {session} up in room {room} failed", failure, session=session.id, room=room_id)
