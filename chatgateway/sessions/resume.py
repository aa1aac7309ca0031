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
from twisted.logger import Logger

from chatgateway.api import chat_pb2 as pb
from chatgateway.auth.resumetokens import MAX_OFFSET, ResumeTokenError, ResumeTokens, token_secret
from chatgateway.store.resumepositions import make_resume_positions, merged

# Explicit positions read from one request; more are ignored (a device has them in its record).
MAX_EXPLICIT_POSITIONS = 10_000


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
            if position.room_id and 0 <= position.offset <= MAX_OFFSET:
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
    """The open-time part of a resume, for one gateway.

    ``tokens``: chatgateway.auth.resumetokens.ResumeTokens; ``records``: an IResumePositions;
    ``room_position(room_id)``: the gateway's last delivered position of a room, or None.
    """

    log = Logger()

    def __init__(self, tokens, records, room_position):
        self.tokens = tokens
        self.records = records
        self._room_position = room_position

    @classmethod
    def of(cls, config, store, clock, room_position):
        """The gateway's: tokens with the shared key, records beside its store, both kept
        RESUME_POSITIONS_TTL_SEC."""
        ttl = config.resume_positions_ttl_sec
        return cls(
            ResumeTokens(token_secret(config), ttl, clock), make_resume_positions(store, ttl, clock), room_position
        )

    async def record(self, profile_id, device_id):
        """The device's server-side record; {} when it cannot be read (the resume goes on without it)."""
        try:
            return await self.records.load(profile_id, device_id)
        except Exception as e:  # noqa: BLE001 - a store outage must not stop a connect
            self.log.warn("reading the resume positions of {device} failed: {error}", device=device_id, error=e)
            return {}

    def prepare(self, session, request, record):
        """The plan of a session that just opened, the token its ``connected`` carries, and the
        notice to send after it (or None): (plan, token, notice)."""
        request = request or ResumeRequest()
        token_positions, notice = {}, None
        if request.token:
            try:
                token_positions = self.tokens.read(request.token, session.profile_id, session.device_id).positions
            except ResumeTokenError as e:
                self.log.info(
                    "resume token of {profile}/{device} ignored: {reason}",
                    profile=session.profile_id,
                    device=session.device_id,
                    reason=str(e),
                )
                notice = ignored_notice(e)
        planned = plan(session.member_rooms, request.positions, token_positions, record)
        starts = dict(planned)
        for room_id in session.member_rooms:
            if room_id not in starts:
                position = self._room_position(room_id)
                if position is not None:
                    starts[room_id] = position
        return planned, self.tokens.issue(session.profile_id, session.device_id, starts), notice

    def start(self, session, planned):
        """Catch the session up in every planned room (it is live in the others)."""
        for room_id, (epoch, offset) in sorted(planned.items()):
            d = session.catch_up(room_id, epoch, offset)
            d.addErrback(self._failed, session, room_id)

    def _failed(self, failure, session, room_id):
        self.log.failure("catching {session} up in room {room} failed", failure, session=session.id, room=room_id)
