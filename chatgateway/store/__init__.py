"""Connection metadata shared between gateway instances.

The contract: docs/architecture.md#redis-keys-and-channels.

Two implementations of IConnectionStore: ``memory`` (one instance) and
``redis``. Keys and values follow the spec (docs/spec.md):

    gateway:conn:{profileID}:{deviceID} -> JSON ConnectionMeta
    gateway:room:{roomID}               -> set of "profileID:deviceID"
    gateway:instance:{gatewayID}        -> JSON instance info

and, to coordinate gateways (ours, see chatgateway.store.redis):

    gateway:device:{profileID}:{deviceID} -> sorted set of device_entry(gateway, session), oldest first
    gateway:instance:{gatewayID}:conns    -> set of "profileID:deviceID" this gateway holds
    gateway:instance:{gatewayID}:rooms    -> set of room ids this gateway has joined connections to
    gateway:instances                     -> set of gateway ids (to find dead ones)
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any

from twisted.internet.defer import Deferred
from zope.interface import Attribute, Interface

if TYPE_CHECKING:
    from chatgateway.config import Config
    from chatgateway.telemetry.counts import GatewayCounts

# A device's connection in its list: (gateway_id, session_id).
DeviceSession = tuple[str, str]


def conn_key(profile_id: str, device_id: str) -> str:
    return f"gateway:conn:{profile_id}:{device_id}"


def room_key(room_id: str) -> str:
    return f"gateway:room:{room_id}"


def instance_key(gateway_id: str) -> str:
    return f"gateway:instance:{gateway_id}"


def instance_conns_key(gateway_id: str) -> str:
    return f"gateway:instance:{gateway_id}:conns"


def instance_rooms_key(gateway_id: str) -> str:
    return f"gateway:instance:{gateway_id}:rooms"


def device_key(profile_id: str, device_id: str) -> str:
    return f"gateway:device:{profile_id}:{device_id}"


INSTANCES_KEY = "gateway:instances"


def device_entry(gateway_id: str, session_id: str) -> str:
    """A member of a device's connection list: unambiguous whatever the ids contain."""
    return json.dumps([gateway_id, session_id], separators=(",", ":"))


def parse_device_entry(entry: str | bytes) -> DeviceSession:
    gateway_id, session_id = json.loads(entry)
    return gateway_id, session_id


def instance_info(gateway_id: str, info: Mapping[str, Any]) -> str:
    """The JSON of gateway:instance:{id}: {gateway_id, started, addresses, connections}."""
    return json.dumps({"gateway_id": gateway_id, **info}, separators=(",", ":"))


@dataclasses.dataclass
class ConnectionMeta:
    profile_id: str
    device_id: str
    room_ids: list[str]
    last_active: int
    last_heartbeat: int
    connected: int
    gateway_id: str

    @property
    def member(self) -> str:
        """This connection's entry in a room set."""
        return f"{self.profile_id}:{self.device_id}"

    def to_json(self) -> str:
        # The fields in their declared order, as dataclasses.asdict would give them, without
        # its deep copy (a third of the cost): this runs per connect and per heartbeat refresh.
        return json.dumps(
            {
                "profile_id": self.profile_id,
                "device_id": self.device_id,
                "room_ids": self.room_ids,
                "last_active": self.last_active,
                "last_heartbeat": self.last_heartbeat,
                "connected": self.connected,
                "gateway_id": self.gateway_id,
            },
            separators=(",", ":"),
        )


class IConnectionStore(Interface):
    ready = Attribute("True while the store answers (for /readyz).")

    def start() -> Deferred[None]:
        """Connect. Returns a Deferred."""

    def open_connection(meta: ConnectionMeta, session_id: str, limit: int) -> Deferred[list[DeviceSession]]:
        """A new connection: ``connected(meta)`` and ``claim_device`` for its session, in one step.

        Returns a Deferred firing with what ``claim_device`` returns.
        """

    def connected(meta: ConnectionMeta) -> Deferred[None]:
        """Write a new connection's metadata and room entries."""

    def rooms_changed(meta: ConnectionMeta, added: Iterable[str], removed: Iterable[str]) -> Deferred[None]:
        """A live connection joined ``added`` and left ``removed`` rooms."""

    def refresh(metas: Iterable[ConnectionMeta]) -> Deferred[None]:
        """Rewrite the metadata of live connections and renew their TTLs, in one batch."""

    def disconnected(meta: ConnectionMeta) -> Deferred[None]:
        """Remove a connection's metadata and room entries.

        When another gateway holds the device now (its gateway_id is in the
        metadata), its metadata and the rooms it lists are left alone.
        """

    def claim_device(
        profile_id: str, device_id: str, gateway_id: str, session_id: str, limit: int
    ) -> Deferred[list[DeviceSession]]:
        """Append this session to the device's connections, atomically across gateways.

        Returns a Deferred firing with the (gateway_id, session_id) pairs beyond
        ``limit``, oldest first, now removed from the list: close those (4001).
        """

    def release_device(profile_id: str, device_id: str, gateway_id: str, session_id: str) -> Deferred[None]:
        """Remove a closed session from its device's connections. Returns a Deferred."""

    def instance_alive(gateway_id: str, info: Mapping[str, Any]) -> Deferred[None]:
        """Renew this instance's registry entry; ``info`` is {started, addresses, connections}."""

    def instances() -> Deferred[list[dict[str, Any]]]:
        """Every live gateway's registry entry (the JSON of instance_info, with ``rooms``: how
        many rooms it has connections in), by gateway id.

        For the operator's status page (chatgateway.console.status), not for the hot path.
        """

    def reap_dead_instances(own_gateway_id: str) -> Deferred[list[str]]:
        """Clean up after gateways whose registry entry expired.

        Returns a Deferred firing with the ids of the gateways cleaned up.
        """

    def on_reconnect(callback: Callable[[], object]) -> None:
        """Call ``callback()`` when the store is back after writes may have been lost.

        The gateway then rewrites every live connection with ``open_connection``.
        """

    def stop() -> Deferred[None]:
        """Remove this instance's entry and disconnect. Returns a Deferred."""


def make_store(config: Config, reactor: Any, counts: GatewayCounts | None = None) -> IConnectionStore:
    """The store named by config.cache_uri; ``counts``: the GatewayCounts a Redis store counts its failed commands into."""
    if config.cache_uri == "memory://":
        from chatgateway.store.memory import MemoryStore

        return MemoryStore()
    from chatgateway.redisconn.uri import is_cluster

    if is_cluster(config.cache_uri):
        from chatgateway.store.cluster import ClusterStore

        return ClusterStore(config, reactor, counts=counts)
    from chatgateway.store.redis import RedisStore

    return RedisStore(config, reactor, counts=counts)
