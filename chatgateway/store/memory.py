"""In-process store with the same keys and values as the Redis one."""

import json

from twisted.internet import defer
from zope.interface import implementer

from chatgateway.store import IConnectionStore, conn_key, instance_key, room_key


@implementer(IConnectionStore)
class MemoryStore:
    ready = True

    def __init__(self):
        self.values = {}  # key -> JSON text
        self.sets = {}  # key -> set of members

    def start(self):
        return defer.succeed(None)

    def connected(self, meta):
        self.values[conn_key(meta.profile_id, meta.device_id)] = meta.to_json()
        for room_id in meta.room_ids:
            self.sets.setdefault(room_key(room_id), set()).add(meta.member)
        return defer.succeed(None)

    def rooms_changed(self, meta, added, removed):
        self.values[conn_key(meta.profile_id, meta.device_id)] = meta.to_json()
        for room_id in added:
            self.sets.setdefault(room_key(room_id), set()).add(meta.member)
        for room_id in removed:
            self._discard(room_key(room_id), meta.member)
        return defer.succeed(None)

    def refresh(self, metas):
        for meta in metas:
            self.values[conn_key(meta.profile_id, meta.device_id)] = meta.to_json()
        return defer.succeed(None)

    def disconnected(self, meta):
        self.values.pop(conn_key(meta.profile_id, meta.device_id), None)
        for room_id in meta.room_ids:
            self._discard(room_key(room_id), meta.member)
        return defer.succeed(None)

    def instance_alive(self, gateway_id, info):
        self.values[instance_key(gateway_id)] = json.dumps(info)
        return defer.succeed(None)

    def stop(self):
        self.values = {k: v for k, v in self.values.items() if not k.startswith("gateway:instance:")}
        return defer.succeed(None)

    def _discard(self, key, member):
        members = self.sets.get(key)
        if members is not None:
            members.discard(member)
            if not members:
                del self.sets[key]

