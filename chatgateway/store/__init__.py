"""Connection metadata shared between gateway instances (DESIGN §7).

Two implementations of IConnectionStore: ``memory`` (one instance) and
``redis``. Keys and values follow the spec:

    gateway:conn:{profileID}:{deviceID} -> JSON ConnectionMeta
    gateway:room:{roomID}               -> set of "profileID:deviceID"
    gateway:instance:{gatewayID}        -> JSON instance info
"""

import dataclasses
import json

from zope.interface import Attribute, Interface


def conn_key(profile_id, device_id):
    return f"gateway:conn:{profile_id}:{device_id}"


def room_key(room_id):
    return f"gateway:room:{room_id}"


def instance_key(gateway_id):
    return f"gateway:instance:{gateway_id}"


@dataclasses.dataclass
class ConnectionMeta:
    profile_id: str
    device_id: str
    room_ids: list
    last_active: int
    last_heartbeat: int
    connected: int
    gateway_id: str

    @property
    def member(self):
        """This connection's entry in a room set."""
        return f"{self.profile_id}:{self.device_id}"

    def to_json(self):
        return json.dumps(dataclasses.asdict(self), separators=(",", ":"))


class IConnectionStore(Interface):
    ready = Attribute("True while the store answers (for /readyz).")

    def start():
        """Connect. Returns a Deferred."""

    def connected(meta):
        """Write a new connection's metadata and room entries."""

    def rooms_changed(meta, added, removed):
        """A live connection joined ``added`` and left ``removed`` rooms."""

    def refresh(metas):
        """Rewrite the metadata of live connections and renew their TTLs, in one batch."""

    def disconnected(meta):
        """Remove a connection's metadata and room entries."""

    def instance_alive(gateway_id, info):
        """Renew this instance's registry entry."""

    def stop():
        """Remove this instance's entry and disconnect. Returns a Deferred."""


def make_store(config, reactor):
    """The store named by config.cache_uri."""
    if config.cache_uri == "memory://":
        from chatgateway.store.memory import MemoryStore

        return MemoryStore()
    raise NotImplementedError(f"CACHE_URI scheme of {config.cache_uri!r} has no store yet")
