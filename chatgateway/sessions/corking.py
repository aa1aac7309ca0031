"""A burst's frames for one connection, sent in one write (docs/performance.md#corked-writes).

While a burst is being delivered (the bus messages of one read of the subscriber
connection, one chunk of the fan-out's queue) the Cork is closed: frames written to
a plain TCP connection wait here, and the connection is remembered. When the burst
ends, still in the same reactor turn, each remembered connection gets its frames
joined in one send (outbox.write_now: what the kernel does not take goes through
Twisted's buffer, behind nothing, so the order holds). Outside a burst a frame goes
to the kernel at once: nothing ever waits for a timer.

Frames held here count as unsent for the connection's Outbox (``held``), and a
connection whose held frames reach its transport's ``bufferSize`` is written at
once, so a burst never holds more for a connection than Twisted would before
pausing it (docs/security.md#slow-consumers).

Anything else written to a connection (Autobahn's close frames and pongs) must
``release`` it first, or it would overtake the frames held here. ``held``,
``release`` and ``discard`` take None (a connection with no plain TCP socket: nothing
is ever held for it).
"""

import contextlib

from chatgateway.sessions.outbox import TWISTED_BUFFER_SIZE, write_now


class Cork:
    """Holds frames per connection while closed (``corked()``), one send each when opened."""

    __slots__ = ("_depth", "_frames", "_held", "writes", "frames")

    def __init__(self):
        self._depth = 0  # nested corked() blocks open
        self._frames = {}  # connection -> [frame, ...], in the order the connections were first written
        self._held = {}  # connection -> bytes of its held frames
        self.writes = 0  # joined writes made on opening, for tests and telemetry
        self.frames = 0  # frames they carried

    @contextlib.contextmanager
    def corked(self):
        """Hold the frames written inside the block; write them, one send per connection, when
        the outermost block ends (an exception included)."""
        self._depth += 1
        try:
            yield self
        finally:
            self._depth -= 1
            if not self._depth:
                self._open()

    @property
    def closed(self):
        return self._depth > 0

    def write(self, connection, frame):
        """Write ``frame`` to a plain TCP ``connection``: held while corked, else at once."""
        if not self._depth:
            write_now(connection, frame)
            return
        frames = self._frames.get(connection)
        if frames is None:
            self._frames[connection] = [frame]
            self._held[connection] = len(frame)
            return
        frames.append(frame)
        held = self._held[connection] + len(frame)
        self._held[connection] = held
        if held >= getattr(connection, "bufferSize", TWISTED_BUFFER_SIZE):
            self.release(connection)  # as much as Twisted holds before it pauses the Outbox

    def held(self, connection):
        """Bytes held here for ``connection``."""
        return self._held.get(connection, 0)

    def release(self, connection):
        """Write what is held for ``connection`` now (before anything written past the Cork)."""
        frames = self._frames.pop(connection, None)
        if frames is not None:
            del self._held[connection]
            self._send(connection, frames)

    def discard(self, connection):
        """Forget what is held for ``connection`` (it was aborted or lost)."""
        if self._frames.pop(connection, None) is not None:
            del self._held[connection]

    def _open(self):
        # Swapped before anything is sent: a write made meanwhile goes straight through.
        frames, self._frames, self._held = self._frames, {}, {}
        for connection, held in frames.items():
            self._send(connection, held)

    def _send(self, connection, frames):
        self.writes += 1
        self.frames += len(frames)
        write_now(connection, frames[0] if len(frames) == 1 else b"".join(frames))
