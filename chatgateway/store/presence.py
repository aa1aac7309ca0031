"""Presence from leases: who is online, across gateways (docs/architecture.md#presence).

Each live connection holds a lease in its profile's sorted set. A live lease lasts as long
as its gateway's registration, the TTL'd ``gateway:instance:{gatewayID}`` key the gateway
renews every heartbeat (chatgateway.store.redis): nothing per connection is written while
it stays connected. A closed connection's lease is replaced by a departed one, lapsing
PRESENCE_GRACE_SEC later (milliseconds of Redis TIME, so the gateways' clocks never matter):

    gateway:presence:{profileID}          ZSET lease member -> +inf (live) or its lapse (ms)
    gateway:presence-rooms:{profileID}    SET of the rooms to tell when the profile goes offline
    gateway:presence-gw:{holder}          SET of JSON [profileID, member]: a holder's live leases
    gateway:presence-gateways             SET of the holders of live leases
    gateway:presence-index                ZSET profile id -> its earliest finite lapse (the sweep's work)
    gateway:presence-online               SET of the profiles online (for the metric)
    gateway:presence-reaped:{holder}      a mark: another gateway lapsed its leases

A holder is JSON ``[gatewayID, incarnation]``: one gateway process (a gateway restarted with
the same GATEWAY_ID is another incarnation, and lapses the leases of its earlier one).

Each is emptied by the sweep (a gateway that comes back cleans up after those that died),
and expires KEY_TTL_SEC after it was last written or renewed, so nothing is left behind
when no gateway is. A lease member is JSON ``[device_id, session_id]``, ``"~"`` + that when
departed: the profile stays online through a reconnect within the grace (no offline/online
pair, on any gateway), but the device no longer counts as reachable for calls.

Every transition is decided inside one script, so two gateways never both announce it:

- ``arrive``: a lease added to a set with no unlapsed lease -> the profile came online.
- ``sweep`` (every gateway, every heartbeat): the live leases of each gateway whose
  registration has expired lapse at once; then the profiles whose earliest lapse is past
  lose their lapsed leases, and one left with none went offline (its rooms set is read and
  deleted).

So the devices of a gateway that dies go offline once its registration expires, max(10 s,
3 × HEARTBEAT_INTERVAL_SEC), plus at most one sweep interval. A gateway is never its own
sweep's victim; one that was only late (a reactor stalled past its registration's TTL)
finds the mark its reaper left, and takes its leases again. A gateway whose leases were
lost (Redis restarted empty) takes them again when the store tells it to rewrite its
connections (``arrive`` is idempotent).

Rooms to tell are the profile's rooms with at most ``max_room_size`` connected devices
(SCARD of gateway:room:{roomID}); the others get no presence events (docs/protocol.md#presence).
"""

from __future__ import annotations

import json
import math
from typing import Any

from twisted.internet import defer
from zope.interface import Interface, implementer

from chatgateway.store import conn_key, room_key
from chatgateway.store.cluster import ClusterStore
from chatgateway.store.gcra import is_cluster_uri

CONN_PREFIX = conn_key("", "")[:-1]  # "gateway:conn:" + "profileID:deviceID"
# Of a dead gateway's leases, and of the profiles due, what one sweep handles (the rest: the next).
SWEEP_BATCH = 500
# Every key expires this long after it was last written or renewed: Redis never fills with
# leftovers, even when no gateway is left to sweep. Live connections renew their keys every
# KEY_TTL_SEC / 3 (``renew``: a script per RENEW_CHUNK, a few times a day).
KEY_TTL_SEC = 86400
RENEW_CHUNK = 500
DEPARTED = "~"
INDEX_KEY = "gateway:presence-index"
GATEWAYS_KEY = "gateway:presence-gateways"
ONLINE_KEY = "gateway:presence-online"


def presence_key(profile_id: str) -> str:
    return f"gateway:presence:{profile_id}"


def presence_rooms_key(profile_id: str) -> str:
    return f"gateway:presence-rooms:{profile_id}"


