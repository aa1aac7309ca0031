"""Rate limits shared by every gateway: GCRA, one Redis script per check (docs/operations.md#limits-per-profile-and-per-room).

The generic cell rate algorithm keeps one number per limited thing, its theoretical
arrival time (TAT): with ``rate`` events per second (interval T = 1/rate) and a burst of
``burst``, an event at ``now`` is let in when ``max(TAT, now) + T - now <= burst × T``,
and then moves TAT to ``max(TAT, now) + T``. Otherwise it is refused, and may retry in
``max(TAT, now) + T - burst × T - now``. The key expires when TAT is reached (then the
limit is full again), so an idle profile or room costs Redis nothing.

    gateway:limit:{kind}:{id}   string: TAT in milliseconds of Redis TIME   PEXPIRE until TAT

The time is Redis's own (TIME), so gateways' clocks never matter.
"""

from twisted.internet import defer


def limit_key(kind, key):
    return f"gateway:limit:{kind}:{key}"


# KEYS: the limit's key. ARGV: interval (ms), burst (events).
# Returns {1, 0} when let in, {0, retry after (ms)} when refused.
CHECK = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + tonumber(t[2]) / 1000
local interval, burst = tonumber(ARGV[1]), tonumber(ARGV[2])
local tat = tonumber(redis.call('GET', KEYS[1]) or '0')
if tat < now then tat = now end
local next_tat = tat + interval
local wait = next_tat - burst * interval - now
if wait > 0 then return {0, math.ceil(wait)} end
redis.call('SET', KEYS[1], string.format('%.3f', next_tat), 'PX', math.max(1, math.ceil(next_tat - now)))
return {1, 0}
"""


class RedisGcra:
    """GCRA checks in Redis (through a RedisConnection's ``eval``)."""

    def __init__(self, redis):
        self.redis = redis

    def check(self, kind, key, rate, burst):
        """Deferred: 0.0 when let in, else the seconds to wait before retrying; fails when Redis does."""
        d = self.redis.eval(CHECK, [limit_key(kind, key)], [f"{1000.0 / rate:.6f}", burst])
        return d.addCallback(lambda reply: 0.0 if int(reply[0]) else int(reply[1]) / 1000.0)


class MemoryGcra:
    """The same checks in process (one instance), on ``clock``."""

    def __init__(self, clock):
        self.clock = clock
        self._tats = {}  # (kind, key) -> TAT (seconds)

    def check(self, kind, key, rate, burst):
        now = self.clock.seconds()
        interval = 1.0 / rate
        tat = max(self._tats.get((kind, key), now), now)
        wait = tat + interval - burst * interval - now
        if wait > 1e-9:
            return defer.succeed(wait)
        self._tats[(kind, key)] = tat + interval
        if len(self._tats) > 10_000:
            self._tats = {k: v for k, v in self._tats.items() if v > now}  # the full ones
        return defer.succeed(0.0)


def make_gcra(store, clock):
    """The checks beside ``store``: in its Redis, or in process."""
    redis = getattr(store, "redis", None)
    return RedisGcra(redis) if redis is not None else MemoryGcra(clock)
