"""Presence from leases: who is online, across gateways (docs/architecture.md#presence).

Each live connection holds a lease in its profile's sorted set, scored by when it lapses,
in milliseconds of the store's clock (Redis TIME: the gateways' clocks never matter):

    gateway:presence:{profileID}        ZSET lease member -> lapse time (ms)    EXPIRE rooms_ttl, renewed
    gateway:presence-rooms:{profileID}  SET of the rooms its connections were   the same
                                        in when they arrived (whom to tell)
    gateway:presence-index              ZSET profile id -> its earliest lapse   entries removed by the sweep
                                        (what the sweep reads)

A lease member is JSON ``[device_id, session_id]``. A connection that closes replaces its
lease by ``"~"`` + that JSON, lapsing PRESENCE_GRACE_SEC later: the profile stays online
through a reconnect within the grace (no offline/online pair, on any gateway), but the
device no longer counts as reachable for calls.

Every transition is decided inside one script, so two gateways never both announce it:

- ``arrive``: a lease added to a set with no live lease -> the profile came online.
- ``sweep`` (every gateway, every heartbeat): the profiles whose earliest lease lapsed lose
  their lapsed leases; one left with none went offline (its rooms set is read and deleted).
- ``renew`` (every heartbeat) pushes the live leases' lapse on; a lease that is gone (the
  store lost it, or it lapsed while the gateway could not renew it) is reported, and the
  gateway makes its connection arrive again.

So a device of a gateway that dies goes offline when its lease lapses plus at most one
sweep interval: within LEASE_HEARTBEATS + 1 heartbeat intervals.

Rooms to tell are the profile's rooms with at most ``max_room_size`` connected devices
(SCARD of gateway:room:{roomID}); the others get no presence events (docs/protocol.md#presence).
"""

from __future__ import annotations

import json
from typing import Any

from twisted.internet import defer
from zope.interface import Interface, implementer

from chatgateway.store import conn_key, room_key

CONN_PREFIX = conn_key("", "")[:-1]  # "gateway:conn:" + "profileID:deviceID"

# A lease lasts this many heartbeat intervals: two renewals in a row may be late or fail.
LEASE_HEARTBEATS = 3
# Profiles a sweep looks at per call (the rest wait for the next one).
SWEEP_BATCH = 200
# Leases renewed per script call.
RENEW_CHUNK = 500
# The presence keys outlive a lease by this much when nobody sweeps (every gateway gone).
KEY_TTL_SEC = 3600
DEPARTED = "~"
INDEX_KEY = "gateway:presence-index"


def presence_key(profile_id: str) -> str:
    return f"gateway:presence:{profile_id}"


def presence_rooms_key(profile_id: str) -> str:
    return f"gateway:presence-rooms:{profile_id}"


def lease_member(device_id: str, session_id: str) -> str:
    return json.dumps([device_id, session_id], separators=(",", ":"))


def lease_device(member: str) -> str | None:
    """The device of a live lease member; None for a departed one (or garbage)."""
    if member.startswith(DEPARTED):
        return None
    try:
        device_id, _ = json.loads(member)
    except (ValueError, TypeError):
        return None
    return device_id if isinstance(device_id, str) else None


_FUNCTIONS = """
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
local function tell(rooms, max_size, out)
  if max_size <= 0 then return out end
  for _, room in ipairs(rooms) do
    if redis.call('SCARD', 'gateway:room:' .. room) <= max_size then table.insert(out, room) end
  end
  return out
end
local function reindex(index, key, profile)
  local first = redis.call('ZRANGE', key, 0, 0, 'WITHSCORES')
  if first[2] then redis.call('ZADD', index, first[2], profile) else redis.call('ZREM', index, profile) end
end
"""

