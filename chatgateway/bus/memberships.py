"""The membership cache and the publish contract of membership changes.

The contract: docs/architecture.md#positions-publish-contract-membership-cache.

A profile's room ids are cached where its membership changes are published (the
events Redis of EVENTS_URI, or the process's MemoryHub), because the change must
update the cache in the same atomic step as its PUBLISH. In Redis:

    gateway:memberships:{profileID}          SET of room ids and the marker ""    MEMBERSHIP_CACHE_TTL_SEC from
                                             (cached, even with no room)            the core's answer, never renewed
    gateway:memberships:{profileID}:version  counter, bumped by every change       VERSION_TTL_SEC, renewed by
                                                                                    every change and every miss

Three scripts:

- READ (a connect): the cached set; on a miss, the version too (created and renewed).
- WRITE (after the core answered a miss): the set with its TTL, only if the version is
  still the one READ gave: a change published while the core was asked means the
  core's answer may predate it, and writing it would resurrect a removed membership.
- CHANGE, the publish contract: bump the version, add or remove the room in the set
  if it is cached, PUBLISH the serialized ServerEvent on ``chat:profile:{profileID}``.

A core that publishes membership changes follows the contract by running CHANGE
(``change_call`` gives its script, keys and arguments; ``publish_change`` runs it
through any ``eval(script, keys, args)``; ``publish_event`` and ``publish_payload``
choose between it and a plain PUBLISH on an IEventBus). With redis-py::

    script, keys, args = memberships.change_call(profile_id, room_id, change, payload)
    r.eval(script, len(keys), *keys, *args)

On a Redis Cluster (``cluster=True``) the keys carry the hash tag of the profile's
channel, ``gateway:memberships:{chat:profile:ID}`` and ``…:version``, so the keys and
the channel share one slot, and CHANGE publishes with SPUBLISH (sharded pub/sub) on
that slot's primary: docs/operations.md#redis-cluster.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

from chatgateway.api import chat_pb2 as pb
from chatgateway.api import codec
from chatgateway.bus import IEventBus, channels
from chatgateway.redisconn.slots import tag_of

# Marks a cached set: present even when the profile has no room (room ids are never empty).
MARKER = ""
# A version outlives any miss in flight by far (a call to the core lasts seconds): a version
# that expired and restarted at 0 while a gateway asked the core could match a stale answer.
VERSION_TTL_SEC = 86400
# Room ids per SADD in WRITE (Lua's unpack is limited to a few thousand values).
SADD_CHUNK = 1000

Change = pb.SubscriptionEvent.Change
# How CHANGE patches the set for each kind of change ("": it does not; a role changed).
PATCH: dict[int, str] = {Change.ADDED: "+", Change.REMOVED: "-"}


class Cached(NamedTuple):
    """What READ gives: the cached room ids (None: not cached) and, on a miss, the version
    to write the core's answer under (None: not to be written)."""

    rooms: list[str] | None
    version: str | None


def key(profile_id: str, cluster: bool = False) -> str:
    if cluster:
        return f"gateway:memberships:{tag_of(channels.profile(profile_id))}"
    return f"gateway:memberships:{profile_id}"


def version_key(profile_id: str, cluster: bool = False) -> str:
    return key(profile_id, cluster) + ":version"


# KEYS: set, version. ARGV: version TTL.
# Returns {1, room...} when cached, else {0, version}.
READ = """
local members = redis.call('SMEMBERS', KEYS[1])
if #members > 0 then
  table.insert(members, 1, 1)
  return members
end
local version = redis.call('GET', KEYS[2])
if version then
  redis.call('EXPIRE', KEYS[2], ARGV[1])
else
  version = '0'
  redis.call('SET', KEYS[2], version, 'EX', ARGV[1])
end
return {0, version}
"""

# KEYS: set, version. ARGV: the version READ gave, TTL, room ids.
# Returns 1 when written, 0 when a change came first.
WRITE = f"""
if (redis.call('GET', KEYS[2]) or '0') ~= ARGV[1] then return 0 end
redis.call('DEL', KEYS[1])
redis.call('SADD', KEYS[1], '')
for i = 3, #ARGV, {SADD_CHUNK} do
  redis.call('SADD', KEYS[1], unpack(ARGV, i, math.min(i + {SADD_CHUNK - 1}, #ARGV)))
end
redis.call('EXPIRE', KEYS[1], ARGV[2])
return 1
"""

