"""Rate limits on an injected clock: the TokenBucket of MAX_EVENTS_PER_SECOND and
MAX_TOKEN_REFRESHES_PER_MINUTE, the InboundBudget of everything a device sends
(MAX_FRAMES_PER_SECOND, MAX_BYTES_PER_SECOND, OVER_BUDGET_CLOSE_SEC), and the
process's ConnectRate of new connections (MAX_CONNECTS_PER_SECOND, CONNECT_BURST)."""

import math
import random

# A device over its InboundBudget is read again once this share of a second's worth of
# both buckets has refilled: a flood costs about ten pauses (and timers) per second, not one
# per frame.
RESUME_SHARE = 0.1
# Why the ConnectRate refused a connection (an HTTP 503's reason, a 1013's cause).
TOO_MANY_CONNECTS = "too many new connections"
# Over budget again within this many seconds of being read again continues a streak.
STREAK_GAP_SEC = 1.0


class TokenBucket:
    """Holds up to ``burst`` tokens, refilled at ``rate`` per second."""

    __slots__ = ("_rate", "_burst", "_clock", "_tokens", "_stamp")  # one per connection

    def __init__(self, rate, burst, clock):
        self._rate = float(rate)
        self._burst = float(burst)
        self._clock = clock
        self._tokens = self._burst
        self._stamp = clock.seconds()

    def take(self, n=1):
        """True and n tokens spent when n are available; False (nothing spent) otherwise."""
        now = self._clock.seconds()
        self._tokens = min(self._burst, self._tokens + (now - self._stamp) * self._rate)
        self._stamp = now
        if self._tokens >= n:
            self._tokens -= n
            return True
        return False


class InboundBudget:
    """What one device may send: frames and bytes per second, two token buckets with a
    burst of one second's worth, and how long it has kept exceeding them.

    The reader spends as it reads: ``frames`` loses one per frame (an attribute: the
    hot path makes no call), ``spend_bytes`` counts each chunk read. Once ``over``, the
    reader stops reading, waits ``pause()`` seconds and calls ``resume()``. Pauses that
    come within STREAK_GAP_SEC of the previous resume form a streak; after a pause,
    ``persistent`` says whether its streak has lasted ``close_after`` seconds.
    """

    __slots__ = (
        "frames",
        "bytes",
        "_frame_rate",
        "_byte_rate",
        "_clock",
        "_stamp",
        "close_after",
        "_streak_since",
        "_resumed_at",
        "exceeded",
        "persistent",
    )

    def __init__(self, frames_per_second, bytes_per_second, clock, close_after):
        self._frame_rate = float(frames_per_second)
        self._byte_rate = float(bytes_per_second)
        self.frames = self._frame_rate
        self.bytes = self._byte_rate
        self._clock = clock
        self._stamp = clock.seconds()
        self.close_after = close_after
        self._streak_since = None
        self._resumed_at = None
        self.exceeded = None  # "frame" or "byte": what the last pause was for
        self.persistent = False

    def refill(self):
        now = self._clock.seconds()
        elapsed = now - self._stamp
        self._stamp = now
        self.frames = min(self._frame_rate, self.frames + elapsed * self._frame_rate)
        self.bytes = min(self._byte_rate, self.bytes + elapsed * self._byte_rate)

    def spend_bytes(self, n):
        self.refill()
        self.bytes -= n

    @property
    def over(self):
        return self.frames < 1 or self.bytes < 0

    def pause(self):
        """The device is over budget and is not read: seconds until it may be read again."""
        now = self._clock.seconds()
        if self._resumed_at is None or now - self._resumed_at > STREAK_GAP_SEC:
            self._streak_since = now
        self.persistent = now - self._streak_since >= self.close_after
        self.exceeded = "frame" if self.frames < 1 else "byte"
        self.refill()
        frames_wanted = max(1.0, RESUME_SHARE * self._frame_rate)
        bytes_wanted = RESUME_SHARE * self._byte_rate
        return max(0.0, (frames_wanted - self.frames) / self._frame_rate, (bytes_wanted - self.bytes) / self._byte_rate)

    def resume(self):
        self.refill()
        self._resumed_at = self._stamp

    def reason(self):
        """The close reason of a persistent device."""
        setting = "MAX_FRAMES_PER_SECOND" if self.exceeded == "frame" else "MAX_BYTES_PER_SECOND"
        return f"{self.exceeded} rate exceeded: over {setting} for {self.close_after:g} s"


class ConnectRate:
    """New connections one process lets in (docs/security.md#storm-control): a TokenBucket of
    ``rate`` per second and ``burst``; a rate of 0 lets every one in.

    ``admit()`` is asked once per connection before anything of its sign-in is done; O(1).
    A refused device is told to come back after ``retry_after()`` seconds: a whole number,
    uniform in [1, ``spread()``], random per device, where the spread is the seconds this
    process needs to let in what it refused in the last second (at least MIN_SPREAD_SEC, at
    most MAX_SPREAD_SEC): 20,000 devices refused at 1,000/s come back over 20 s, not 5.
    """

    MIN_SPREAD_SEC = 5
    MAX_SPREAD_SEC = 60

    def __init__(self, rate, burst, clock, rng=random):
        self.rate = float(rate)
        self.burst = float(burst or rate)
        self._bucket = TokenBucket(self.rate, max(1.0, self.burst), clock) if self.rate > 0 else None
        self._clock = clock
        self._rng = rng
        self.refused = 0
        # Refusals in the current whole second of the clock and in the one before it.
        self._second = math.floor(clock.seconds())
        self._refused_this_second = 0
        self._refused_last_second = 0

    def admit(self):
        """True when one more connection may begin its sign-in now; False (counted) when not."""
        if self._bucket is None or self._bucket.take():
            return True
        self._roll()
        self._refused_this_second += 1
        self.refused += 1
        return False

    def spread(self):
        """The largest Retry-After given now, in seconds."""
        if self._bucket is None:
            return self.MIN_SPREAD_SEC
        self._roll()
        backlog = max(self._refused_this_second, self._refused_last_second) / self.rate
        return min(self.MAX_SPREAD_SEC, max(self.MIN_SPREAD_SEC, math.ceil(backlog)))

    def retry_after(self):
        """Seconds a refused device is to wait (HTTP Retry-After): uniform in [1, spread()]."""
        return self._rng.randint(1, self.spread())

    def _roll(self):
        second = math.floor(self._clock.seconds())
        if second != self._second:
            self._refused_last_second = self._refused_this_second if second == self._second + 1 else 0
            self._refused_this_second = 0
            self._second = second