def holder(gateway_id: str, incarnation: str) -> str:
    """Who holds a lease: one process of a gateway."""
    return json.dumps([gateway_id, incarnation], separators=(",", ":"))


def holder_leases_key(holder: str) -> str:
    return f"gateway:presence-gw:{holder}"


def lease_member(device_id: str, session_id: str) -> str:
    return json.dumps([device_id, session_id], separators=(",", ":"))


def gateway_entry(profile_id: str, member: str) -> str:
    return json.dumps([profile_id, member], separators=(",", ":"))


def lease_device(member: str) -> str | None:
    """The device of a live lease member; None for a departed one (or garbage)."""
    if member.startswith(DEPARTED):
        return None
    try:
        device_id, _ = json.loads(member)
    except (ValueError, TypeError):
        return None
    return device_id if isinstance(device_id, str) else None


def offline_bound_sec(heartbeat_interval_sec: float) -> float:
    """Longest a device of a dead gateway stays online: its registration's TTL, then one sweep."""
    return max(10, math.ceil(3 * heartbeat_interval_sec)) + heartbeat_interval_sec


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
"""

# KEYS: presence key, rooms key, the holder's leases, the holders set, the online set.
# ARGV: profile, member, holder, holder's entry, max room size, key TTL, room ids.
# Returns {1, rooms to tell...} when the profile came online, else {0}.
ARRIVE = (
    _FUNCTIONS
    + """
local ttl = ARGV[6]
local was = redis.call('ZCOUNT', KEYS[1], '(' .. now_ms(), '+inf')
redis.call('ZADD', KEYS[1], '+inf', ARGV[2])
redis.call('SADD', KEYS[3], ARGV[4])
redis.call('SADD', KEYS[4], ARGV[3])
redis.call('SADD', KEYS[5], ARGV[1])
local rooms = {}
for i = 7, #ARGV do
  redis.call('SADD', KEYS[2], ARGV[i])
  table.insert(rooms, ARGV[i])
end
for i = 1, 5 do redis.call('EXPIRE', KEYS[i], ttl) end
if was > 0 then return {0} end
return tell(rooms, tonumber(ARGV[5]), {1})
"""
)

# KEYS: presence key, the holder's leases, index. ARGV: profile, member, grace ms, holder's entry, key TTL.
DEPART = (
    _FUNCTIONS
    + """
if redis.call('ZREM', KEYS[1], ARGV[2]) == 1 then
  local lapse = now_ms() + tonumber(ARGV[3])
  redis.call('ZADD', KEYS[1], lapse, '~' .. ARGV[2])
  redis.call('ZADD', KEYS[3], 'LT', lapse, ARGV[1])
  redis.call('EXPIRE', KEYS[1], ARGV[5])  -- a new key when that was its last member
  redis.call('EXPIRE', KEYS[3], ARGV[5])
end
redis.call('SREM', KEYS[2], ARGV[4])
return 1
"""
)

# KEYS: index, holders set, online set. ARGV: max room size, batch, the sweeping holder, key TTL.
# Returns {profiles online, {{profile, room to tell...}...}, 1 if the sweeping holder's own
# leases were lapsed by another gateway (its registration had expired: it takes them again)}.
SWEEP = (
    _FUNCTIONS
    + """
local now, batch, own, ttl = now_ms(), tonumber(ARGV[2]), ARGV[3], ARGV[4]
local own_gateway = cjson.decode(own)[1]
local reaped = redis.call('DEL', 'gateway:presence-reaped:' .. own)
for i = 1, 3 do redis.call('EXPIRE', KEYS[i], ttl) end
redis.call('EXPIRE', 'gateway:presence-gw:' .. own, ttl)
for _, holder in ipairs(redis.call('SMEMBERS', KEYS[2])) do
  local ok, pair = pcall(cjson.decode, holder)
  local gateway = ok and type(pair) == 'table' and pair[1] or nil
  local dead = false
  if holder ~= own and gateway == own_gateway then
    dead = true  -- an earlier incarnation of the sweeping gateway
  elseif holder ~= own and (type(gateway) ~= 'string' or redis.call('EXISTS', 'gateway:instance:' .. gateway) == 0) then
    dead = true
    redis.call('SET', 'gateway:presence-reaped:' .. holder, '1', 'EX', ttl)
  end
  if dead then
    local leases = 'gateway:presence-gw:' .. holder
    for _, entry in ipairs(redis.call('SPOP', leases, batch)) do
      local ok, pair = pcall(cjson.decode, entry)
      if ok and type(pair) == 'table' and type(pair[1]) == 'string' and type(pair[2]) == 'string' then
        local key = 'gateway:presence:' .. pair[1]
        if redis.call('ZSCORE', key, pair[2]) then
          redis.call('ZADD', key, now - 1, pair[2])
          redis.call('ZADD', KEYS[1], 'LT', now - 1, pair[1])
        end
      end
    end
    if redis.call('SCARD', leases) == 0 then redis.call('SREM', KEYS[2], holder) end
  end
