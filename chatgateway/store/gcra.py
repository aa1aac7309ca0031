"""Rate limits shared by every gateway: GCRA, one Redis script per check (docs/operations.md#limits-per-profile-and-per-room).

The generic cell rate algorithm keeps one number per limited thing, its theoretical
arrival time (TAT): with ``rate`` events per second (interval T = 1/rate) and a burst of
``burst``, an event at ``now`` is let in when ``max(TAT, now) + T - now <= burst × T``,
and then moves TAT to ``max(TAT, now) + T``. Otherwise it is refused, and may retry in
``max(TAT, now) + T - burst × T - now``. The key expires when TAT is reached (then the
limit is full again), so an idle profile or room costs Redis nothing.

    gateway:limit:{kind}:{id}   string: TAT in milliseconds of Redis TIME   PEXPIRE until TAT

The time is Redis's own (TIME), so gateways' clocks never matter. The limits of one command
(its profile's and its room's) are checked in one script: it counts against both or neither,
so a command refused by one limit does not use up the other.
"""

from urllib.parse import urlsplit

from twisted.internet import defer
from zope.interface import Interface, implementer

from chatgateway.store.cluster import ClusterStore


def limit_key(kind, key):
    return f"gateway:limit:{kind}:{key}"


# KEYS: the limits' keys. ARGV: for each, its interval (ms) and burst (events).
# Returns {0, 0} when let in by every limit (each then counts the event), else {n, retry after
# (ms)} for the first limit n (1-based) that refuses it (and none counts it).
CHECK = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + tonumber(t[2]) / 1000
local next_tats = {}
for i = 1, #KEYS do
  local interval, burst = tonumber(ARGV[2 * i - 1]), tonumber(ARGV[2 * i])
  local tat = tonumber(redis.call('GET', KEYS[i]) or '0')
  if tat < now then tat = now end
  local wait = tat + interval - burst * interval - now
  if wait > 0 then return {i, math.ceil(wait)} end
  next_tats[i] = tat + interval
end
for i = 1, #KEYS do
  redis.call('SET', KEYS[i], string.format('%.3f', next_tats[i]), 'PX', math.max(1, math.ceil(next_tats[i] - now)))
end
return {0, 0}
"""


class IRateChecks(Interface):
    def check(limits):
        """``limits``: [(kind, key, rate per second, burst)], checked together: an event counts
        against all of them or none. Deferred: (None, 0.0) when let in, else (the kind that
        refused it, the seconds to wait before retrying)."""


@implementer(IRateChecks)
class RedisGcra:
    """GCRA checks in Redis (through a RedisConnection's ``eval``)."""

    def __init__(self, redis):
        self.redis = redis

    def check(self, limits):
        """IRateChecks.check; fails when Redis does."""
        keys = [limit_key(kind, key) for kind, key, _, _ in limits]
        args = []
        for _, _, rate, burst in limits:
            args += [f"{1000.0 / rate:.6f}", burst]
        d = self.redis.eval(CHECK, keys, args)

        def decided(reply):
            refused = int(reply[0])
            return (None, 0.0) if not refused else (limits[refused - 1][0], int(reply[1]) / 1000.0)

        return d.addCallback(decided)


@implementer(IRateChecks)
class MemoryGcra:
    """The same checks in process (one instance), on ``clock``."""

    def __init__(self, clock):
        self.clock = clock
        self._tats = {}  # (kind, key) -> TAT (seconds)

    def check(self, limits):
        now = self.clock.seconds()
        next_tats = []
        for kind, key, rate, burst in limits:
            interval = 1.0 / rate
            tat = max(self._tats.get((kind, key), now), now)
            wait = tat + interval - burst * interval - now
            if wait > 1e-9:
                return defer.succeed((kind, wait))
            next_tats.append(((kind, key), tat + interval))
        self._tats.update(next_tats)
        if len(self._tats) > 10_000:
            self._tats = {k: v for k, v in self._tats.items() if v > now}  # the others are full
        return defer.succeed((None, 0.0))


@implementer(IRateChecks)
class ClusterGcra:
    """GCRA checks on a Redis Cluster: one script per limit (each key has its own slot), so a
    command refused by its room's limit has used up one of its profile's (not both-or-neither)."""

    def __init__(self, redis):
        self._one = RedisGcra(redis)

    async def _check(self, limits):
        for limit in limits:
            outcome = await self._one.check([limit])
            if outcome[0] is not None:
                return outcome
        return (None, 0.0)

    def check(self, limits):
        return defer.ensureDeferred(self._check(limits))


def is_cluster_uri(uri):
    """A Redis Cluster URI (redis+cluster://, rediss+cluster://)."""
    return urlsplit(uri.strip()).scheme.endswith("+cluster")


def make_gcra(store, clock, uri=""):
    """The checks beside ``store`` (whose URI is ``uri``): in its Redis, or in process."""
    redis = getattr(store, "redis", None)
    if redis is None:
        return MemoryGcra(clock)
    clustered = isinstance(store, ClusterStore) or is_cluster_uri(uri)
    return ClusterGcra(redis) if clustered else RedisGcra(redis)
