"""Presence leases in process, beside a MemoryStore: chatgateway.store.presence's rules
without Redis (one instance, and the tests' gateways sharing one store)."""

import json
import math
from typing import Any

from twisted.internet import defer
from zope.interface import implementer

from chatgateway.store import instance_key, room_key
from chatgateway.store.presence import (
    CONN_PREFIX,
    DEPARTED,
    IPresenceLeases,
    RoomPresence,
    Sweep,
    lease_device,
    lease_member,
)


@implementer(IPresenceLeases)
class MemoryPresence:
    """The same leases in process, on ``clock``, beside a MemoryStore (its room sets, connection
    metadata and instance entries); the state lives on the store, so every gateway of the
    process shares it."""

    def __init__(self, store: Any, clock: Any):
        self.store = store
        self.clock = clock
        if not hasattr(store, "presence_leases"):
            store.presence_leases = {}  # profile -> {member: lapse (seconds; inf: live)}
            store.presence_rooms = {}  # profile -> set of room ids
            store.presence_gateways = {}  # holder -> {(profile, member)}
            store.presence_reaped = set()  # holders whose leases another gateway lapsed
        self.leases = store.presence_leases
        self.rooms = store.presence_rooms
        self.gateways = store.presence_gateways
        self.reaped = store.presence_reaped

    def _tell(self, rooms, max_room_size):
        if max_room_size <= 0:
            return []
        return sorted(r for r in rooms if len(self.store.sets.get(room_key(r), ())) <= max_room_size)

    def arrive(self, profile_id, device_id, session_id, holder, rooms, max_room_size):
        now = self.clock.seconds()
        leases = self.leases.setdefault(profile_id, {})
        was = any(lapse > now for lapse in leases.values())
        member = lease_member(device_id, session_id)
        leases[member] = math.inf
        self.gateways.setdefault(holder, set()).add((profile_id, member))
        self.rooms.setdefault(profile_id, set()).update(rooms)
        return defer.succeed(None if was else self._tell(rooms, max_room_size))

    def depart(self, profile_id, device_id, session_id, holder, grace_sec):
        leases = self.leases.get(profile_id, {})
        member = lease_member(device_id, session_id)
        if leases.pop(member, None) is not None:
            leases[DEPARTED + member] = self.clock.seconds() + grace_sec
        self.gateways.get(holder, set()).discard((profile_id, member))
        return defer.succeed(None)

    def renew(self, profile_ids):
        """Nothing expires in process."""
        return defer.succeed(None)

    def add_room(self, profile_id, room_id):
        if profile_id in self.leases:
            self.rooms.setdefault(profile_id, set()).add(room_id)
        return defer.succeed(None)

    def remove_room(self, profile_id, room_id):
        self.rooms.get(profile_id, set()).discard(room_id)
        return defer.succeed(None)

    def sweep(self, max_room_size, holder):
        now = self.clock.seconds()
        reaped = holder in self.reaped
        self.reaped.discard(holder)
        own_gateway = json.loads(holder)[0]
        for other in [h for h in self.gateways if h != holder]:
            gateway_id = json.loads(other)[0]
            if gateway_id != own_gateway:  # an earlier incarnation of this gateway's is dead anyway
                if instance_key(gateway_id) in self.store.values:
                    continue
                self.reaped.add(other)
            for profile_id, member in self.gateways.pop(other):
                if member in self.leases.get(profile_id, {}):
                    self.leases[profile_id][member] = now
        offline = []
        for profile_id in sorted(self.leases):
            leases = self.leases[profile_id]
            for member in [m for m, lapse in leases.items() if lapse <= now]:
                del leases[member]
            if not leases:
                del self.leases[profile_id]
                offline.append((profile_id, self._tell(self.rooms.pop(profile_id, ()), max_room_size)))
        return defer.succeed(Sweep(len(self.leases), offline, reaped))

    def room(self, room_id, max_room_size):
        members = self.store.sets.get(room_key(room_id), set())
        if len(members) > max_room_size:
            return defer.succeed(RoomPresence(len(members), None))
        now = self.clock.seconds()
        profiles = set()
        for member in members:
            raw = self.store.values.get(CONN_PREFIX + member)
            profile_id = json.loads(raw).get("profile_id") if raw else None
            if profile_id and any(lapse > now for lapse in self.leases.get(profile_id, {}).values()):
                profiles.add(profile_id)
        return defer.succeed(RoomPresence(len(profiles), sorted(profiles)))

    def devices(self, profile_id):
        now = self.clock.seconds()
        held = self.leases.get(profile_id, {})
        return defer.succeed({d for d in (lease_device(m) for m, lapse in held.items() if lapse > now) if d})