end
local offline = {}
for _, profile in ipairs(redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now, 'LIMIT', 0, batch)) do
  local key, rooms_key = 'gateway:presence:' .. profile, 'gateway:presence-rooms:' .. profile
  redis.call('ZREMRANGEBYSCORE', key, '-inf', now)
  local first = redis.call('ZRANGE', key, 0, 0, 'WITHSCORES')
  if not first[2] then
    table.insert(offline, tell(redis.call('SMEMBERS', rooms_key), tonumber(ARGV[1]), {profile}))
    redis.call('DEL', key, rooms_key)
    redis.call('ZREM', KEYS[1], profile)
    redis.call('SREM', KEYS[3], profile)
  elseif first[2] == 'inf' then
    redis.call('ZREM', KEYS[1], profile)
  else
    redis.call('ZADD', KEYS[1], first[2], profile)
  end
end
return {redis.call('SCARD', KEYS[3]), offline, reaped}
"""
)

# KEYS: the presence and rooms keys of the leases of live connections. ARGV: key TTL.
RENEW = """
for i = 1, #KEYS do redis.call('EXPIRE', KEYS[i], ARGV[1]) end
"""

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

# KEYS: presence key. Returns its unlapsed lease members.
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
    """What a sweep found: ``online`` profiles in all, ``offline``: [(profile id, rooms to tell)];
    ``reaped``: the sweeping gateway's own leases were lapsed by another gateway."""

    def __init__(self, online: int, offline: list[tuple[str, list[str]]], reaped: bool = False):
        self.online = online
        self.offline = offline
        self.reaped = reaped


class IPresenceLeases(Interface):
    """The leases of every gateway's connections, and the transitions they decide (the module docstring)."""

    def arrive(profile_id, device_id, session_id, holder, rooms, max_room_size):
        """Take a connection's lease (again: idempotent). Deferred: the rooms to tell if the
        profile came online, else None."""

    def depart(profile_id, device_id, session_id, holder, grace_sec):
        """A connection closed: its lease becomes a departed one lapsing after ``grace_sec``."""

    def add_room(profile_id, room_id):
        """The profile joined ``room_id``: tell it too when the profile goes offline."""

    def remove_room(profile_id, room_id):
        """The profile left ``room_id``: it is no longer told of the profile."""

    def renew(profile_ids):
        """Renew the TTL of these profiles' keys (their connections are live here)."""

    def sweep(max_room_size, holder):
        """By ``holder`` (this process): lapse the leases of dead holders, drop lapsed ones. Deferred: a Sweep."""

    def room(room_id, max_room_size):
        """Deferred: the RoomPresence of a room (PresenceUnavailable: presence is not kept)."""

    def devices(profile_id):
        """Deferred: the set of the profile's devices with a live (not departed) lease (None: not known)."""


