"""Connection metadata on a Redis Cluster: the same keys as chatgateway.store.redis.

The spec's keys stay as they are, ``gateway:conn:{profileID}:{deviceID}`` and
``gateway:room:{roomID}`` (the braces there name fields: the keys carry no hash tag),
so each key hashes by its whole name and the keys of one connection are spread over
the cluster. A script may only touch keys of one slot, so what chatgateway.store.redis
does in one script is done here as commands routed per key (ClusterConnection
splits a batch by node, one write per node):

- a connect: the writes of ``connected`` as one batch, and the device claim (CLAIM,
  one key: still atomic, so MAX_CONNECTIONS_PER_DEVICE holds across gateways);
- a heartbeat's refresh: SET … EX and EXPIRE per key instead of a script per 500 keys;
- a disconnect: RELEASE_CONN on the conn key alone decides whether the connection is
  still ours (deleting its key) or which rooms its new owner holds, then the SREMs;
- a stop and the clean-up after a dead gateway: their commands one by one, deciding
  here on what they read (the same rules as STOP and REAP).

What is lost against one Redis: atomicity across those keys. A connect that fails
half-way leaves keys that expire (TTL) or are rewritten on the next heartbeat; a
clean-up racing a device that reconnects to another gateway re-checks the conn key
just before each removal, so the window is one round trip, not the whole clean-up.
"""

import json

from twisted.internet import defer

from chatgateway.redisconn.cluster import ClusterConnection
from chatgateway.redisconn.connection import all_replies
from chatgateway.redisconn.tls import TLSSettings
from chatgateway.redisconn.uri import parse_uri
from chatgateway.store import (
    INSTANCES_KEY,
    conn_key,
    instance_conns_key,
    instance_key,
    instance_rooms_key,
    room_key,
)
from chatgateway.store.redis import REAP_BATCH, RedisStore

# KEYS: conn key. ARGV: gateway id. Deletes the key if the connection is still this
# gateway's (or unreadable) and returns nil; else returns the JSON of the room ids its
# new owner holds (those must keep the member).
RELEASE_CONN = """
local raw = redis.call('GET', KEYS[1])
local ok, owner = false, nil
if raw then ok, owner = pcall(cjson.decode, raw) end
if ok and type(owner) == 'table' and owner.gateway_id ~= ARGV[1] then
  if type(owner.room_ids) == 'table' and #owner.room_ids > 0 then return cjson.encode(owner.room_ids) end
  return '[]'
end
redis.call('DEL', KEYS[1])
return false
"""


def _meta(raw):
    """A conn key's value: None if missing, {} if unreadable, else its dict."""
    if raw is None:
        return None
    try:
        meta = json.loads(raw)
    except ValueError:
        return {}
    return meta if isinstance(meta, dict) else {}


def _held_elsewhere(meta, gateway_id):
    return meta is not None and meta.get("gateway_id") is not None and meta.get("gateway_id") != gateway_id


class ClusterStore(RedisStore):
    def _connection(self, config, reactor, timeout, clock, counts):
        address = parse_uri(config.cache_uri, TLSSettings.of(config))
        return ClusterConnection(address, reactor, "store", timeout=timeout, clock=clock, counts=counts)

    def open_connection(self, meta, session_id, limit):
        written = self.connected(meta)
        claimed = self.claim_device(meta.profile_id, meta.device_id, meta.gateway_id, session_id, limit)
        return all_replies([written, claimed]).addCallback(lambda replies: replies[1])

    def _send_refresh(self, metas, renewed, ttl):
        commands = [("SET", conn_key(m.profile_id, m.device_id), m.to_json(), "EX", ttl) for m in metas]
        commands += [("EXPIRE", key, ttl) for key in renewed]
        return self.redis.pipeline(commands)

    def disconnected(self, meta):
        return defer.ensureDeferred(self._disconnected(meta))

    async def _disconnected(self, meta):
        kept = await self.redis.eval(RELEASE_CONN, [conn_key(meta.profile_id, meta.device_id)], [meta.gateway_id])
        keep = set(json.loads(kept)) if kept else set()
        commands = [("SREM", room_key(room), meta.member) for room in meta.room_ids if room not in keep]
        commands.append(("SREM", instance_conns_key(meta.gateway_id), meta.member))
        await self.redis.pipeline(commands)

    async def _unregister(self, gateway_id):
        await self.redis.execute("DEL", instance_key(gateway_id))
        if int(await self.redis.execute("SCARD", instance_conns_key(gateway_id))) == 0:
            await self.redis.execute("DEL", instance_rooms_key(gateway_id))
            await self.redis.execute("SREM", INSTANCES_KEY, gateway_id)

    def _reap_batch(self, gateway_id):
        return defer.ensureDeferred(self._reap(gateway_id))

    async def _reap(self, gateway_id):
        """REAP's rules (chatgateway.store.redis), as commands: rooms first (they need :conns),
        then connections, a batch per call; -1 if alive after all or already reaped."""
        redis = self.redis
        if int(await redis.execute("EXISTS", instance_key(gateway_id))) == 1:
            return -1
        if int(await redis.execute("SISMEMBER", INSTANCES_KEY, gateway_id)) == 0:
            return -1
        conns = instance_conns_key(gateway_id)
        rooms = await redis.execute("SPOP", instance_rooms_key(gateway_id), REAP_BATCH) or []
        for room in rooms:
            await self._reap_room(gateway_id, room, conns)
        if not rooms:
            for member in await redis.execute("SPOP", conns, REAP_BATCH) or []:
                await self._reap_connection(gateway_id, member)
        left = int(await redis.execute("SCARD", instance_rooms_key(gateway_id)))
        left += int(await redis.execute("SCARD", conns))
        if left == 0:
            await redis.execute("SREM", INSTANCES_KEY, gateway_id)
        return left

    async def _reap_room(self, gateway_id, room, conns):
        members = sorted(await self.redis.execute("SMEMBERS", room_key(room)) or [])
        if not members:
            return
        held = await self.redis.execute("SMISMEMBER", conns, *members)
        theirs = [m for m, h in zip(members, held, strict=True) if int(h)]
        if not theirs:
            return
        metas = await self.redis.pipeline([("GET", "gateway:conn:" + m) for m in theirs])
        gone = [m for m, raw in zip(theirs, metas, strict=True) if not _held_elsewhere(_meta(raw), gateway_id)]
        if gone:
            await self.redis.execute("SREM", room_key(room), *gone)

    async def _reap_connection(self, gateway_id, member):
        meta = _meta(await self.redis.execute("GET", "gateway:conn:" + member))
        if meta is not None and not _held_elsewhere(meta, gateway_id):
            await self.redis.execute("DEL", "gateway:conn:" + member)
            rooms = meta.get("room_ids")
            if isinstance(rooms, list) and rooms:
                await self.redis.pipeline([("SREM", room_key(room), member) for room in rooms])
        device = "gateway:device:" + member
        for entry in await self.redis.execute("ZRANGE", device, 0, -1) or []:
            try:
                pair = json.loads(entry)
            except ValueError:
                continue
            if isinstance(pair, list) and pair and pair[0] == gateway_id:
                await self.redis.execute("ZREM", device, entry)
