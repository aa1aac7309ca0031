"""Connection metadata in Redis, shared by every gateway instance.

The contract: docs/architecture.md#redis-keys-and-channels.

Keys (the three of the spec, docs/spec.md, then ours):

    gateway:conn:{profileID}:{deviceID}    JSON ConnectionMeta (7 fields)    TTL 2 × CONNECTION_TIMEOUT_SEC
    gateway:room:{roomID}                  SET of "profileID:deviceID"       same TTL, renewed
    gateway:instance:{gatewayID}           JSON {gateway_id, started,        max(10 s, 3 × HEARTBEAT_INTERVAL_SEC)
                                           addresses, connections}
    gateway:device:{profileID}:{deviceID}  ZSET of ["gatewayID","sessionID"]  same TTL as conn, renewed
                                           scored 1, 2, 3… (oldest first): MAX_CONNECTIONS_PER_DEVICE
                                           across gateways, claimed atomically in one script
    gateway:instance:{gatewayID}:conns     SET of "profileID:deviceID" the   registry TTL, renewed by
                                           gateway holds                     instance_alive
    gateway:instance:{gatewayID}:rooms     SET of the room ids it has added  registry TTL, renewed by
                                           connections to (a superset)       instance_alive
    gateway:instances                      SET of gateway ids                registry TTL, renewed by
                                                                             instance_alive
    gateway:reap:{gatewayID}               reaper lock (SET NX EX)           REAP_LOCK_SEC

The last four let any gateway clean up after a dead one: for each id in
gateway:instances whose instance key has expired, it removes the dead
gateway's members from its rooms (SINTER of each room with :conns, so no
room is scanned in full), deletes the conn keys and device entries that are
still the dead gateway's (a device may have moved to another gateway
meanwhile: those are left alone), then forgets the id. Rooms are found
through :rooms, not through the conn keys, because those may have expired
first: a room that other connections keep renewing would otherwise keep the
dead members for ever. The registry TTL, max(conn TTL, REGISTRY_MIN_TTL_SEC),
only matters once nobody renews them, i.e. when no gateway is left to reap.

Why the other TTLs: a connection's keys outlive it by at most 2 ×
CONNECTION_TIMEOUT_SEC even if every gateway dies (docs/operations.md#faults).
An instance key lapses within a few heartbeats of its gateway
dying, so another gateway cleans up after it about as fast. Everything
expires once nobody renews it: Redis never fills with leftovers.

Writes per heartbeat. ``refresh`` is called once per heartbeat interval with
every live connection. It rewrites the conn keys (SET … EX, one write per
connection) on every other call, so ``last_heartbeat``/``last_active`` in
Redis lag by at most two intervals while the key (TTL = 2 ×
CONNECTION_TIMEOUT_SEC, at least twice the interval) never lapses. The room
and device keys are renewed on every ``renew_every``-th call, de-duplicated
across the batch (a room shared by 1,000 local connections costs one
EXPIRE), where

    renew_every = max(1, floor(TTL / (3 × HEARTBEAT_INTERVAL_SEC)))

so a key is renewed at least every TTL/3: two renewals in a row may fail (or
be late) and the key still does not lapse; a failed rewrite or renewal is
retried at the next call. With the defaults (TTL 600 s, heartbeat 30 s) that
is: per connection and heartbeat, 1/2 + (devices + distinct rooms) /
(6 × connections) writes on average, about 0.7 with one device per profile.

Every operation is one pipeline or one script: connected, rooms_changed,
instance_alive are pipelines; refresh is a script per 500 keys (REWRITE,
RENEW); disconnected, claim_device and the reaper are Lua scripts, because they decide on what they read (who owns the
device now) and must not race with another gateway. open_connection, what a
gateway calls for each new connection, is connected and claim_device in one
script: one command (and one reply) per connect instead of eight, which is
what a connect storm costs the gateway's reactor in Redis calls.

Redis: 6.2 or later (tested with 7.0). The commands used (SET EX/NX, ZADD,
SPOP with a count inside a script, EVALSHA) need 5.0 (script effects
replication); ACL user names in the URI need 6.0. A Redis Cluster: the same
keys through chatgateway.store.cluster, which splits the scripts that span slots.

Memory per connection, measured on Redis 7.0 (one device in one room of its
own, ids of 10-20 characters, 10,000 connections): MEMORY USAGE gives 312 bytes
for the conn key, 216 for the room set, 168 for the device list and ~76 in the
gateway's :conns set, ~770 bytes; used_memory grows ~990 bytes per connection
(key tables and expiry entries included). Rooms shared by many connections
cost ~70 bytes per extra member; :rooms ~70 bytes per distinct room per gateway.
"""