# KEYS: presence key, rooms key, index. ARGV: profile, member, lease ms, key TTL, max room size, room ids.
# Returns {1, rooms to tell...} when the profile came online, else {0}.
ARRIVE = (
    _FUNCTIONS
    + """
local now = now_ms()
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
local was = redis.call('ZCARD', KEYS[1])
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[3]), ARGV[2])
local rooms = {}
for i = 6, #ARGV do
  redis.call('SADD', KEYS[2], ARGV[i])
  table.insert(rooms, ARGV[i])
end
redis.call('EXPIRE', KEYS[1], ARGV[4])
if #rooms > 0 then redis.call('EXPIRE', KEYS[2], ARGV[4]) end
reindex(KEYS[3], KEYS[1], ARGV[1])
if was > 0 then return {0} end
return tell(rooms, tonumber(ARGV[5]), {1})
"""
)

# KEYS: presence key, index. ARGV: profile, member, grace ms.
DEPART = (
    _FUNCTIONS
    + """
if redis.call('ZREM', KEYS[1], ARGV[2]) == 1 then
  redis.call('ZADD', KEYS[1], now_ms() + tonumber(ARGV[3]), '~' .. ARGV[2])
end
reindex(KEYS[2], KEYS[1], ARGV[1])
return 1
"""
)

# KEYS: the presence key of each lease, then the index. ARGV: lease ms, key TTL, then each lease's
# profile and member. Returns the (1-based) numbers of the leases that were gone.
RENEW = (
    _FUNCTIONS
    + """
local now = now_ms()
local lapse, ttl, index = now + tonumber(ARGV[1]), ARGV[2], KEYS[#KEYS]
local gone = {}
for i = 1, #KEYS - 1 do
  local profile, member = ARGV[2 * i + 1], ARGV[2 * i + 2]
  local score = redis.call('ZSCORE', KEYS[i], member)
  if score and tonumber(score) > now then
    redis.call('ZADD', KEYS[i], lapse, member)
    redis.call('EXPIRE', KEYS[i], ttl)
    redis.call('EXPIRE', 'gateway:presence-rooms:' .. profile, ttl)
    reindex(index, KEYS[i], profile)
  else
    table.insert(gone, i)
  end
end
return gone
"""
)

# KEYS: index. ARGV: max room size, batch.
# Returns {profiles online (with a lease, live or in its grace), {profile, room to tell...}...}.
SWEEP = (
    _FUNCTIONS
    + """
local now = now_ms()
local offline = {}
for _, profile in ipairs(redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now, 'LIMIT', 0, tonumber(ARGV[2]))) do
  local key, rooms_key = 'gateway:presence:' .. profile, 'gateway:presence-rooms:' .. profile
  redis.call('ZREMRANGEBYSCORE', key, '-inf', now)
  if redis.call('ZCARD', key) == 0 then
    table.insert(offline, tell(redis.call('SMEMBERS', rooms_key), tonumber(ARGV[1]), {profile}))
    redis.call('DEL', key, rooms_key)
    redis.call('ZREM', KEYS[1], profile)
  else
    reindex(KEYS[1], key, profile)
  end
end
return {redis.call('ZCARD', KEYS[1]), offline}
"""
)

# KEYS: room key. ARGV: max room size.
# Returns {1, connected devices} above the size, else {0, online profiles...}.
ROOM = (
    _FUNCTIONS
    + """
local members = redis.call('SCARD', KEYS[1])
if members > tonumber(ARGV[1]) then return {1, members} end
local now = now_ms()
local seen, out = {}, {0}
for _, member in ipairs(redis.call('SMEMBERS', KEYS[1])) do
  local raw = redis.call('GET', 'gateway:conn:' .. member)
  local ok, meta = false, nil
  if raw then ok, meta = pcall(cjson.decode, raw) end
  if ok and type(meta) == 'table' and type(meta.profile_id) == 'string' and not seen[meta.profile_id] then
    seen[meta.profile_id] = true
    if redis.call('ZCOUNT', 'gateway:presence:' .. meta.profile_id, '(' .. now, '+inf') > 0 then
      table.insert(out, meta.profile_id)
    end
  end
end
return out
"""
)

# KEYS: presence key. Returns its live lease members.
DEVICES = (
    _FUNCTIONS
    + """
return redis.call('ZRANGEBYSCORE', KEYS[1], '(' .. now_ms(), '+inf')
"""
)


