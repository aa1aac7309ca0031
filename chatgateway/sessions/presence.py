"""Presence of the gateway's devices: leases held, transitions announced, rooms asked about.

docs/protocol.md#presence. The leases (chatgateway.store.presence) live beside the
connection metadata; this module holds them for the local sessions and tells fellow
members: a transition (decided in the store, once for all gateways) becomes a
``presenceEvent`` published on the channel of each room to tell, so only the gateways
with devices in those rooms receive it, and only those devices, members of the room,
see it. Presence events are not kept in the rooms' streams (no position): they say
what is true now, and a device that reconnects asks (the ``presence`` command).
"""

import math
import uuid

import grpc
from google.protobuf.timestamp_pb2 import Timestamp
from twisted.logger import Logger

from chatgateway.api import chat_pb2 as pb
from chatgateway.api import codec
from chatgateway.bus import channels
from chatgateway.core.client import CoreError
from chatgateway.sessions.forwarding import verified
from chatgateway.store.presence import (
    KEY_TTL_SEC,
    NoPresence,
    PresenceUnavailable,
    holder,
    make_presence,
    offline_bound_sec,
)

Status = pb.PresenceEvent.Status


class Presence:
    log = Logger()

    def __init__(self, gateway):
        self._gateway = gateway
        config = gateway.config
        self.leases = make_presence(gateway.store, gateway.clock, config.cache_uri)
        if isinstance(self.leases, NoPresence):
            self.log.warn(
                "{reason}: no presenceEvents, the presence command answers UNAVAILABLE, and call"
                " signals are relayed without the check that the callee is connected",
                reason=NoPresence.reason,
            )
        # This process: a gateway restarted with the same GATEWAY_ID lapses its earlier leases.
        self.holder = holder(config.gateway_id, uuid.uuid4().hex[:12])
        self.grace_sec = config.presence_grace_sec
        self.max_room_size = config.presence_max_room_size
        self.online_profiles = 0  # across gateways, as the last sweep counted
        # The keys of live connections are renewed every KEY_TTL_SEC / 3 (a few times a day).
        self.renew_every = max(1, math.floor(KEY_TTL_SEC / (3 * config.heartbeat_interval_sec)))
        self._ticks = 0
        gateway.counts.online_profiles = lambda: self.online_profiles

    @property
    def offline_bound_sec(self):
        """Longest a device of a dead gateway stays online: its registration's TTL, then one sweep."""
        return offline_bound_sec(self._gateway.config.heartbeat_interval_sec)

    # ------------------------------------------------------------ hooks of the gateway

    def arrived(self, session):
        """A session is registered (or rewritten): take its lease; tell its rooms if its profile came online."""
        d = self.leases.arrive(
            session.profile_id,
            session.device_id,
            session.id,
            self.holder,
            sorted(session.member_rooms),
            self.max_room_size,
        )
        d.addCallback(lambda rooms: rooms and self._announce(session.profile_id, Status.ONLINE, rooms))
        self._gateway._quietly(d, "taking a presence lease")

    def departed(self, session):
        """A session closed: its lease lasts the grace period more (a reconnect keeps the profile online)."""
        d = self.leases.depart(session.profile_id, session.device_id, session.id, self.holder, self.grace_sec)
        self._gateway._quietly(d, "releasing a presence lease")

    def membership_changed(self, change):
        """A profile with devices here joined a room (told when the profile goes offline), or left
        one (no longer told: presence is for fellow members only)."""
        Change = pb.SubscriptionEvent.Change
        if change.change not in (Change.ADDED, Change.REMOVED):
            return
        if not self._gateway.registry.profile_sessions(change.profile_id):
            return
        if change.change == Change.ADDED:
            d = self.leases.add_room(change.profile_id, change.room_id)
        else:
            d = self.leases.remove_room(change.profile_id, change.room_id)
        self._gateway._quietly(d, "updating the rooms of a presence lease")

    def tick(self):
        """Every heartbeat: sweep the leases (any gateway's) that lapsed or whose gateway died.

        Live leases need no renewal: they last as long as this gateway's registration, which
        the heartbeat renews (chatgateway.store.presence); only their keys' TTLs are renewed,
        every ``renew_every`` ticks."""
        self._ticks += 1
        if self._ticks % self.renew_every == 0:
            profiles = {s.profile_id for s in self._gateway.registry.sessions}
            if profiles:
                self._gateway._quietly(self.leases.renew(profiles), "renewing presence keys")
        swept = self.leases.sweep(self.max_room_size, self.holder)
        swept.addCallback(self._swept)
        self._gateway._quietly(swept, "sweeping presence leases")

    def _swept(self, sweep):
        self.online_profiles = sweep.online
        if sweep.reaped:
            sessions = list(self._gateway.registry.sessions)
            self.log.warn(
                "another gateway lapsed this gateway's presence leases (its registration had expired);"
                " taking {count} again",
                count=len(sessions),
            )
            for session in sessions:
                self.arrived(session)
        for profile_id, rooms in sweep.offline:
            if rooms:
                self._announce(profile_id, Status.OFFLINE, rooms)

    def _announce(self, profile_id, status, rooms):
        now = self._gateway.clock.seconds()
        stamp = Timestamp()
        stamp.FromNanoseconds(int(now * 1e9))
        counts = self._gateway.counts
        for room_id in rooms:
            event = pb.ServerEvent(
                id=uuid.uuid4().hex,
                presence_event=pb.PresenceEvent(profile_id=profile_id, status=status, room_id=room_id),
            )
            event.presence_event.last_active.CopyFrom(stamp)
            codec.stamp(event, now)
            # A plain publish: no position, nothing kept (the module docstring).
            d = self._gateway.bus.publish(channels.room(room_id), event.SerializeToString())
            self._gateway._quietly(d, "publishing presence")
        counts.presence_announced(status, len(rooms))

    # ------------------------------------------------------------ queries

    async def room(self, room_id):
        """The GetPresenceResponse of a room (the caller's membership is checked by the caller)."""
        try:
            found = await self.leases.room(room_id, self.max_room_size)
        except PresenceUnavailable as e:
            raise CoreError(grpc.StatusCode.UNAVAILABLE, str(e)) from None
        response = pb.GetPresenceResponse(room_id=room_id, online_count=found.count)
        if found.profile_ids is None:
            response.counts_only = True
        else:
            response.profile_ids.extend(found.profile_ids)
        return response

    def devices(self, profile_id):
        """Deferred: the devices of ``profile_id`` connected now, on any gateway (None: not known)."""
        return self.leases.devices(profile_id)


async def get_presence(gateway, request, token, device_id="", **_options):
    """``POST /chat.v1.ChatService/GetPresence``: the room's online members for a member of it.

    The caller's rooms come as at a connect (the membership cache, else the core). Errors are
    CoreErrors, as a forwarded method's are.
    """
    claims = await verified(gateway, token)
    if not request.room_id:
        raise CoreError(grpc.StatusCode.INVALID_ARGUMENT, "room_id is required")
    rooms = await gateway.connect_rooms(claims.profile_id, token, claims.device_id or device_id or "")
    if request.room_id not in rooms:
        raise CoreError(grpc.StatusCode.PERMISSION_DENIED, f"not a member of room {request.room_id}")
    return await gateway.presence.room(request.room_id)
