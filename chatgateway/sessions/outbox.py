"""The bounded outbound buffer of one device connection (docs/security.md#slow-consumers).

A connection may hold at most SEND_BUFFER_BYTES of outbound data: what Twisted's
transport has not yet handed to the kernel plus what waits in this Outbox,
counted together. The Outbox is the transport's streaming producer
(IPushProducer): while Twisted has room it writes every frame straight through;
once Twisted's buffer passes its ``bufferSize`` (set to at most half of
SEND_BUFFER_BYTES, see ``bind``) the transport pauses it, and frames wait here
until it resumes. The gRPC edge, whose frames leave from another thread, pauses
and resumes its devices' Outboxes the same way (chatgateway.edge.grpcstream).

While frames wait, each kind of event has its policy:

- typing (TYPING): the latest state per room and typist replaces an older one
  still waiting; when room is needed, waiting typing events are dropped first,
  oldest first, and a typing event that does not fit is dropped;
- receipts and presence (COALESCED): the latest per room and reader (presence:
  per profile) replaces an older one still waiting, and moves to the end so it
  never overtakes the events it refers to;
- room events with a position (ROOM: messages, receipts; and gap events) are kept until the cap;
  one that does not fit even after every waiting typing event is dropped is not
  sent, and ``behind`` is called: the device is behind (sessions.behind), is fed no
  room events until this queue drained (``drained`` is called), then catches up
  from the room's stream (docs/security.md#slow-consumers); without ``behind`` they
  are KEPT;
- everything else (KEPT: messages without a position, command results, membership
  changes, errors) is kept until the cap; a frame that does not fit even after
  every waiting typing event is dropped makes the connection a slow consumer: the
  queue is released at once and ``overflow`` is called (the edge closes with 4429).

Frames are shared between recipients (one encoding per subprotocol), so the
bytes counted here are an upper bound of the memory a slow connection holds.
"""

import collections

from twisted.internet import tcp
from twisted.internet.interfaces import IPushProducer
from twisted.protocols.policies import ProtocolWrapper
from zope.interface import implementer

TYPING = "typing"
COALESCED = "coalesced"
KEPT = "kept"
ROOM = "room"

# Bookkeeping of one waiting frame (list, slot, key), counted with its bytes so
# that many tiny frames cannot hold more memory than the limit says.
ENTRY_OVERHEAD = 96
# Twisted's default transport buffer before it pauses a producer.
TWISTED_BUFFER_SIZE = 64 * 1024


def classify(event):
    """(kind, key) of a ServerEvent for the waiting policy."""
    which = event.WhichOneof("payload")
    if which == "typing_event":
        return TYPING, (event.typing_event.room_id, event.typing_event.profile_id)
    if event.offset or which == "gap":
        # Given once each, in order (a positioned receipt is not coalesced: the device would see a
        # hole); a gap event stands for room events, and waits as they do.
        return ROOM, None
    if which == "receipt_event":
        return COALESCED, ("receipt", event.receipt_event.room_id, event.receipt_event.profile_id)
    if which == "presence_event":
        return COALESCED, ("presence", event.presence_event.profile_id)
    return KEPT, None


