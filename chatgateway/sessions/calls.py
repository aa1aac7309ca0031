"""Call signaling: WebRTC offers, answers, ICE candidates and ends relayed between devices.

docs/protocol.md#call-signaling. A signal goes to a profile (every connected device of
it) or one device of it, that shares ``room_id`` with the sender. It is published on the
callee's profile channel (chat:profile:{id}), which every gateway holding a device of the
callee subscribes: one bus hop, and nothing stored (the core never sees it).

The rules, in order: the sender is a member of the room (else PERMISSION_DENIED); the
callee is too (the membership cache, which a published removal updates at once; for a
callee not cached, the core's SearchRoomSubscriptions with the sender's token, whose yes is
remembered for MEMBER_TTL_SEC; else PERMISSION_DENIED, so a stranger learns nothing of the
callee, not even whether it is online); the callee (or the
device named) is connected on some gateway (its presence leases; else UNAVAILABLE).

An ANSWER also goes to the answering profile's own channel as a TAKEN event, so its other
devices stop ringing; the answering device does not get it.
"""

import uuid

import grpc

from chatgateway.api import chat_pb2 as pb
from chatgateway.api import codec
from chatgateway.bus import channels

Kind = pb.CallSignal.Kind
# Kinds a device may send (TAKEN is the gateway's).
SENDABLE = (Kind.OFFER, Kind.ANSWER, Kind.ICE, Kind.END)
# A callee the core said shares a room with a sender is not asked about again for this long
# (a call's ICE candidates come by the dozen).
MEMBER_TTL_SEC = 60.0
MEMBER_CACHE_MAX = 10_000
# Subscriptions asked of the core per page, and pages at most, to find the callee.
SUBSCRIPTION_PAGE = 100
SUBSCRIPTION_PAGES = 10


class SignalRefused(Exception):
    def __init__(self, code, message):
        super().__init__(message)
        self.code = code
        self.message = message


class CallSignals:
    def __init__(self, gateway):
        self._gateway = gateway
        self._members = {}  # (room id, profile id) -> clock seconds when known to be a member

    async def send(self, session, signal):
        """Relay ``signal`` from ``session``; raises SignalRefused."""
        if signal.kind not in SENDABLE:
            raise SignalRefused(grpc.StatusCode.INVALID_ARGUMENT, "kind must be OFFER, ANSWER, ICE or END")
        if not signal.call_id or not signal.room_id or not signal.to_profile_id:
            raise SignalRefused(grpc.StatusCode.INVALID_ARGUMENT, "call_id, room_id and to_profile_id are required")
        if signal.room_id not in session.member_rooms:
            raise SignalRefused(grpc.StatusCode.PERMISSION_DENIED, f"not a member of room {signal.room_id}")
        if not await self._is_member(session, signal.room_id, signal.to_profile_id):
            raise SignalRefused(
                grpc.StatusCode.PERMISSION_DENIED, f"{signal.to_profile_id} is not a member of room {signal.room_id}"
            )
        devices = await self._gateway.presence.devices(signal.to_profile_id)
        if devices is None:  # presence not kept (a Redis Cluster): relayed, whoever is there
            reachable = True
        else:
            reachable = signal.to_device_id in devices if signal.to_device_id else bool(devices)
        if not reachable:
            whom = signal.to_profile_id + (f"/{signal.to_device_id}" if signal.to_device_id else "")
            raise SignalRefused(grpc.StatusCode.UNAVAILABLE, f"{whom} is not connected")
        event = pb.CallSignalEvent(
            call_id=signal.call_id,
            kind=signal.kind,
            room_id=signal.room_id,
            from_profile_id=session.profile_id,
            from_device_id=session.device_id,
            to_profile_id=signal.to_profile_id,
            to_device_id=signal.to_device_id,
        )
        if signal.HasField("payload"):
            event.payload.CopyFrom(signal.payload)
        self._publish(signal.to_profile_id, event)
        if signal.kind == Kind.ANSWER:
            taken = pb.CallSignalEvent()
            taken.CopyFrom(event)
            taken.kind = Kind.TAKEN
            taken.ClearField("payload")
            self._publish(session.profile_id, taken)

    def _publish(self, profile_id, event):
        gateway = self._gateway
        message = pb.ServerEvent(id=uuid.uuid4().hex, call_signal_event=event)
        gateway.counts.signal_relayed(pb.CallSignal.Kind.Name(event.kind).lower())
        # A plain publish on the profile's channel: not a membership change, nothing kept.
        payload = codec.stamp(message, gateway.clock.seconds()).SerializeToString()
        gateway._quietly(gateway.bus.publish(channels.profile(profile_id), payload), "relaying a call signal")

    async def _is_member(self, session, room_id, profile_id):
        # The membership cache first: a removal is in it as soon as it is published.
        member = await self._cached_member(room_id, profile_id)
        if member is not None:
            return member
        now = self._gateway.clock.seconds()
        known = self._members.get((room_id, profile_id))
        if known is not None and now - known < MEMBER_TTL_SEC:
            return True
        member = await self._core_member(session, room_id, profile_id)
        if member:
            if len(self._members) >= MEMBER_CACHE_MAX:
                self._members = {k: t for k, t in self._members.items() if now - t < MEMBER_TTL_SEC}
            self._members[(room_id, profile_id)] = now
        return member

    async def _cached_member(self, room_id, profile_id):
        """From the membership cache: True, False, or None (not cached, or unreadable)."""
        if self._gateway.config.membership_cache_ttl_sec <= 0:
            return None
        try:
            cached = await self._gateway.bus.cached_memberships(profile_id)
        except Exception:  # noqa: BLE001 - the bus logged it; the core answers instead
            return None
        return None if cached.rooms is None else room_id in cached.rooms

    async def _core_member(self, session, room_id, profile_id):
        """Asked of the core with the sender's token (the core checks the sender's membership too)."""
        cursor = ""
        for _ in range(SUBSCRIPTION_PAGES):
            request = pb.SearchRoomSubscriptionsRequest(
                room_id=room_id, query=profile_id, page_size=SUBSCRIPTION_PAGE, cursor=cursor
            )
            page = await self._gateway.core.call("SearchRoomSubscriptions", request, session.token, session.device_id)
            if any(s.profile_id == profile_id for s in page.data):
                return True
            cursor = page.next_cursor
            if not cursor:
                return False
        return False


def recipients(event, sessions):
    """The local sessions of the callee's channel that get ``event`` (a CallSignalEvent)."""
    if event.kind == Kind.TAKEN:
        return [s for s in sessions if s.device_id != event.from_device_id]
    if event.to_device_id:
        return [s for s in sessions if s.device_id == event.to_device_id]
    return sessions
