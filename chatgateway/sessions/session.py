"""One authenticated device connection, whatever carries it.

The WebSocket protocol and the gRPC stream turn frames into
``Session.handle(StreamRequest)`` and implement the small transport
interface below; everything a device may do is decided here.
"""

from __future__ import annotations

import uuid
from typing import TYPE_CHECKING

import grpc
from twisted.internet import defer
from twisted.logger import Logger
from zope.interface import Attribute, Interface

from chatgateway.api import chat_pb2 as pb
from chatgateway.api import codec
from chatgateway.auth.tokens import AuthError
from chatgateway.bus import channels
from chatgateway.core.client import METHODS, CoreError
from chatgateway.sessions.calls import SignalRefused
from chatgateway.sessions.ratelimit import TokenBucket
from chatgateway.sessions.sharedlimits import LimitExceeded
from chatgateway.sessions.tokenexpiry import TokenExpiries
from chatgateway.store import ConnectionMeta

__all__ = ["CloseCode", "CommandError", "ISessionTransport", "Session", "TokenExpiries", "error_detail"]

if TYPE_CHECKING:
    from chatgateway.sessions.fanout import EncodedEvent

TYPE_PREFIX = "type.googleapis.com/"


class CloseCode:
    NORMAL = 1000
    GOING_AWAY = 1001
    POLICY = 1008
    TOO_BIG = 1009
    TRY_AGAIN_LATER = 1013
    REPLACED = 4001
    UNAUTHENTICATED = 4401
    HEARTBEAT_TIMEOUT = 4408
    SLOW_CONSUMER = 4429


class ISessionTransport(Interface):
    transport_name = Attribute('What carries the session, as telemetry reports it: "websocket", "grpc".')

    def send_event(event: pb.ServerEvent) -> None:
        """Send one ServerEvent to this device only."""

    def send_encoded(encoded: EncodedEvent) -> bool | None:
        """Send a shared EncodedEvent (fan-out) to this device; False when it was dropped (the
        connection closing), so its position is not counted as given."""

    def ping() -> None:
        """Send a heartbeat probe."""

    def close(code: int, reason: str) -> None:
        """Close the connection with a close code of docs/protocol.md#heartbeats-and-close-codes."""

    # Optional: ``abort()`` drops the connection at once (a drain past its deadline).


def error_detail(code, message):
    return pb.ErrorDetail(code=code.value[0], status=code.name, message=message)


