"""Closing sessions whose token expired: one timer for the earliest, not one per session."""

import heapq
import itertools

# The close code of docs/protocol.md#heartbeats-and-close-codes (session.CloseCode.UNAUTHENTICATED).
UNAUTHENTICATED = 4401


class TokenExpiries:
    """Closes sessions whose token expired (4401): one timer, for the earliest, instead of one per session.

    A token expires for its session when the verifier would start refusing it
    (Claims.valid_until: exp + JWT_LEEWAY_SEC), so a token accepted is a session kept.

    A heap of (expires_at, n, session). An entry goes stale when its session closes
    or gets a fresher token; stale entries are skipped when due, and dropped all at
    once when they are most of the heap (so closed sessions are not kept for long).
    """

    COMPACT_ABOVE = 64

    def __init__(self, clock):
        self._clock = clock
        self._heap = []
        self._order = itertools.count()  # ties never compare sessions
        self._live = 0  # sessions with an expiry here
        self._stale = 0  # heap entries that no longer count (an upper bound)
        self._timer = None
        self._due = None  # the expiry the timer is set for

    def __len__(self):
        return self._live

    def schedule(self, session, expires_at):
        """Close ``session`` at ``expires_at`` (clock seconds), instead of at the expiry set before."""
        if session._expires_at == expires_at:
            return
        if session._expires_at is None:
            self._live += 1
        else:
            self._stale += 1
        session._expires_at = expires_at
        heapq.heappush(self._heap, (expires_at, next(self._order), session))
        self._compact()
        self._arm()

    def forget(self, session):
        """The session is gone."""
        if session._expires_at is None:
            return
        session._expires_at = None
        self._live -= 1
        self._stale += 1
        if not self._live:
            self._heap.clear()
            self._stale = 0
            self._cancel()
        else:
            self._compact()

    def _compact(self):
        if self._stale > self.COMPACT_ABOVE and self._stale * 2 > len(self._heap):
            self._heap = [entry for entry in self._heap if entry[2]._expires_at == entry[0]]
            heapq.heapify(self._heap)
            self._stale = 0
            self._arm()

    def _arm(self):
        if not self._heap:
            self._cancel()
            return
        due = self._heap[0][0]
        if self._timer is not None and self._timer.active() and self._due == due:
            return
        self._cancel()
        self._due = due
        self._timer = self._clock.callLater(max(0.0, due - self._clock.seconds()), self._expire)

    def _cancel(self):
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = self._due = None

    def _expire(self):
        self._timer = None
        # The timer's own target counts as now: clock arithmetic may land a hair before it.
        now = max(self._clock.seconds(), self._due)
        while self._heap and self._heap[0][0] <= now:  # closing may compact (replace) the heap
            expires_at, _, session = heapq.heappop(self._heap)
            if session._expires_at == expires_at:
                session.close(UNAUTHENTICATED, "token expired")
            else:
                self._stale = max(0, self._stale - 1)
        self._arm()
