"""Rate limits on an injected clock: the TokenBucket of MAX_EVENTS_PER_SECOND and
MAX_TOKEN_REFRESHES_PER_MINUTE, and the InboundBudget of everything a device sends
(MAX_FRAMES_PER_SECOND, MAX_BYTES_PER_SECOND, OVER_BUDGET_CLOSE_SEC)."""

# A device over its InboundBudget is read again once this share of a second's worth of
# both buckets has refilled: a flood costs about ten pauses (and timers) per second, not one
# per frame.
RESUME_SHARE = 0.1
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