class Session:
    log = Logger()

    # One per connection: slots keep it small.
    __slots__ = (
        "gateway",
        "transport",
        "id",
        "profile_id",
        "device_id",
        "token",
        "member_rooms",
        "rooms",
        "closed",
        "draining",
        "_in_flight",
        "connected_at",
        "last_active",
        "last_heartbeat",
        "_bucket",
        "_refreshes",
        "_expires_at",
        "delivered",
        "catching",
        "behind",
        "_behind_timer",
    )

    def __init__(self, gateway, transport, claims, token, device_id, member_rooms):
        self.gateway = gateway
        self.transport = transport
        self.id = uuid.uuid4().hex
        self.profile_id = claims.profile_id
        self.device_id = device_id
        self.token = token
        self.member_rooms = set(member_rooms)
        self.rooms = set(member_rooms)  # rooms delivered to this connection
        self.closed = False
        self.draining = None  # the close reason once the gateway drains
        self._in_flight = 0  # commands not yet answered
        self.connected_at = self.last_active = self.last_heartbeat = gateway.clock.seconds()
        self._bucket = None  # the rate limit's TokenBucket, made by the first command (it starts full)
        self._refreshes = None  # MAX_TOKEN_REFRESHES_PER_MINUTE's TokenBucket, made by the first refresh
        self._expires_at = None  # of the token, while TokenExpiries watches it
        # Per room, the position (room id, epoch, offset) of the last room event given to this
        # device; the rooms catching up (sessions.catchup: their live events are held); whether
        # its outbox is full (room events are not fed to it until it drains: sessions.behind).
        self.delivered = {}
        self.catching = {}
        self.behind = False
        self._behind_timer = None
        gateway.token_expiries.schedule(self, claims.valid_until)

    # ------------------------------------------------------------ lifecycle

    def meta(self):
        return ConnectionMeta(
            profile_id=self.profile_id,
            device_id=self.device_id,
            room_ids=sorted(self.rooms),
            last_active=int(self.last_active),
            last_heartbeat=int(self.last_heartbeat),
            connected=int(self.connected_at),
            gateway_id=self.gateway.config.gateway_id,
        )

    def connected_event(self, resume_token="", resumed=False):
        return pb.ServerEvent(
            id=uuid.uuid4().hex,
            connected=pb.Connected(
                gateway_id=self.gateway.config.gateway_id,
                session_id=self.id,
                profile_id=self.profile_id,
                device_id=self.device_id,
                heartbeat_interval_sec=max(1, round(self.gateway.config.heartbeat_interval_sec)),
                room_ids=sorted(self.rooms),
                resume_token=resume_token,  # chatgateway.sessions.resume
                resumed=resumed,
            ),
        )

    def activity(self):
        """Any frame from the device (pongs included) shows it is alive."""
        self.last_active = self.gateway.clock.seconds()

    def close(self, code, reason):
        if not self.closed:
            self.transport.close(code, reason)

    def drain(self, reason):
        """The gateway stops: close with 1001 once the commands in flight are answered."""
        if self.draining is None:
            self.draining = reason
            if not self._in_flight:
                self.close(CloseCode.GOING_AWAY, reason)

    def abort(self):
        """Drop the connection now; forget it even if the transport cannot say so."""
        abort = getattr(self.transport, "abort", None)
        if abort is not None and not self.closed:
            abort()

    def closed_by_transport(self):
        """The connection is gone: forget it everywhere."""
        if self.closed:
            return
        self.closed = True
        if self._behind_timer is not None and self._behind_timer.active():
            self._behind_timer.cancel()
        self.gateway.token_expiries.forget(self)
        self.gateway.session_closed(self)

    # ------------------------------------------------------------ outbound

    def send(self, event):
        if not self.closed:
            self.transport.send_event(codec.stamp(event, self.gateway.clock.seconds()))
            self.gateway.counts.sent(event)

    def deliver(self, encoded):
        """A live event of the fan-out. A room event is given once and in order by position:
        one at or below the device's position is dropped, one beyond the next starts a
        catch-up (docs/architecture.md#catch-up); while its room catches up it is held."""
        if self.closed:
            return
        position = encoded.position
        if position is None:
            self.transport.send_encoded(encoded)
            return
        room_id = position[0]
        catching = self.catching
        if catching and room_id in catching:
            catching[room_id].live(encoded)
            return
        last = self.delivered.get(room_id)
        if last is not None and (position[2] != last[2] + 1 or position[1] != last[1]):
            if position[2] > last[2] or position[1] != last[1]:
                self.gateway.catchups.hole(self, last, encoded)  # (another epoch: the stream was lost)
            return  # at or below: given already
        if not self.behind:
            sent = self.transport.send_encoded(encoded)
            if not self.behind:
                if sent is not False:  # False: dropped by a closing connection, not given
                    self.delivered[room_id] = position
                return
        self.gateway.catchups.fall_behind(self, position, last)

    def fell_behind(self):
        """The outbox is full (sessions.outbox ROOM): feed no room events until it drains;
        close 4429 if it has not within BEHIND_DRAIN_SEC (docs/security.md#slow-consumers)."""
        if self.behind or self.closed:
            return
        self.behind = True
        self.gateway.counts.fell_behind()
        self._behind_timer = self.gateway.clock.callLater(self.gateway.config.behind_drain_sec, self._never_drained)

    def drained(self):
        """The outbox has written everything that waited: the rooms that fell behind catch up."""
        if not self.behind:
            return
        self.behind = False
        if self._behind_timer is not None and self._behind_timer.active():
            self._behind_timer.cancel()
        self._behind_timer = None
        self.gateway.catchups.drained(self)

    def _never_drained(self):
        self._behind_timer = None
        if self.behind:
            self.close(CloseCode.SLOW_CONSUMER, "slow consumer: behind and not draining within BEHIND_DRAIN_SEC")

    def not_given(self, positions):
        """The connection closed with these room events queued, unsent: the device's position in
        each room goes back to before the first of them (a resume from it gets them)."""
        first = {}
        for room_id, epoch, offset in positions:
            if room_id not in first or offset < first[room_id][1]:
                first[room_id] = (epoch, offset)
        for room_id, (epoch, offset) in first.items():
            last = self.delivered.get(room_id)
            if last is not None and last[1] == epoch and last[2] >= offset:
                self.delivered[room_id] = (room_id, epoch, offset - 1)

    def give(self, encoded):
        """A catch-up's event (sessions.catchup); False when it did not fit (the device fell behind)."""
        if self.closed or self.behind:
            return False
        if self.transport.send_encoded(encoded) is False or self.behind:
            return False
        self.gateway.counts.sent(encoded.event)
        return True

    def catch_up(self, room_id, epoch, offset):
        """Give this device every event of the room after (epoch, offset), in order, then live
        events with no gap and no duplicate at the seam. A Deferred fired when the room is live
        again. Call it in the turn the session is registered (after ``registry.add``), before
        live events of the room reach it: what it was given live before counts as given, and
        the stream is read once the room's channel is subscribed."""
        return self.gateway.catchups.start(self, room_id, epoch, offset)

    def position(self, room_id):
        """(epoch, offset) of the last event of the room given to this device, or None."""
        last = self.delivered.get(room_id)
        return None if last is None else (last[1], last[2])

    def reply(self, request_id, error=None, body=None, more=False):
        result = pb.CommandResult(request_id=request_id, more=more)
        if error is not None:
            result.error.CopyFrom(error)
        if body is not None:
            result.body.Pack(body)
        self.send(pb.ServerEvent(id=uuid.uuid4().hex, command_result=result))

    def send_error(self, code, message):
        """An error about the stream itself (e.g. an unparsable frame)."""
        self.send(pb.ServerEvent(id=uuid.uuid4().hex, error=error_detail(code, message)))

    # ------------------------------------------------------------ inbound

    def handle(self, request):
        """One StreamRequest from the device."""
        self.gateway.counts.received(request)
        if request.auth_token:
            self._refresh_token(request.auth_token)
        which = request.WhichOneof("payload")
        if which == "command":
            self._command(request.command)
        elif which == "ack":
            # Its position goes to the device's server-side record (docs/architecture.md#resume).
            self.gateway.device_positions.acked(self, request.ack)

    def _refresh_token(self, token):
        if self._refreshes is None:
            per_minute = self.gateway.config.max_token_refreshes_per_minute
            self._refreshes = TokenBucket(per_minute / 60.0, per_minute, self.gateway.clock)
        if not self._refreshes.take():
            # Not verified: a JWT verification costs more than the rest of a frame.
            self.send_error(
                grpc.StatusCode.RESOURCE_EXHAUSTED, "token refresh refused: over MAX_TOKEN_REFRESHES_PER_MINUTE"
            )
            return

        def fresh(claims):
            if claims.profile_id != self.profile_id:
                self.close(CloseCode.UNAUTHENTICATED, "token is for another profile")
                return
            self.token = token
            if not self.closed:
                self.gateway.token_expiries.schedule(self, claims.valid_until)

        def bad(failure):
            failure.trap(AuthError)
            self.close(CloseCode.UNAUTHENTICATED, f"invalid token: {failure.value}")

        self.gateway.verifier.verify(token).addCallbacks(fresh, bad)

    def _command(self, command):
        request_id = command.request_id
        if self.draining is not None:
            self.reply(request_id, error_detail(grpc.StatusCode.UNAVAILABLE, self.draining))
            return
        if self._bucket is None:
            rate = self.gateway.config.max_events_per_second
            self._bucket = TokenBucket(rate, rate, self.gateway.clock)
        if not self._bucket.take():
            self.gateway.counts.rate_limited()
            self.reply(request_id, error_detail(grpc.StatusCode.RESOURCE_EXHAUSTED, "rate limit exceeded"))
            return
        which = command.WhichOneof("command")
        handler = getattr(self, f"_cmd_{which}", None) if which else None
        if handler is None:
            self.reply(request_id, error_detail(grpc.StatusCode.INVALID_ARGUMENT, "unknown or empty command"))
            return
        self._in_flight += 1
        payload = getattr(command, which)
        # The limits per profile and per room, across gateways (sessions.sharedlimits), then the command.
        d = self.gateway.limits.admit(self.profile_id, which, payload)
        d.addCallback(lambda _: defer.maybeDeferred(handler, request_id, payload))
        d.addErrback(self._command_failed, request_id)
        d.addBoth(self._command_done)

    def _command_done(self, _):
        self._in_flight -= 1
        if self.draining is not None and not self._in_flight:
            self.close(CloseCode.GOING_AWAY, self.draining)

    def _command_failed(self, failure, request_id):
        if failure.check(CoreError):
            self.reply(request_id, failure.value.detail())
        elif failure.check(CommandError, LimitExceeded, SignalRefused):
            detail = error_detail(failure.value.code, failure.value.message)
            detail.meta.update(getattr(failure.value, "meta", {}))
            self.reply(request_id, detail)
        else:
            self.log.failure("command {request_id} failed", failure, request_id=request_id)
            self.reply(request_id, error_detail(grpc.StatusCode.INTERNAL, "internal error"))

    def _require_member(self, room_id):
        if not room_id:
            raise CommandError(grpc.StatusCode.INVALID_ARGUMENT, "room_id is required")
        if room_id not in self.member_rooms:
            raise CommandError(grpc.StatusCode.PERMISSION_DENIED, f"not a member of room {room_id}")

    # ------------------------------------------------------------ commands

    async def _cmd_room_event(self, request_id, room_event):
        if not room_event.room_id:
            raise CommandError(grpc.StatusCode.INVALID_ARGUMENT, "room_event.room_id is required")
        request = pb.SendEventRequest(event=room_event)
        response = await self.gateway.forward(self, "SendEvent", request)
        self.reply(request_id, body=response)

    def _cmd_typing(self, request_id, typing):
        self._require_member(typing.room_id)
        event = pb.TypingEvent(room_id=typing.room_id, profile_id=self.profile_id, typing=typing.typing)
        self.gateway.publish(channels.room(typing.room_id), pb.ServerEvent(id=uuid.uuid4().hex, typing_event=event))
        self.reply(request_id)

    def _cmd_read_marker(self, request_id, marker):
        self._require_member(marker.room_id)
        if not marker.event_id:
            raise CommandError(grpc.StatusCode.INVALID_ARGUMENT, "read_marker.event_id is required")
        event = pb.ReceiptEvent(room_id=marker.room_id, profile_id=self.profile_id, event_id=marker.event_id)
        self.gateway.publish(channels.room(marker.room_id), pb.ServerEvent(id=uuid.uuid4().hex, receipt_event=event))
        self.reply(request_id)

    async def _cmd_subscribe(self, request_id, rooms):
        wanted = [r for r in rooms.room_ids if r]
        if any(r not in self.member_rooms for r in wanted):
            # Our view of the memberships may lag the core's: ask once more.
            self.member_rooms |= set(await self.gateway.memberships(self.token, self.device_id))
        outside = [r for r in wanted if r not in self.member_rooms]
        if outside:
            raise CommandError(grpc.StatusCode.PERMISSION_DENIED, "not a member of: " + ", ".join(outside))
        self.gateway.registry.join(self, wanted)
        self.reply(request_id)

    def _cmd_unsubscribe(self, request_id, rooms):
        self._leave([r for r in rooms.room_ids if r])
        self.reply(request_id)

    async def _cmd_call(self, request_id, call):
        spec = METHODS.get(call.method)
        if spec is None:
            raise CommandError(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"unknown method {call.method!r}; one of: " + ", ".join(METHODS),
            )
        request_cls, _, streaming = spec
        request = request_cls()
        if call.HasField("body"):
            expected = TYPE_PREFIX + request_cls.DESCRIPTOR.full_name
            if call.body.type_url != expected:
                raise CommandError(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    f"{call.method} takes a body of type {expected}, not {call.body.type_url!r}",
                )
            if not call.body.Unpack(request):
                raise CommandError(grpc.StatusCode.INVALID_ARGUMENT, "body could not be decoded")
        response = await self.gateway.forward(self, call.method, request)
        if streaming:
            for item in response:
                self.reply(request_id, body=item, more=True)
            self.reply(request_id)
        else:
            self.reply(request_id, body=response)

    async def _cmd_call_signal(self, request_id, signal):
        await self.gateway.calls.send(self, signal)
        self.reply(request_id)

    async def _cmd_presence(self, request_id, query):
        self._require_member(query.room_id)
        self.reply(request_id, body=await self.gateway.presence.room(query.room_id))

    # ------------------------------------------------------------ membership

    def apply_membership(self, change):
        """The profile joined, left or changed role in a room (SubscriptionEvent)."""
        Change = pb.SubscriptionEvent.Change
        if change.change == Change.ADDED:
            if change.room_id not in self.member_rooms:
                self.member_rooms.add(change.room_id)
                self.gateway.registry.join(self, [change.room_id])
        elif change.change == Change.REMOVED:
            self.member_rooms.discard(change.room_id)
            self._leave([change.room_id])

    def _leave(self, room_ids):
        """Stop delivering these rooms; their positions go (a room joined again starts from the join)."""
        for room_id in self.gateway.registry.leave(self, room_ids):
            self.delivered.pop(room_id, None)
            self.catching.pop(room_id, None)


class CommandError(Exception):
    def __init__(self, code, message):
        super().__init__(message)
        self.code = code
        self.message = message
