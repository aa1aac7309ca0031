"""Positions of room events and the publish contract of room events.

The contract: docs/architecture.md#positions-and-the-room-stream.

Every room event but typing has a position in its room, (epoch, offset): the offset
goes up by one per event; the epoch names the room's stream and changes only when
the stream was lost (its keys gone: Redis flushed or restarted empty). Publishing a
room event is one script on the events Redis (PUBLISH_ROOM):

    chat:position:{roomID}   HASH epoch, offset (the last one given)    no TTL (a lost epoch voids positions)
    chat:stream:{roomID}     STREAM, entry id "{offset}-0",              ROOM_STREAM_MAX_LEN entries (about),
                             fields t (ms) and e (the event)             ROOM_STREAM_MAX_AGE_SEC; an idle room's
                                                                          stream expires after the age

It creates the epoch if missing (with a new stream: the old one belongs to a lost
epoch), INCRs the offset, APPENDS the position to the serialized ServerEvent (fields
11 and 12 encoded after the rest: protobuf keeps the last occurrence of a scalar
field, so the result is a plain ServerEvent with its position), adds it to the
stream, trims the stream by size and age, and PUBLISHes it on ``chat:room:{roomID}``.

A gateway that sees a gap in a room's offsets reads the stream after its last
offset (READ_ROOM), once per room, not per device (chatgateway.sessions.positions).

Typing events are ephemeral: published with a plain PUBLISH, no position, never in
the stream (``keeps``). Another core follows the contract by running PUBLISH_ROOM
(``publish_call`` gives its script, keys and arguments; ``publish_room_event`` runs it
through any ``eval(script, keys, args)``). With redis-py::

    script, keys, args = roomstream.publish_call(room_id, payload)
    r.eval(script, len(keys), *keys, *args)

On a Redis Cluster (``cluster=True``) the keys carry the hash tag of the room's
channel, ``chat:position:{chat:room:ID}`` and ``chat:stream:{chat:room:ID}``, so both
keys and the channel share one slot, and PUBLISH_ROOM publishes with SPUBLISH
(sharded pub/sub) on that slot's primary: docs/operations.md#redis-cluster.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

from chatgateway.api import chat_pb2 as pb
from chatgateway.api import codec
from chatgateway.bus import IEventBus, channels, memberships
from chatgateway.redisconn.slots import tag_of

MAX_LEN = 1000  # the defaults of ROOM_STREAM_MAX_LEN and ROOM_STREAM_MAX_AGE_SEC
MAX_AGE_SEC = 86400.0
# Entries per READ_ROOM (a gap longer than this is read in several).
READ_CHUNK = 500


class StreamRead(NamedTuple):
    """What READ_ROOM gives: the room's epoch ("" when it has none), its last offset, and
    the entries read, (offset, serialized ServerEvent with its position), in order."""

    epoch: str
    top: int
    events: list[tuple[int, bytes]]


def position_key(room_id: str, cluster: bool = False) -> str:
    return f"chat:position:{tag_of(channels.room(room_id)) if cluster else room_id}"


def stream_key(room_id: str, cluster: bool = False) -> str:
    return f"chat:stream:{tag_of(channels.room(room_id)) if cluster else room_id}"


def keeps(event: pb.ServerEvent) -> bool:
    """Whether a room event gets a position (and a place in the stream): all but typing."""
    return not event.HasField("typing_event")


def new_epoch() -> str:
    return uuid.uuid4().hex[:16]


def _varint(n: int) -> bytes:
    out = bytearray()
    while n >= 0x80:
        out.append(n & 0x7F | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def position_suffix(epoch: str, offset: int) -> bytes:
    """The bytes PUBLISH_ROOM appends to a serialized ServerEvent: fields 11 (epoch) and 12 (offset)."""
    raw = epoch.encode("ascii")
    return b"\x5a" + _varint(len(raw)) + raw + b"\x60" + _varint(offset)


# KEYS: position hash, stream. ARGV: channel, payload, a new epoch (used if the room has
# none), max len, max age (ms), and on a cluster "SPUBLISH". Tags: 90 = field 11 (epoch),
# length-delimited; 96 = field 12 (offset), varint. Returns {offset, epoch, subscribers reached}.
PUBLISH_ROOM = """
local epoch = redis.call('HGET', KEYS[1], 'epoch')
if not epoch then
  epoch = ARGV[3]
  redis.call('DEL', KEYS[2])
  redis.call('HSET', KEYS[1], 'epoch', epoch, 'offset', 0)