@implementer(IPresenceLeases)
class RedisPresence:
    """Leases in the store's Redis (through its RedisConnection)."""

    def __init__(self, redis: Any):
        self.redis = redis

    def arrive(self, profile_id, device_id, session_id, holder, rooms, max_room_size):
        member = lease_member(device_id, session_id)
        keys = [
            presence_key(profile_id),
            presence_rooms_key(profile_id),
            holder_leases_key(holder),
            GATEWAYS_KEY,
            ONLINE_KEY,
        ]
        args = [profile_id, member, holder, gateway_entry(profile_id, member), max_room_size, KEY_TTL_SEC, *rooms]
        d = self.redis.eval(ARRIVE, keys, args)
        return d.addCallback(lambda reply: [_text(r) for r in reply[1:]] if int(reply[0]) else None)

    def depart(self, profile_id, device_id, session_id, holder, grace_sec):
        member = lease_member(device_id, session_id)
        keys = [presence_key(profile_id), holder_leases_key(holder), INDEX_KEY]
        args = [profile_id, member, max(0, round(grace_sec * 1000)), gateway_entry(profile_id, member), KEY_TTL_SEC]
        return self.redis.eval(DEPART, keys, args).addCallback(lambda _: None)

    def add_room(self, profile_id, room_id):
        return self.redis.execute("SADD", presence_rooms_key(profile_id), room_id).addCallback(lambda _: None)

    def remove_room(self, profile_id, room_id):
        return self.redis.execute("SREM", presence_rooms_key(profile_id), room_id).addCallback(lambda _: None)

    def renew(self, profile_ids):
        keys = sorted({k for p in profile_ids for k in (presence_key(p), presence_rooms_key(p))})
        calls = [
            self.redis.eval(RENEW, keys[i : i + RENEW_CHUNK], [KEY_TTL_SEC]) for i in range(0, len(keys), RENEW_CHUNK)
        ]
        return defer.gatherResults(calls, consumeErrors=True).addCallback(lambda _: None)

    def sweep(self, max_room_size, holder):
        keys = [INDEX_KEY, GATEWAYS_KEY, ONLINE_KEY]
        d = self.redis.eval(SWEEP, keys, [max_room_size, SWEEP_BATCH, holder, KEY_TTL_SEC])

        def parsed(reply):
            online, offline, reaped = reply
            return Sweep(int(online), [(_text(o[0]), [_text(r) for r in o[1:]]) for o in offline], bool(reaped))

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
        d = self.redis.eval(DEVICES, [presence_key(profile_id)], [])
        return d.addCallback(lambda members: {d for d in (lease_device(_text(m)) for m in members) if d})


class PresenceUnavailable(Exception):
    """Presence cannot be answered with this store (a Redis Cluster)."""


@implementer(IPresenceLeases)
class NoPresence:
    """On a Redis Cluster: no leases, no transitions, room queries refused.

    The scripts above read a room's set and the gateways' registrations, keys in other
    slots than the leases', which a cluster refuses in one script; presence on a cluster
    is not built (docs/operations.md#redis-cluster). Connects and delivery are unaffected;
    ``devices`` answers None (not known), so call signals are relayed without the check."""

    reason = "presence is not available on a Redis Cluster (docs/operations.md#redis-cluster)"

    def arrive(self, profile_id, device_id, session_id, holder, rooms, max_room_size):
        return defer.succeed(None)

    def depart(self, profile_id, device_id, session_id, holder, grace_sec):
        return defer.succeed(None)

    def add_room(self, profile_id, room_id):
        return defer.succeed(None)

    def remove_room(self, profile_id, room_id):
        return defer.succeed(None)

    def renew(self, profile_ids):
        return defer.succeed(None)

    def sweep(self, max_room_size, holder):
        return defer.succeed(Sweep(0, []))

    def room(self, room_id, max_room_size):
        return defer.fail(PresenceUnavailable(self.reason))

    def devices(self, profile_id):
        return defer.succeed(None)


def make_presence(store: Any, clock: Any, uri: str = "") -> Any:
    """The presence leases beside ``store`` (whose URI is ``uri``): in its Redis, in process
    beside a MemoryStore, or none on a Redis Cluster (NoPresence)."""
    if isinstance(store, ClusterStore) or is_cluster_uri(uri):
        return NoPresence()
    redis = getattr(store, "redis", None)
    if redis is None:
        from chatgateway.store.memorypresence import MemoryPresence

        return MemoryPresence(store, clock)
    return RedisPresence(redis)
