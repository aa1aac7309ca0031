"""A circuit breaker for calls to the core.

closed     every call goes through; ``failures`` consecutive transport failures
           (UNAVAILABLE, DEADLINE_EXCEEDED) open it.
open       calls fail at once, without touching the core, for ``cooldown`` seconds.
half-open  after the cool-down, one call goes through as a probe; the others
           still fail fast. The probe's success closes the breaker, its failure
           opens it for another cool-down.

Any answer of the core other than UNAVAILABLE/DEADLINE_EXCEEDED (NOT_FOUND,
PERMISSION_DENIED...) is a success here: the core is there and answering.
Time comes from the injected clock (``seconds()``), so tests drive it with
``task.Clock``. Reactor thread only.
"""

from twisted.logger import Logger

CLOSED = "closed"
OPEN = "open"
HALF_OPEN = "half-open"


class CircuitBreaker:
    log = Logger()

    def __init__(self, clock, failures=5, cooldown=10.0, name="core"):
        if failures < 1:
            raise ValueError("failures must be at least 1")
        self._clock = clock
        self._threshold = failures
        self._cooldown = float(cooldown)
        self._name = name
        self._state = CLOSED
        self._consecutive = 0
        self._opened_at = None
        self._probing = False

    @property
    def state(self):
        """closed, open or half-open (an open breaker whose cool-down ended is half-open)."""
        if self._state == OPEN and self._cooled():
            return HALF_OPEN
        return self._state

    @property
    def consecutive_failures(self):
        return self._consecutive

    def retry_after(self):
        """Seconds until a probe may go through (0 when calls are allowed now)."""
        if self._state != OPEN:
            return 0.0
        return max(0.0, self._opened_at + self._cooldown - self._clock.seconds())

    def allow(self):
        """True when a call may go to the core now; a True in half-open makes it the probe."""
        if self._state == CLOSED:
            return True
        if self._state == OPEN:
            if not self._cooled():
                return False
            self._state = HALF_OPEN
            self._probing = False
        if self._probing:
            return False
        self._probing = True
        return True

    def succeeded(self):
        """The core answered (whatever the answer)."""
        if self._state != CLOSED:
            self.log.info("circuit to the {name} closed: it answers again", name=self._name)
        self._state = CLOSED
        self._consecutive = 0
        self._probing = False

    def failed(self):
        """The core could not be reached or did not answer in time."""
        self._consecutive += 1
        if self._state == HALF_OPEN or (self._state == CLOSED and self._consecutive >= self._threshold):
            if self._state == CLOSED:
                self.log.warn(
                    "circuit to the {name} opened after {count} consecutive failures; failing fast for {cooldown:g}s",
                    name=self._name,
                    count=self._consecutive,
                    cooldown=self._cooldown,
                )
            self._state = OPEN
            self._opened_at = self._clock.seconds()
            self._probing = False

    def released(self):
        """A call allowed by ``allow`` ended without telling anything about the core."""
        if self._state == HALF_OPEN:
            self._probing = False

    def _cooled(self):
        return self._clock.seconds() - self._opened_at >= self._cooldown