import json
import math

from twisted.internet import defer
from twisted.logger import Logger
from zope.interface import implementer

from chatgateway.redisconn.connection import REDIS_TIMEOUT_SEC, RedisConnection, all_replies
from chatgateway.redisconn.tls import TLSSettings
from chatgateway.redisconn.uri import parse_uri
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

# One gateway cleans up after a dead one; the lock lapses if that gateway dies too.
REAP_LOCK_SEC = 30
# Connections (or rooms) of a dead gateway cleaned per script call, so Redis is never blocked for long.
REAP_BATCH = 500
# The registry sets outlive a full outage by this much, so gateways coming back still clean up.
REGISTRY_MIN_TTL_SEC = 3600


def reap_lock_key(gateway_id):
    return f"gateway:reap:{gateway_id}"


# KEYS: conn key, this gateway's conns set, the room keys of ARGV[3..]
# ARGV: gateway id, "profileID:deviceID", room ids
DISCONNECT = """
local keep = {}
local raw = redis.call('GET', KEYS[1])
local ok, owner = false, nil
if raw then ok, owner = pcall(cjson.decode, raw) end
if ok and type(owner) == 'table' and owner.gateway_id ~= ARGV[1] then
  if type(owner.room_ids) == 'table' then
    for _, room in ipairs(owner.room_ids) do keep[room] = true end
  end
else
  redis.call('DEL', KEYS[1])
end
for i = 3, #ARGV do
  if not keep[ARGV[i]] then redis.call('SREM', KEYS[i], ARGV[2]) end
end
redis.call('SREM', KEYS[2], ARGV[2])
return 1
"""

# Appends entry to a device's list (once); returns the entries beyond limit, oldest first, now removed.
_CLAIM_FUNCTION = """
local function claim(key, entry, limit, ttl)
  if not redis.call('ZSCORE', key, entry) then
    local newest = redis.call('ZRANGE', key, -1, -1, 'WITHSCORES')
    local score = 1
    if newest[2] then score = tonumber(newest[2]) + 1 end
    redis.call('ZADD', key, score, entry)
  end
  local excess = redis.call('ZCARD', key) - tonumber(limit)
  local evicted = {}
  if excess > 0 then
    evicted = redis.call('ZRANGE', key, 0, excess - 1)
    redis.call('ZREMRANGEBYRANK', key, 0, excess - 1)
  end
  redis.call('EXPIRE', key, ttl)
  return evicted
end
"""

# KEYS: device key. ARGV: entry, limit, ttl. Returns the entries evicted, oldest first.
CLAIM = _CLAIM_FUNCTION + "return claim(KEYS[1], ARGV[1], ARGV[2], ARGV[3])\n"

# A new connection in one step: what ``connected`` writes, then ``claim_device``.
# KEYS: conn key, device key, this gateway's conns set, its rooms set, the room keys of ARGV[7..]
# ARGV: metadata JSON, conn TTL, registry TTL, "profileID:deviceID", device entry, limit, room ids
# Returns the device entries evicted, oldest first.
OPEN = (
    _CLAIM_FUNCTION
    + """
local ttl, registry_ttl, member = ARGV[2], ARGV[3], ARGV[4]
redis.call('SET', KEYS[1], ARGV[1], 'EX', ttl)
for i = 5, #KEYS do
  redis.call('SADD', KEYS[i], member)
  redis.call('EXPIRE', KEYS[i], ttl)
  redis.call('SADD', KEYS[4], ARGV[i + 2])
end
if #KEYS > 4 then redis.call('EXPIRE', KEYS[4], registry_ttl) end
redis.call('SADD', KEYS[3], member)
redis.call('EXPIRE', KEYS[3], registry_ttl)
return claim(KEYS[2], ARGV[5], ARGV[6], ttl)
"""
)

