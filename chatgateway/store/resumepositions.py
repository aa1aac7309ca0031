"""Each device's last positions, kept server-side for a resume (docs/architecture.md#resume).

Key ``gateway:resume:{profileID}:{deviceID}`` on the store's Redis (CACHE_URI): a HASH of
room id -> ``epoch:offset``, the furthest position delivered to, or acknowledged by, the
device in each room, or where its session started in it (``:0`` for a room that had no
event yet); its TTL RESUME_POSITIONS_TTL_SEC is renewed by every write, so a
device away longer than that resumes from its token or explicit positions only.

A write never moves a room back within its epoch (two gateways may write for one device:
the one it left flushes at the disconnect, the one it reached at its heartbeat), and a
position of another epoch replaces the old one (the room's stream was lost: its offsets
started again). One script writes many devices (SAVE), in chunks, so the heartbeat's
batch is a few commands. The in-process store (CACHE_URI=memory://) keeps the same
records in a dict, with the same TTL on the gateway's clock.
"""

from twisted.internet import defer
from zope.interface import Attribute, Interface, implementer

# Devices written per SAVE script.
SAVE_CHUNK = 200

# KEYS: the devices' record keys. ARGV: TTL, then for each key: n, then n x (room, epoch, offset).
SAVE = """
local ttl = ARGV[1]
local at = 2
for k = 1, #KEYS do
  local key = KEYS[k]
  local n = tonumber(ARGV[at])
  at = at + 1
  for _ = 1, n do
    local room, epoch, offset = ARGV[at], ARGV[at + 1], tonumber(ARGV[at + 2])
    at = at + 3
    local old = redis.call('HGET', key, room)
    local keep = false
    if old then
      local sep = string.find(old, ':', 1, true)
      if sep and string.sub(old, 1, sep - 1) == epoch and tonumber(string.sub(old, sep + 1)) >= offset then
        keep = true
      end
      if epoch == '' then keep = true end  -- before the room's first event: never replaces one
    end
    if not keep then redis.call('HSET', key, room, epoch .. ':' .. ARGV[at - 1]) end
  end
  redis.call('EXPIRE', key, ttl)
end
return #KEYS
"""


def resume_key(profile_id, device_id):
    return f"gateway:resume:{profile_id}:{device_id}"


def parse_record(fields):
    """A HASH's {room: "epoch:offset"} (a dict, or HGETALL's flat list) as {room: (epoch, offset)};
    unreadable entries are skipped."""
    if isinstance(fields, (list, tuple)):
        fields = dict(zip(fields[::2], fields[1::2], strict=False))
    record = {}
    for room, value in fields.items():
        if isinstance(room, bytes):
            room = room.decode("utf-8", "replace")
        if isinstance(value, bytes):
            value = value.decode("utf-8", "replace")
        epoch, sep, offset = str(value).rpartition(":")
        if sep and offset.isdigit():
            record[room] = (epoch, int(offset))
    return record


def merged(old, new):
    """The position a record keeps of ``old`` and ``new``: the furthest within one epoch, else
    the newer; ``new`` without an epoch (before the room's first event) never replaces one."""
    if old is not None and (old[0] == new[0] and old[1] >= new[1] or not new[0]):
        return old
    return new


class IResumePositions(Interface):
    ttl_sec = Attribute("How long a device's record lives after its last write.")

    def save(records):
        """Write ``records``: {(profile_id, device_id): {room_id: (epoch, offset)}}, in one batch.
        Returns a Deferred."""

    def load(profile_id, device_id):
        """A Deferred firing with the device's record, {room_id: (epoch, offset)} ({} if none)."""


@implementer(IResumePositions)
class MemoryResumePositions:
    def __init__(self, ttl_sec, clock):
        self.ttl_sec = ttl_sec
        self._clock = clock
        self.records = {}  # record key -> ({room: (epoch, offset)}, expires at)

    def save(self, records):
        now = self._clock.seconds()
        for (profile_id, device_id), positions in records.items():
            key = resume_key(profile_id, device_id)
            record, expires = self.records.get(key, ({}, 0))
            if expires <= now:
                record = {}
            for room, position in positions.items():
                record[room] = merged(record.get(room), position)
            self.records[key] = (record, now + self.ttl_sec)
        return defer.succeed(None)

    def load(self, profile_id, device_id):
        record, expires = self.records.get(resume_key(profile_id, device_id), ({}, 0))
        return defer.succeed(dict(record) if expires > self._clock.seconds() else {})


@implementer(IResumePositions)
class RedisResumePositions:
    """On ``redis`` (a chatgateway.redisconn.connection.RedisConnection: the store's)."""

    def __init__(self, redis, ttl_sec):
        self.ttl_sec = ttl_sec
        self._redis = redis

    def save(self, records):
        items = [(resume_key(p, d), positions) for (p, d), positions in records.items() if positions]
        # On a Redis Cluster a script's keys must share a slot and these (one per device) do
        # not: one script per device there (chatgateway.redisconn.cluster).
        chunk = 1 if hasattr(self._redis, "slot_of") else SAVE_CHUNK
        sent = []
        for start in range(0, len(items), chunk):
            keys, args = [], [max(1, int(self.ttl_sec))]
            for key, positions in items[start : start + chunk]:
                keys.append(key)
                args.append(len(positions))
                for room, (epoch, offset) in positions.items():
                    args.extend((room, epoch, offset))
            sent.append(self._redis.eval(SAVE, keys, args))
        return defer.gatherResults(sent, consumeErrors=True).addCallback(lambda _: None)

    def load(self, profile_id, device_id):
        d = self._redis.execute("HGETALL", resume_key(profile_id, device_id))
        return d.addCallback(lambda fields: parse_record(fields or {}))


def make_resume_positions(store, ttl_sec, clock):
    """The records beside ``store``: on its Redis, or in process for the in-memory store (one
    set of records per store, so gateways sharing a store in one process share them)."""
    redis = getattr(store, "redis", None)
    if redis is not None:
        return RedisResumePositions(redis, ttl_sec)
    records = getattr(store, "resume_positions", None)
    if records is None:
        records = store.resume_positions = MemoryResumePositions(ttl_sec, clock)
    return records
