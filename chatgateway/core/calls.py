"""One call to the core from ``CoreClient.call`` to its answer, and the one timer that answers
DEADLINE_EXCEEDED for the calls not yet on a thread when their deadline comes (see
chatgateway.core.client, "Deadlines")."""

import heapq
import itertools

from twisted.internet import defer

# Where a call is (Call.state).
WAITING = "waiting"  # here, for a place in the pool
STARTING = "starting"  # has a place: getting the service token, or queued for a thread
RUNNING = "running"  # a thread called the core with what was left of the deadline
ENDED = "ended"  # answered, or past its deadline before a thread took it
NOT_STARTED = (WAITING, STARTING)

# What a thread returns for a call it did not start (past its deadline, or already answered).
SKIPPED = object()


class Call:
    """One call to the core, from ``call`` to its answer."""

    __slots__ = ("d", "method", "request", "metadata", "expires", "state", "timeout", "watched")

    def __init__(self, method, request, metadata, expires):
        self.d = defer.Deferred()
        self.method = method
        self.request = request
        self.metadata = metadata
        self.expires = expires  # clock seconds: the deadline
        self.state = None
        self.timeout = None  # what grpc was given, once a thread started it
        self.watched = False  # in Deadlines


class Deadlines:
    """Fails calls not yet on a thread at their deadline: one timer, for the earliest.

    A heap of (expires, n, call). A call stops counting when a thread takes it or it is
    answered; its entry is then skipped when it comes up, and such entries are dropped
    all at once when they outnumber the calls that can still be waiting (so a storm of
    calls that did get a thread in time is not kept until its deadlines). A timer per
    call would be a heap push and a cancel on the reactor for each of thousands.
    """

    COMPACT_ABOVE = 64

    def __init__(self, clock, expire):
        self._clock = clock
        self._expire = expire  # (call) -> None, on the reactor
        self._heap = []
        self._order = itertools.count()  # ties never compare calls
        self._timer = None
        self._due = None  # the deadline the timer is set for

    def __len__(self):
        return len(self._heap)

    def add(self, call, live):
        """Watch ``call``; ``live`` bounds how many watched calls can still be waiting."""
        if call.watched:
            return
        call.watched = True
        heapq.heappush(self._heap, (call.expires, next(self._order), call))
        if len(self._heap) > 2 * live + self.COMPACT_ABOVE:
            self._heap = [entry for entry in self._heap if entry[2].state in NOT_STARTED]
            heapq.heapify(self._heap)
        if self._due is None or call.expires < self._due:
            self._arm()

    def _arm(self):
        while self._heap and self._heap[0][2].state not in NOT_STARTED:
            heapq.heappop(self._heap)[2].watched = False
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = self._due = None
        if self._heap:
            self._due = self._heap[0][0]
            self._timer = self._clock.callLater(max(0.0, self._due - self._clock.seconds()), self._fire)

    def _fire(self):
        self._timer = None
        # The timer's own target counts as now: clock arithmetic may land a hair before it.
        now = max(self._clock.seconds(), self._due)
        while self._heap and self._heap[0][0] <= now:
            call = heapq.heappop(self._heap)[2]
            call.watched = False
            self._expire(call)
        self._arm()