# A heartbeat's writes, a script per REFRESH_CHUNK keys: through txredisapi each command
# costs the reactor ~30 us (a Deferred, a reply slot, its encoding), so a refresh of
# 20,000 connections as single commands held the reactor for over a second.
REFRESH_CHUNK = 500
# KEYS: conn keys. ARGV: TTL, then each key's metadata JSON.
REWRITE = """
local ttl = ARGV[1]
for i = 1, #KEYS do redis.call('SET', KEYS[i], ARGV[i + 1], 'EX', ttl) end
"""
# KEYS: room and device keys. ARGV: TTL.
RENEW = """
for i = 1, #KEYS do redis.call('EXPIRE', KEYS[i], ARGV[1]) end
"""


def _chunks(items, size):
    return [items[i : i + size] for i in range(0, len(items), size)]


# KEYS: instance key, its conns set, its rooms set, the instances set. ARGV: gateway id, batch size.
# Rooms first (they need :conns), then connections, a batch per call.
# Returns -1 if the gateway is alive after all or already reaped, else how much is left to clean.
REAP = """
if redis.call('EXISTS', KEYS[1]) == 1 or redis.call('SISMEMBER', KEYS[4], ARGV[1]) == 0 then return -1 end
local gateway, batch = ARGV[1], tonumber(ARGV[2])
-- the stored metadata of a connection: nil if none, {} if unreadable
local function meta_of(member)
  local raw = redis.call('GET', 'gateway:conn:' .. member)
  if not raw then return nil end
  local ok, meta = pcall(cjson.decode, raw)
  if ok and type(meta) == 'table' then return meta end
  return {}
end
local function held_elsewhere(meta)
  return meta ~= nil and meta.gateway_id ~= nil and meta.gateway_id ~= gateway
end
local rooms = redis.call('SPOP', KEYS[3], batch)
for _, room in ipairs(rooms) do
  local rk = 'gateway:room:' .. room
  for _, member in ipairs(redis.call('SINTER', rk, KEYS[2])) do
    if not held_elsewhere(meta_of(member)) then redis.call('SREM', rk, member) end
  end
end
if #rooms == 0 then
  for _, member in ipairs(redis.call('SPOP', KEYS[2], batch)) do
    local meta = meta_of(member)
    if meta ~= nil and not held_elsewhere(meta) then
      redis.call('DEL', 'gateway:conn:' .. member)
      if type(meta.room_ids) == 'table' then
        for _, room in ipairs(meta.room_ids) do redis.call('SREM', 'gateway:room:' .. room, member) end
      end
    end
    local dk = 'gateway:device:' .. member
    for _, entry in ipairs(redis.call('ZRANGE', dk, 0, -1)) do
      local ok, pair = pcall(cjson.decode, entry)
      if ok and type(pair) == 'table' and pair[1] == gateway then redis.call('ZREM', dk, entry) end
    end
  end
end
local left = redis.call('SCARD', KEYS[3]) + redis.call('SCARD', KEYS[2])
if left == 0 then redis.call('SREM', KEYS[4], gateway) end
return left
"""

# KEYS: instance key, its conns set, its rooms set, the instances set. ARGV: gateway id.
# A gateway that stops with connections still listed leaves them to the reaper.
STOP = """
redis.call('DEL', KEYS[1])
if redis.call('SCARD', KEYS[2]) == 0 then
  redis.call('DEL', KEYS[3])
  redis.call('SREM', KEYS[4], ARGV[1])
end
return 1
"""