def _text(value: Any) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


class RoomPresence:
    """A room's online members: ``profile_ids`` (sorted), or None when only ``count`` is told
    (devices connected to a room above the size)."""

    def __init__(self, count: int, profile_ids: list[str] | None):
        self.count = count
        self.profile_ids = profile_ids


class Sweep:
    """What a sweep found: ``online`` profiles in all, ``offline``: [(profile id, rooms to tell)]."""

    def __init__(self, online: int, offline: list[tuple[str, list[str]]]):
        self.online = online
        self.offline = offline


class IPresenceLeases(Interface):
    """The leases of every gateway's connections, and the transitions they decide (the module docstring)."""

    def arrive(profile_id, device_id, session_id, rooms, lease_sec, max_room_size):
        """Take a connection's lease. Deferred: the rooms to tell if the profile came online, else None."""

    def depart(profile_id, device_id, session_id, grace_sec):
        """A connection closed: its lease becomes a departed one lapsing after ``grace_sec``."""

    def add_room(profile_id, room_id):
        """The profile joined ``room_id``: tell it too when the profile goes offline."""

    def renew(leases, lease_sec):
        """Renew [(profile id, device id, session id)]. Deferred: those that were gone (to arrive again)."""

    def sweep(max_room_size):
        """Drop lapsed leases. Deferred: a Sweep (profiles online, profiles gone offline with their rooms to tell)."""

    def room(room_id, max_room_size):
        """Deferred: the RoomPresence of a room."""

    def devices(profile_id):
        """Deferred: the set of the profile's devices with a live (not departed) lease."""


@implementer(IPresenceLeases)
class RedisPresence:
    """Leases in the store's Redis (through its RedisConnection: ``execute``/``eval``)."""

    def __init__(self, redis: Any):
        self.redis = redis

    def arrive(self, profile_id, device_id, session_id, rooms, lease_sec, max_room_size):
        """Deferred: the rooms to tell if the profile came online, else None."""
        keys = [presence_key(profile_id), presence_rooms_key(profile_id), INDEX_KEY]
        args = [profile_id, lease_member(device_id, session_id), _ms(lease_sec), KEY_TTL_SEC, max_room_size, *rooms]
        d = self.redis.eval(ARRIVE, keys, args)
        return d.addCallback(lambda reply: [_text(r) for r in reply[1:]] if int(reply[0]) else None)

    def depart(self, profile_id, device_id, session_id, grace_sec):
        keys = [presence_key(profile_id), INDEX_KEY]
        d = self.redis.eval(DEPART, keys, [profile_id, lease_member(device_id, session_id), _ms(grace_sec)])
        return d.addCallback(lambda _: None)

    def add_room(self, profile_id, room_id):
        """A profile with a lease joined a room: tell it too when the profile goes offline."""
        key = presence_rooms_key(profile_id)
        return self.redis.pipeline([("SADD", key, room_id), ("EXPIRE", key, KEY_TTL_SEC)]).addCallback(lambda _: None)

    def renew(self, leases, lease_sec):
        """``leases``: [(profile id, device id, session id)]. Deferred: the leases that were gone."""
        leases = list(leases)
        calls = []
        for start in range(0, len(leases), RENEW_CHUNK):
            chunk = leases[start : start + RENEW_CHUNK]
            keys = [presence_key(p) for p, _, _ in chunk] + [INDEX_KEY]
            args: list[Any] = [_ms(lease_sec), KEY_TTL_SEC]
            for profile_id, device_id, session_id in chunk:
                args += [profile_id, lease_member(device_id, session_id)]
            calls.append(self.redis.eval(RENEW, keys, args).addCallback(_gone_of, chunk))
        d = defer.gatherResults(calls, consumeErrors=True) if calls else defer.succeed([])
        return d.addCallback(lambda parts: [lease for part in parts for lease in part])

    def sweep(self, max_room_size):
        d = self.redis.eval(SWEEP, [INDEX_KEY], [max_room_size, SWEEP_BATCH])

        def parsed(reply):
            online, offline = reply
            return Sweep(int(online), [(_text(o[0]), [_text(r) for r in o[1:]]) for o in offline])

        return d.addCallback(parsed)

    def room(self, room_id, max_room_size):
        d = self.redis.eval(ROOM, [room_key(room_id)], [max_room_size])

        def parsed(reply):
            if int(reply[0]):
                return RoomPresence(int(reply[1]), None)
            profiles = sorted(_text(p) for p in reply[1:])
            return RoomPresence(len(profiles), profiles)

        return d.addCallback(parsed)

    def devices(self, profile_id):
        """Deferred: the set of the profile's devices with a live lease (connected now)."""
        d = self.redis.eval(DEVICES, [presence_key(profile_id)], [])
        return d.addCallback(lambda members: {d for d in (lease_device(_text(m)) for m in members) if d})


