"""The event bus: channels of serialized ServerEvents between cores and gateways.

Two implementations of IEventBus: ``memory`` (one process, the embedded
default) and ``redis`` (many instances). A bus hands every message of the
channels it is subscribed to to one receiver, ``receiver(channel, payload)``.
It also keeps the membership cache, which the publish of a membership change
updates in the same step (chatgateway.bus.memberships), and each room's stream,
to which the publish of a room event appends it with its position
(chatgateway.bus.roomstream).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, Any

from twisted.internet.defer import Deferred
from zope.interface import Attribute, Interface

if TYPE_CHECKING:
    from chatgateway.bus.memberships import Cached
    from chatgateway.bus.roomstream import StreamRead
    from chatgateway.config import Config
    from chatgateway.telemetry.counts import GatewayCounts

# Where a bus delivers: receiver(channel, payload), a serialized ServerEvent.
Receiver = Callable[[str, bytes], object]


class IEventBus(Interface):
    ready = Attribute("True while the bus can deliver (for /readyz).")

    def start(receiver: Receiver, batch: Callable[[], AbstractContextManager[object]] | None = None) -> None:
        """Begin delivering messages of subscribed channels to receiver(channel, payload).

        ``batch``: messages that arrive together (one read of a Redis connection) are
        delivered inside one ``with batch():`` (the gateway's cork, sessions.corking).
        """

    def subscribe(channel: str) -> Deferred[None]:
        """Receive this channel's messages. Returns a Deferred."""

    def unsubscribe(channel: str) -> Deferred[None]:
        """Stop receiving this channel's messages. Returns a Deferred."""

    def publish(channel: str, payload: bytes) -> Deferred[None]:
        """Send bytes to every subscriber of channel. Returns a Deferred."""

    def publish_membership(profile_id: str, room_id: str, change: int, payload: bytes) -> Deferred[None]:
        """Publish a membership change (a serialized ServerEvent with a SubscriptionEvent) on the
        profile's channel by the contract: the cached memberships are updated in the same step
        (chatgateway.bus.memberships)."""

    def publish_room_event(room_id: str, payload: bytes) -> Deferred[tuple[str, int]]:
        """Publish a room event (a serialized ServerEvent, not typing) by the contract: it gets
        the room's next position and a place in the room's stream (chatgateway.bus.roomstream).
        Fires with that position, (epoch, offset): the reference core stores it with the event."""

    def read_room_stream(room_id: str, after: int, count: int) -> Deferred[StreamRead]:
        """Up to ``count`` events of the room's stream after offset ``after``, with the room's
        epoch and last offset (chatgateway.bus.roomstream.StreamRead)."""

    def cached_memberships(profile_id: str) -> Deferred[Cached]:
        """The profile's cached room ids, or (on a miss) the version to cache the core's answer under."""

    def cache_memberships(profile_id: str, rooms: Sequence[str], version: str, ttl: float) -> Deferred[bool]:
        """Cache the core's answer for ``ttl`` seconds, unless a change was published since the
        read that gave ``version``. Fires with whether it was written."""

    def stop() -> Deferred[None]:
        """Release connections. Returns a Deferred."""

    def on_reconnect(callback: Callable[[], object]) -> None:
        """Call ``callback()`` when delivery resumes after messages may have been missed."""


def make_bus(config: Config, reactor: Any, hub: Any = None, counts: GatewayCounts | None = None) -> IEventBus:
    """The bus named by config.events_uri; ``hub`` shares one in-memory bus in a process.

    ``counts``: the GatewayCounts a Redis bus counts its failed commands into.
    """
    if config.events_uri == "memory://":
        from chatgateway.bus.memory import MemoryBus

        bus = MemoryBus(hub)
        bus.hub.streams.limit(config.room_stream_max_len, config.room_stream_max_age_sec)
        return bus
    from chatgateway.redisconn.uri import is_cluster

    if is_cluster(config.events_uri):
        from chatgateway.bus.cluster import ClusterBus

        return ClusterBus(config, reactor, counts=counts)
    from chatgateway.bus.redis import RedisBus

    return RedisBus(config, reactor, counts=counts)