end
local offset = redis.call('HINCRBY', KEYS[1], 'offset', 1)
local function varint(n)
  local out = {}
  while n >= 128 do
    out[#out + 1] = string.char(n % 128 + 128)
    n = math.floor(n / 128)
  end
  out[#out + 1] = string.char(n)
  return table.concat(out)
end
local event = ARGV[2] .. '\\90' .. varint(#epoch) .. epoch .. '\\96' .. varint(offset)
local now = redis.call('TIME')
local ms = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[4], string.format('%.0f-0', offset), 't', ms, 'e', event)
local cutoff = ms - tonumber(ARGV[5])
for _, entry in ipairs(redis.call('XRANGE', KEYS[2], '-', '+', 'COUNT', 2)) do
  if tonumber(entry[2][2]) >= cutoff then break end
  redis.call('XDEL', KEYS[2], entry[1])
end
redis.call('PEXPIRE', KEYS[2], ARGV[5])
return {offset, epoch, redis.call(ARGV[6] or 'PUBLISH', ARGV[1], event)}
"""

# KEYS: position hash, stream. ARGV: the offset to read after, how many.
# Returns {epoch or "", last offset, id, event, id, event...}.
READ_ROOM = """
local position = redis.call('HMGET', KEYS[1], 'epoch', 'offset')
local reply = {position[1] or '', position[2] or '0'}
local start = string.format('%.0f-0', tonumber(ARGV[1]) + 1)
for _, entry in ipairs(redis.call('XRANGE', KEYS[2], start, '+', 'COUNT', ARGV[2])) do
  reply[#reply + 1] = entry[1]
  reply[#reply + 1] = entry[2][4]
end
return reply
"""


def publish_call(
    room_id: str,
    payload: bytes,
    max_len: int = MAX_LEN,
    max_age_sec: float = MAX_AGE_SEC,
    epoch: str | None = None,
    cluster: bool = False,
) -> tuple[str, list[str], list[Any]]:
    """PUBLISH_ROOM's script, keys and arguments for ``payload`` (a serialized ServerEvent) in ``room_id``."""
    args = [channels.room(room_id), payload, epoch or new_epoch(), max_len, max(1, round(max_age_sec * 1000))]
    if cluster:
        args.append("SPUBLISH")
    return PUBLISH_ROOM, [position_key(room_id, cluster), stream_key(room_id, cluster)], args


def publish_room_event(
    eval: Callable[[str, list[str], list[Any]], Any],
    room_id: str,
    payload: bytes,
    max_len: int = MAX_LEN,
    max_age_sec: float = MAX_AGE_SEC,
    cluster: bool = False,
) -> Any:
    """Publish a room event by the contract through ``eval(script, keys, args)``
    (chatgateway.redisconn.connection.RedisConnection.eval, or an adapter of another client)."""
    return eval(*publish_call(room_id, payload, max_len, max_age_sec, cluster=cluster))


def parse_published(reply: Sequence[Any]) -> tuple[str, int]:
    """PUBLISH_ROOM's reply as the position it gave, (epoch, offset)."""
    epoch = reply[1].decode("ascii", "replace") if isinstance(reply[1], bytes) else str(reply[1])
    return epoch, int(reply[0])


def read_call(
    room_id: str, after: int, count: int = READ_CHUNK, cluster: bool = False
) -> tuple[str, list[str], list[Any]]:
    return READ_ROOM, [position_key(room_id, cluster), stream_key(room_id, cluster)], [after, count]


def parse_read(reply: Sequence[Any]) -> StreamRead:
    """READ_ROOM's reply (from a binary connection) as a StreamRead."""
    epoch = reply[0].decode("ascii", "replace") if isinstance(reply[0], bytes) else str(reply[0] or "")
    events = []
    for i in range(2, len(reply) - 1, 2):
        entry_id = reply[i].decode("ascii") if isinstance(reply[i], bytes) else str(reply[i])
        events.append((int(entry_id.partition("-")[0]), bytes(reply[i + 1])))
    return StreamRead(epoch, int(reply[1] or 0), events)


def publish_event(bus: IEventBus, channel: str, event: pb.ServerEvent, payload: bytes | None = None) -> Any:
    """Publish ``event`` (serialized: ``payload``) on ``channel`` by the contracts: a room event
    that keeps a position through ``bus.publish_room_event``, a membership change through
    ``bus.publish_membership`` (chatgateway.bus.memberships), anything else with a plain
    publish. Returns the bus's Deferred."""
    if payload is None:
        payload = event.SerializeToString()
    room_id = _room_of(channel)
    if room_id is not None and keeps(event):
        return bus.publish_room_event(room_id, payload)
    return memberships.publish_event(bus, channel, event, payload)


def publish_payload(bus: IEventBus, channel: str, payload: bytes) -> Any:
    """``publish_event`` for a serialized ServerEvent (parsed only on room and profile channels)."""
    if _room_of(channel) is None:
        return memberships.publish_payload(bus, channel, payload)
    event = codec.parse_server_event(payload)
    if event is None:
        return bus.publish(channel, payload)
    return publish_event(bus, channel, event, payload)


_ROOM_PREFIX = channels.room("")


def _room_of(channel: str) -> str | None:
    return channel[len(_ROOM_PREFIX) :] if channel.startswith(_ROOM_PREFIX) else None
