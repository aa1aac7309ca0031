"""In-process store with the same keys and values as the Redis one (without TTLs).

``values`` holds the JSON strings, ``sets`` the sets and ``devices`` the
device connection lists (sorted sets in Redis), so tests can read the same
keys from either store.
"""

import json

from twisted.internet import defer
from zope.interface import implementer

from chatgateway.store import (
    INSTANCES_KEY,
    IConnectionStore,
    conn_key,
    device_entry,
    device_key,
    instance_conns_key,
    instance_info,
    instance_key,
    instance_rooms_key,
    parse_device_entry,
    room_key,
)


@implementer(IConnectionStore)
class MemoryStore:
    ready = True

    def __init__(self):
        self.values = {}  # key -> JSON text
        self.sets = {}  # key -> set of members
        self.devices = {}  # device key -> [device entry], oldest first
        self._own = set()  # gateway ids this store has registered

    def start(self):
        return defer.succeed(None)

    def open_connection(self, meta, session_id, limit):
        self.connected(meta)
        return self.claim_device(meta.profile_id, meta.device_id, meta.gateway_id, session_id, limit)

    def connected(self, meta):
        self._joined(meta, meta.room_ids)
        self._add(instance_conns_key(meta.gateway_id), meta.member)
        return defer.succeed(None)

    def rooms_changed(self, meta, added, removed):
        self._joined(meta, added)
        for room_id in removed:
            self._discard(room_key(room_id), meta.member)
        return defer.succeed(None)

    def _joined(self, meta, room_ids):
        self.values[conn_key(meta.profile_id, meta.device_id)] = meta.to_json()
        for room_id in room_ids:
            self._add(room_key(room_id), meta.member)
            self._add(instance_rooms_key(meta.gateway_id), room_id)

    def refresh(self, metas):
        for meta in metas:
            self.values[conn_key(meta.profile_id, meta.device_id)] = meta.to_json()
        return defer.succeed(None)

    def disconnected(self, meta):
        key = conn_key(meta.profile_id, meta.device_id)
        owner = _owner(self.values.get(key))
        keep = set()
        if owner is not None and owner.get("gateway_id") != meta.gateway_id:
            keep = set(owner.get("room_ids") or ())  # another gateway holds the device now
        else:
            self.values.pop(key, None)
        for room_id in meta.room_ids:
            if room_id not in keep:
                self._discard(room_key(room_id), meta.member)
        self._discard(instance_conns_key(meta.gateway_id), meta.member)
        return defer.succeed(None)

    def claim_device(self, profile_id, device_id, gateway_id, session_id, limit):
        entries = self.devices.setdefault(device_key(profile_id, device_id), [])
        entry = device_entry(gateway_id, session_id)
        if entry not in entries:
            entries.append(entry)
        excess = max(0, len(entries) - limit)
        evicted = entries[:excess]
        del entries[:excess]
        if not entries:
            del self.devices[device_key(profile_id, device_id)]
        return defer.succeed([parse_device_entry(e) for e in evicted])

    def release_device(self, profile_id, device_id, gateway_id, session_id):
        key = device_key(profile_id, device_id)
        entries = self.devices.get(key, [])
        entry = device_entry(gateway_id, session_id)
        if entry in entries:
            entries.remove(entry)
            if not entries:
                del self.devices[key]
        return defer.succeed(None)

    def instance_alive(self, gateway_id, info):
        self._own.add(gateway_id)
        self.values[instance_key(gateway_id)] = instance_info(gateway_id, info)
        self._add(INSTANCES_KEY, gateway_id)
        return defer.succeed(None)

    def instances(self):
        found = []
        for gateway_id in sorted(self.sets.get(INSTANCES_KEY, ())):
            entry = self.values.get(instance_key(gateway_id))
            if entry is not None:
                found.append({**json.loads(entry), "rooms": len(self.sets.get(instance_rooms_key(gateway_id), ()))})
        return defer.succeed(found)

    def reap_dead_instances(self, own_gateway_id):
        reaped = []
        for gateway_id in sorted(self.sets.get(INSTANCES_KEY, ())):
            if gateway_id == own_gateway_id or instance_key(gateway_id) in self.values:
                continue
            conns = self.sets.get(instance_conns_key(gateway_id), set())
            for room_id in self.sets.pop(instance_rooms_key(gateway_id), set()):
                for member in self.sets.get(room_key(room_id), set()) & conns:
                    if not _held_elsewhere(self.values.get("gateway:conn:" + member), gateway_id):
                        self._discard(room_key(room_id), member)
            for member in self.sets.pop(instance_conns_key(gateway_id), set()):
                self._reap_member(gateway_id, member)
            self._discard(INSTANCES_KEY, gateway_id)
            reaped.append(gateway_id)
        return defer.succeed(reaped)

    def on_reconnect(self, callback):
        """Never called: memory is never disconnected."""

    def stop(self):
        for gateway_id in self._own:
            self.values.pop(instance_key(gateway_id), None)
            if not self.sets.get(instance_conns_key(gateway_id)):
                self.sets.pop(instance_conns_key(gateway_id), None)
                self.sets.pop(instance_rooms_key(gateway_id), None)
                self._discard(INSTANCES_KEY, gateway_id)
        return defer.succeed(None)

    def _reap_member(self, gateway_id, member):
        key = "gateway:conn:" + member
        raw = self.values.get(key)
        if raw is not None and not _held_elsewhere(raw, gateway_id):
            owner = _owner(raw) or {}
            del self.values[key]
            for room_id in owner.get("room_ids") or ():
                self._discard(room_key(room_id), member)
        entries = self.devices.get("gateway:device:" + member, [])
        entries[:] = [e for e in entries if parse_device_entry(e)[0] != gateway_id]
        if not entries:
            self.devices.pop("gateway:device:" + member, None)

    def _add(self, key, member):
        self.sets.setdefault(key, set()).add(member)

    def _discard(self, key, member):
        members = self.sets.get(key)
        if members is not None:
            members.discard(member)
            if not members:
                del self.sets[key]


def _owner(raw):
    """The metadata dict of a stored connection, or None (none, or unreadable)."""
    if raw is None:
        return None
    try:
        owner = json.loads(raw)
    except ValueError:
        return None
    return owner if isinstance(owner, dict) else None


def _held_elsewhere(raw, gateway_id):
    """The stored connection names another gateway (unreadable metadata counts as nobody's)."""
    owner = _owner(raw)
    return owner is not None and owner.get("gateway_id") is not None and owner["gateway_id"] != gateway_id