# The publish contract of a membership change.
# KEYS: set, version. ARGV: channel, payload, patch ("+", "-" or ""), room id, version TTL,
# and on a cluster "SPUBLISH". Returns what PUBLISH returns (the subscribers reached).
CHANGE = """
redis.call('INCR', KEYS[2])
redis.call('EXPIRE', KEYS[2], ARGV[5])
if ARGV[3] ~= '' and redis.call('EXISTS', KEYS[1]) == 1 then
  if ARGV[3] == '+' then
    redis.call('SADD', KEYS[1], ARGV[4])
  else
    redis.call('SREM', KEYS[1], ARGV[4])
  end
end
return redis.call(ARGV[6] or 'PUBLISH', ARGV[1], ARGV[2])
"""


def read_call(profile_id: str, cluster: bool = False) -> tuple[str, list[str], list[Any]]:
    return READ, [key(profile_id, cluster), version_key(profile_id, cluster)], [VERSION_TTL_SEC]


def parse_read(reply: Sequence[Any]) -> Cached:
    """READ's reply (bytes or text, as the connection decodes it) as a Cached."""
    values = [v.decode("utf-8") if isinstance(v, bytes) else v for v in reply]
    if int(values[0]) == 1:
        return Cached(sorted(room for room in values[1:] if room != MARKER), None)
    return Cached(None, str(values[1]))


def write_call(
    profile_id: str, rooms: Sequence[str], version: str, ttl: float, cluster: bool = False
) -> tuple[str, list[str], list[Any]]:
    args: list[Any] = [version, max(1, round(ttl)), *(room for room in rooms if room != MARKER)]
    return WRITE, [key(profile_id, cluster), version_key(profile_id, cluster)], args


def change_call(
    profile_id: str, room_id: str, change: int, payload: bytes, cluster: bool = False
) -> tuple[str, list[str], list[Any]]:
    """CHANGE's script, keys and arguments for ``change`` (a SubscriptionEvent.Change) of
    ``profile_id``'s membership of ``room_id``, published as ``payload`` (a serialized ServerEvent)."""
    args = [channels.profile(profile_id), payload, PATCH.get(change, ""), room_id, VERSION_TTL_SEC]
    if cluster:
        args.append("SPUBLISH")
    return CHANGE, [key(profile_id, cluster), version_key(profile_id, cluster)], args


def publish_change(
    eval: Callable[[str, list[str], list[Any]], Any],
    profile_id: str,
    room_id: str,
    change: int,
    payload: bytes,
    cluster: bool = False,
) -> Any:
    """Publish a membership change by the contract through ``eval(script, keys, args)``
    (chatgateway.redisconn.connection.RedisConnection.eval, or an adapter of another client)."""
    return eval(*change_call(profile_id, room_id, change, payload, cluster))


def publish_event(bus: IEventBus, channel: str, event: pb.ServerEvent, payload: bytes | None = None) -> Any:
    """Publish ``event`` (serialized: ``payload``) on ``channel`` by the contract: a membership
    change on its profile's channel through ``bus.publish_membership`` (the cache is updated in
    the same step), anything else with a plain publish. Returns the bus's Deferred."""
    if payload is None:
        payload = event.SerializeToString()
    if event.HasField("subscription_event"):
        change = event.subscription_event
        if channel == channels.profile(change.profile_id):
            return bus.publish_membership(change.profile_id, change.room_id, change.change, payload)
    return bus.publish(channel, payload)


def publish_payload(bus: IEventBus, channel: str, payload: bytes) -> Any:
    """``publish_event`` for a serialized ServerEvent (parsed only on a profile channel)."""
    if channel.startswith(channels.profile("")):
        event = codec.parse_server_event(payload)
        if event is None:
            return bus.publish(channel, payload)
        return publish_event(bus, channel, event, payload)
    return bus.publish(channel, payload)