def _gone_of(numbers, chunk):
    return [chunk[int(i) - 1] for i in numbers or ()]


def _ms(seconds):
    return max(0, int(round(seconds * 1000)))


@implementer(IPresenceLeases)
class MemoryPresence:
    """The same leases in process, on ``clock``, beside a MemoryStore (its room sets and
    connection metadata); the state lives on the store so every gateway of the process shares it."""

    def __init__(self, store: Any, clock: Any):
        self.store = store
        self.clock = clock
        if not hasattr(store, "presence_leases"):
            store.presence_leases = {}  # profile -> {member: lapse (seconds)}
            store.presence_rooms = {}  # profile -> set of room ids
        self.leases = store.presence_leases
        self.rooms = store.presence_rooms

    def _live(self, profile_id, now):
        leases = self.leases.get(profile_id, {})
        for member in [m for m, lapse in leases.items() if lapse <= now]:
            del leases[member]
        return leases

    def _tell(self, rooms, max_room_size):
        if max_room_size <= 0:
            return []
        return sorted(r for r in rooms if len(self.store.sets.get(room_key(r), ())) <= max_room_size)

    def arrive(self, profile_id, device_id, session_id, rooms, lease_sec, max_room_size):
        now = self.clock.seconds()
        leases = self._live(profile_id, now)
        was = len(leases)
        leases[lease_member(device_id, session_id)] = now + lease_sec
        self.leases[profile_id] = leases
        self.rooms.setdefault(profile_id, set()).update(rooms)
        return defer.succeed(None if was else self._tell(rooms, max_room_size))

    def depart(self, profile_id, device_id, session_id, grace_sec):
        leases = self.leases.get(profile_id, {})
        member = lease_member(device_id, session_id)
        if leases.pop(member, None) is not None:
            leases[DEPARTED + member] = self.clock.seconds() + grace_sec
        return defer.succeed(None)

    def add_room(self, profile_id, room_id):
        if profile_id in self.leases:
            self.rooms.setdefault(profile_id, set()).add(room_id)
        return defer.succeed(None)

    def renew(self, leases, lease_sec):
        now = self.clock.seconds()
        gone = []
        for lease in leases:
            profile_id, device_id, session_id = lease
            held = self.leases.get(profile_id, {})
            member = lease_member(device_id, session_id)
            if held.get(member, 0) > now:
                held[member] = now + lease_sec
            else:
                gone.append(lease)
        return defer.succeed(gone)

    def sweep(self, max_room_size):
        now = self.clock.seconds()
        offline = []
        for profile_id in sorted(self.leases):
            if not self._live(profile_id, now):
                del self.leases[profile_id]
                offline.append((profile_id, self._tell(self.rooms.pop(profile_id, ()), max_room_size)))
        return defer.succeed(Sweep(len(self.leases), offline))

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


def make_presence(store: Any, clock: Any) -> RedisPresence | MemoryPresence:
    """The presence leases beside ``store``: in its Redis, or in process beside a MemoryStore."""
    redis = getattr(store, "redis", None)
    if redis is not None:
        return RedisPresence(redis)
    return MemoryPresence(store, clock)
