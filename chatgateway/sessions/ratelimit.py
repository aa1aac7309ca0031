"""Token bucket for MAX_EVENTS_PER_SECOND, on an injected clock."""


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