def buffer_size(limit):
    """The bytes a transport may hold before it pauses the Outbox: half of ``limit`` (the
    other half is for frames waiting under the per-kind policy), never above Twisted's default."""
    return min(TWISTED_BUFFER_SIZE, max(1, limit // 2))


def tcp_transport(transport):
    """The transport under any ProtocolWrapper layers (e.g. the connection limits)."""
    while isinstance(transport, ProtocolWrapper):
        transport = transport.transport
    return transport


def unsent_bytes(transport):
    """Bytes written to ``transport`` that it has not yet handed to the kernel.

    Reads twisted.internet.abstract.FileDescriptor's buffers (TCP, Unix sockets);
    another transport counts 0 (it still pauses the Outbox when its buffer is full).
    """
    transport = tcp_transport(transport)
    try:
        return len(transport.dataBuffer) - transport.offset + transport._tempDataLen
    except (AttributeError, TypeError):
        return 0


def direct_socket(transport, wrappers):
    """The plain TCP connection under ``transport`` if only ``wrappers`` (classes that pass
    bytes through unchanged) lie between them; None otherwise (TLS, a test transport...)."""
    while isinstance(transport, wrappers):
        transport = transport.transport
    return transport if type(transport) is tcp.Server else None


def write_now(connection, data):
    """Write ``data`` to a plain TCP ``connection``, handing it to the kernel at once when
    nothing is waiting in the connection's buffers.

    Twisted's write() only buffers: the bytes leave at the next reactor turn, after an
    epoll registration and before an unregistration per connection. A fan-out writes
    to hundreds of idle sockets per turn, so sending at once saves both epoll_ctl calls
    and lets the first recipients read while the fan-out goes on. Whatever the kernel
    does not take (or an error, which Twisted's write path then finds and reports) goes
    through write() as before, behind nothing, so the order holds.
    """
    if (
        connection.connected
        and not connection.disconnecting
        and not connection._aborting
        and not connection.dataBuffer
        and not connection._tempDataLen
    ):
        try:
            sent = connection.socket.send(data)
        except OSError:
            sent = 0
        if sent == len(data):
            return
        data = data[sent:]
    connection.write(data)


def _nothing_unsent():
    return 0


class _Entry:
    __slots__ = ("frame", "kind", "key")

    def __init__(self, frame, kind, key):
        self.frame = frame
        self.kind = kind
        self.key = key


@implementer(IPushProducer)
class Outbox:
    """Frames for one connection: written through, or waiting under the per-kind policy.

    ``write(frame)`` puts bytes on the transport; ``overflow()`` is called once
    when a frame that must be kept does not fit (the queue is already released).
    """

    # One per connection, and most connections never wait: slots, and the waiting
    # structures exist only while frames wait (an empty deque costs ~760 bytes).
    __slots__ = (
        "_write",
        "_overflow",
        "_unsent",
        "limit",
        "paused",
        "closed",
        "queued",
        "_typing_bytes",
        "dropped",
        "_queue",
        "_typing",
        "_by_key",
        "_removed",
        "behind",
        "drained",
        "not_given",
    )

    def __init__(self, write, limit, overflow, unsent=_nothing_unsent):
        self._write = write
        self._overflow = overflow
        self._unsent = unsent
        self.limit = limit
        self.paused = False
        self.closed = False
        self.queued = 0  # bytes waiting here, bookkeeping included
        self._typing_bytes = 0  # of which typing events
        self.dropped = 0  # typing events dropped, coalesced events replaced
        self._queue = None  # deque of _Entry (frame None once removed), while frames wait
        self._typing = None  # deque of the waiting typing entries, oldest first
        self._by_key = None  # key -> the waiting _Entry of that key
        self._removed = 0  # entries in _queue whose frame is None
        self.behind = None  # called when a ROOM frame does not fit (else it is KEPT)
        self.drained = None  # called when the waiting frames are all written
        self.not_given = None  # not_given(positions): room events released unsent by close()

    def follow(self, session):
        """Let ``session`` fall behind instead of overflowing on room events (sessions.behind)."""
        self.behind = session.fell_behind
        self.drained = session.drained
        self.not_given = session.not_given

    def bind(self, transport):
        """Become ``transport``'s streaming producer; have it pause us at half the limit."""
        if getattr(transport, "producer", None) is not None:
            transport.unregisterProducer()  # twisted.web's HTTPChannel, whose request we took over
        tcp = tcp_transport(transport)
        if hasattr(tcp, "bufferSize"):
            tcp.bufferSize = buffer_size(self.limit)
        transport.registerProducer(self, True)

    def __len__(self):
        return 0 if self._queue is None else len(self._queue) - self._removed

    @property
    def buffered(self):
        """Outbound bytes held for this connection: the transport's and ours."""
        return self._unsent() + self.queued

    # ------------------------------------------------------------ sending

    def send(self, frame, kind=KEPT, key=None):
        """Write or queue ``frame``; False when it is dropped at once (closed, or it does not fit)."""
        if self.closed:
            return False
        if not self.paused and not self._queue:
            self._write(frame)
            return True
        return self._wait(_Entry(frame, kind, key))

    def _wait(self, entry):
        if entry.key is not None and entry.kind != ROOM and self._by_key:
            older = self._by_key.get(entry.key)
            if older is not None:
                self._remove(older)
                self.dropped += 1
        size = len(entry.frame) + ENTRY_OVERHEAD
        held = self._unsent() + self.queued
        if held + size > self.limit:
            if held - self._typing_bytes + size > self.limit:
                # Not even without every waiting typing event.
                if entry.kind == TYPING:
                    self.dropped += 1
                    return False
                if entry.kind == ROOM and self.behind is not None:
                    self.behind()  # not sent: the device catches up once this queue drained
                    return False
                self.close()
                self._overflow()
                return False
            while self._unsent() + self.queued + size > self.limit and self._typing:
                self._remove(self._typing.popleft(), from_typing=False)
                self.dropped += 1
        if self._queue is None:
            self._queue = collections.deque()
        self._queue.append(entry)
        self.queued += size
        if entry.key is not None and entry.kind != ROOM:  # (a ROOM key is its position: never coalesced)
            if self._by_key is None:
                self._by_key = {}
            self._by_key[entry.key] = entry
        if entry.kind == TYPING:
            if self._typing is None:
                self._typing = collections.deque()
            self._typing.append(entry)
            self._typing_bytes += size
        return True

    def _remove(self, entry, from_typing=True):
        """Forget a waiting entry (it stays in _queue as a hole until flushed or compacted)."""
        if entry.frame is None:
            return
        size = len(entry.frame) + ENTRY_OVERHEAD
        self.queued -= size
        if entry.kind == TYPING:
            self._typing_bytes -= size
        entry.frame = None
        self._removed += 1
        if entry.key is not None and self._by_key is not None and self._by_key.get(entry.key) is entry:
            del self._by_key[entry.key]
        if from_typing and entry.kind == TYPING:
            try:
                self._typing.remove(entry)
            except ValueError:
                pass
        if self._removed > 64 and self._removed * 2 > len(self._queue):
            self._queue = collections.deque(e for e in self._queue if e.frame is not None)
            self._removed = 0

    def _flush(self):
        while self._queue and not self.paused and not self.closed:
            entry = self._queue.popleft()
            if entry.frame is None:
                self._removed -= 1
                continue
            frame = entry.frame
            self.queued -= len(frame) + ENTRY_OVERHEAD
            if entry.kind == TYPING:
                self._typing_bytes -= len(frame) + ENTRY_OVERHEAD
            entry.frame = None
            if entry.key is not None and self._by_key is not None and self._by_key.get(entry.key) is entry:
                del self._by_key[entry.key]
            if entry.kind == TYPING and self._typing and self._typing[0] is entry:
                self._typing.popleft()
            self._write(frame)
        if self._queue is not None and not self._queue:
            self._release()
            if self.drained is not None:
                self.drained()

    def _release(self):
        """Nothing waits any more: drop the waiting structures until a frame waits again."""
        self._queue = self._typing = self._by_key = None
        self._removed = 0
        self.queued = 0
        self._typing_bytes = 0

    def close(self):
        """Send nothing more; release everything waiting (the positions of the room events among
        it go to ``not_given``: the device never got them)."""
        self.closed = True
        if self._queue and self.not_given is not None:
            positions = [e.key for e in self._queue if e.kind == ROOM and e.frame is not None and e.key]
            if positions:
                self.not_given(positions)
        self._release()

    # ------------------------------------------------------------ IPushProducer

    def pauseProducing(self):
        self.paused = True

    def resumeProducing(self):
        self.paused = False
        self._flush()

    def stopProducing(self):
        self.close()