@implementer(IConnectionStore)
class RedisStore:
    log = Logger()

    def __init__(self, config, reactor, clock=None, timeout=REDIS_TIMEOUT_SEC, instance_ttl_sec=None, counts=None):
        self.config = config
        self.conn_ttl = max(1, math.ceil(2 * config.connection_timeout_sec))
        self.instance_ttl = instance_ttl_sec or max(10, math.ceil(3 * config.heartbeat_interval_sec))
        self.registry_ttl = max(self.conn_ttl, REGISTRY_MIN_TTL_SEC)
        self.renew_every = max(1, math.floor(self.conn_ttl / (3 * config.heartbeat_interval_sec)))
        self._refreshes = 0
        self._renew_next = True
        self._rewrite_next = True
        self._own = {config.gateway_id}
        self._reconnect_callbacks = []
        self.redis = self._connection(config, reactor, timeout, clock, counts)
        self.redis.on_ready(self._back)

    def _connection(self, config, reactor, timeout, clock, counts):
        address = parse_uri(config.cache_uri, TLSSettings.of(config))
        return RedisConnection(address, reactor, "store", timeout=timeout, clock=clock, counts=counts)

    @property
    def ready(self):
        return self.redis.ready

    def start(self):
        """Connect in the background: a Redis that is down does not hold up the start."""
        self.redis.start()
        return defer.succeed(None)

    def stop(self):
        return defer.ensureDeferred(self._stop())

    def on_reconnect(self, callback):
        self._reconnect_callbacks.append(callback)

    # ------------------------------------------------------------ connections

    def open_connection(self, meta, session_id, limit):
        """``connected`` and ``claim_device`` in one script: one command per connect instead of eight."""
        keys = [
            conn_key(meta.profile_id, meta.device_id),
            device_key(meta.profile_id, meta.device_id),
            instance_conns_key(meta.gateway_id),
            instance_rooms_key(meta.gateway_id),
            *(room_key(room_id) for room_id in meta.room_ids),
        ]
        args = [
            meta.to_json(),
            self.conn_ttl,
            self.registry_ttl,
            meta.member,
            device_entry(meta.gateway_id, session_id),
            limit,
            *meta.room_ids,
        ]
        d = self.redis.eval(OPEN, keys, args)
        return d.addCallback(lambda evicted: [parse_device_entry(e) for e in evicted or ()])

    def connected(self, meta):
        conns = instance_conns_key(meta.gateway_id)
        commands = [("SADD", conns, meta.member), ("EXPIRE", conns, self.registry_ttl)]
        return self._write(self._joined(meta, meta.room_ids) + commands)

    def rooms_changed(self, meta, added, removed):
        commands = [("SREM", room_key(room_id), meta.member) for room_id in removed]
        return self._write(self._joined(meta, added) + commands)

    def _joined(self, meta, room_ids):
        """Write the metadata and add the connection to ``room_ids`` (and to this gateway's rooms)."""
        member, ttl = meta.member, self.conn_ttl
        commands = [("SET", conn_key(meta.profile_id, meta.device_id), meta.to_json(), "EX", ttl)]
        for room_id in room_ids:
            commands += [("SADD", room_key(room_id), member), ("EXPIRE", room_key(room_id), ttl)]
        if room_ids:
            rooms = instance_rooms_key(meta.gateway_id)
            commands += [("SADD", rooms, *room_ids), ("EXPIRE", rooms, self.registry_ttl)]
        return commands

    def refresh(self, metas):
        """One SET per connection; room and device TTLs every ``renew_every`` calls (module docstring)."""
        ttl = self.conn_ttl
        rewrite = self._rewrite_next or self._refreshes % 2 == 0
        renew = self._renew_next or self._refreshes % self.renew_every == 0
        self._refreshes += 1
        rewritten = metas if rewrite else []
        renewed = []
        if renew:
            devices = {device_key(m.profile_id, m.device_id) for m in metas}
            rooms = {room_key(room_id) for m in metas for room_id in m.room_ids}
            renewed = sorted(devices | rooms)
        if not rewritten and not renewed:
            return defer.succeed(None)
        self._rewrite_next = self._renew_next = False
        d = self._send_refresh(rewritten, renewed, ttl)
        d.addCallback(lambda _: None)
        d.addErrback(self._refresh_failed, rewrite, renew)
        return d

    def _send_refresh(self, metas, renewed, ttl):
        """Rewrite the conn keys of ``metas`` and renew the keys ``renewed``: a script per REFRESH_CHUNK keys."""
        calls = []
        for chunk in _chunks(metas, REFRESH_CHUNK):
            keys = [conn_key(m.profile_id, m.device_id) for m in chunk]
            calls.append((REWRITE, keys, [ttl, *(m.to_json() for m in chunk)]))
        calls += [(RENEW, keys, [ttl]) for keys in _chunks(renewed, REFRESH_CHUNK)]
        return all_replies([self.redis.eval(*call) for call in calls])

    def _refresh_failed(self, failure, rewrite, renew):
        self._rewrite_next = self._rewrite_next or rewrite
        self._renew_next = self._renew_next or renew
        return failure

    def disconnected(self, meta):
        keys = [conn_key(meta.profile_id, meta.device_id), instance_conns_key(meta.gateway_id)]
        keys += [room_key(room_id) for room_id in meta.room_ids]
        d = self.redis.eval(DISCONNECT, keys, [meta.gateway_id, meta.member, *meta.room_ids])
        return d.addCallback(lambda _: None)

    # ------------------------------------------------------------ devices

    def claim_device(self, profile_id, device_id, gateway_id, session_id, limit):
        d = self.redis.eval(
            CLAIM, [device_key(profile_id, device_id)], [device_entry(gateway_id, session_id), limit, self.conn_ttl]
        )
        return d.addCallback(lambda evicted: [parse_device_entry(e) for e in evicted or ()])

    def release_device(self, profile_id, device_id, gateway_id, session_id):
        d = self.redis.execute("ZREM", device_key(profile_id, device_id), device_entry(gateway_id, session_id))
        return d.addCallback(lambda _: None)

    # ------------------------------------------------------------ instances

    def instance_alive(self, gateway_id, info):
        self._own.add(gateway_id)
        ttl = self.registry_ttl
        return self._write(
            [
                ("SET", instance_key(gateway_id), instance_info(gateway_id, info), "EX", self.instance_ttl),
                ("SADD", INSTANCES_KEY, gateway_id),
                ("EXPIRE", INSTANCES_KEY, ttl),
                ("EXPIRE", instance_conns_key(gateway_id), ttl),
                ("EXPIRE", instance_rooms_key(gateway_id), ttl),
            ]
        )

    def instances(self):
        return defer.ensureDeferred(self._instances())

    async def _instances(self):
        ids = sorted(await self.redis.execute("SMEMBERS", INSTANCES_KEY))
        if not ids:
            return []
        entries = await self.redis.execute("MGET", *(instance_key(g) for g in ids))
        rooms = await self.redis.pipeline([("SCARD", instance_rooms_key(g)) for g in ids])
        found = []
        for entry, room_count in zip(entries, rooms, strict=True):
            if entry is None:
                continue  # expired: a dead gateway, not yet reaped
            try:
                found.append({**json.loads(entry), "rooms": room_count})
            except ValueError:
                self.log.warn("unreadable instance entry {entry!r}", entry=entry[:100])
        return found

    def reap_dead_instances(self, own_gateway_id):
        return defer.ensureDeferred(self._reap_dead_instances(own_gateway_id))

    async def _reap_dead_instances(self, own_gateway_id):
        others = sorted(g for g in await self.redis.execute("SMEMBERS", INSTANCES_KEY) if g != own_gateway_id)
        if not others:
            return []
        alive = await self.redis.pipeline([("EXISTS", instance_key(g)) for g in others])
        reaped = []
        for gateway_id in (g for g, exists in zip(others, alive, strict=True) if not exists):
            lock = reap_lock_key(gateway_id)
            if await self.redis.execute("SET", lock, own_gateway_id, "NX", "EX", REAP_LOCK_SEC) is None:
                continue  # another gateway is on it
            try:
                left = None
                while left != 0 and left != -1:
                    left = await self._reap_batch(gateway_id)
                if left == 0:
                    reaped.append(gateway_id)
                    self.log.info(
                        "cleaned up after gateway {gateway_id}, whose registration expired", gateway_id=gateway_id
                    )
            finally:
                await self.redis.execute("DEL", lock)
        return reaped

    # ------------------------------------------------------------ internals

    def _reap_batch(self, gateway_id):
        """Clean up a batch after dead ``gateway_id``: -1 if alive or done already, else what is left."""
        return self.redis.eval(REAP, self._registry_keys(gateway_id), [gateway_id, REAP_BATCH])

    def _unregister(self, gateway_id):
        return self.redis.eval(STOP, self._registry_keys(gateway_id), [gateway_id])

    def _registry_keys(self, gateway_id):
        return [instance_key(gateway_id), instance_conns_key(gateway_id), instance_rooms_key(gateway_id), INSTANCES_KEY]

    def _write(self, commands):
        return self.redis.pipeline(commands).addCallback(lambda _: None)

    def _back(self, resync):
        """Connection ready again; if writes may have been lost, tell whoever rewrites them."""
        if not resync:
            return
        for callback in list(self._reconnect_callbacks):
            try:
                callback()
            except Exception:
                self.log.failure("store on_reconnect callback failed")

    async def _stop(self):
        if self.redis.ready:
            try:
                await defer.gatherResults(
                    [defer.ensureDeferred(self._unregister(g)) for g in sorted(self._own)],
                    consumeErrors=True,
                )
            except Exception as e:
                error = e.subFailure.getErrorMessage() if isinstance(e, defer.FirstError) else str(e)
                self.log.warn("could not remove this instance's registration ({error}); it will expire", error=error)
        await self.redis.stop()
