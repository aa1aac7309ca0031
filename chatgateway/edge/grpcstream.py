"""One ``Connect`` stream of the gRPC edge, on both of its threads (chatgateway.edge.grpc).

GrpcDevice (reactor thread) signs the device in (sessions.opening) and is then
its Session's transport; StreamWriter (the edge's asyncio loop) writes the
frames; Handoff carries items from the reactor to the loop, one
``loop.call_soon_threadsafe`` per batch.

Outbound frames go through the device's Outbox (sessions.outbox), on the
reactor thread, with the WebSocket edge's per-kind policy: typing dropped first,
receipts and presence coalesced, everything else kept up to SEND_BUFFER_BYTES,
past which the stream ends as a slow consumer (4429, RESOURCE_EXHAUSTED). What
the Outbox releases is handed to the writer; the bytes handed and not yet
written count against the same limit, as Twisted's unsent bytes do for
WebSocket. Past half the limit (sessions.outbox.buffer_size) the device pauses
its Outbox and hands a marker after the last frame: the writer reaching it has
written everything before, and resumes the Outbox with one ``callFromThread``
(one thread hop per pause, none per frame). While nothing waits, a frame is
handed on at once, as the Outbox would write it.
"""

import asyncio
import collections
import functools

import grpc
from twisted.logger import Logger
from zope.interface import implementer

from chatgateway.api import codec
from chatgateway.edge.limits import over_connect_rate
from chatgateway.sessions.opening import Opening, Reasons
from chatgateway.sessions.outbox import Outbox, buffer_size, classify
from chatgateway.sessions.ratelimit import TOO_MANY_CONNECTS
from chatgateway.sessions.reconnect import hinted
from chatgateway.sessions.session import CloseCode, ISessionTransport

# A WebSocket close code (docs/protocol.md#heartbeats-and-close-codes) -> the gRPC status a stream ends with.
CLOSE_STATUS = {
    CloseCode.NORMAL: grpc.StatusCode.OK,
    CloseCode.GOING_AWAY: grpc.StatusCode.UNAVAILABLE,
    CloseCode.POLICY: grpc.StatusCode.RESOURCE_EXHAUSTED,
    CloseCode.TOO_BIG: grpc.StatusCode.RESOURCE_EXHAUSTED,
    CloseCode.TRY_AGAIN_LATER: grpc.StatusCode.UNAVAILABLE,
    CloseCode.REPLACED: grpc.StatusCode.ABORTED,
    CloseCode.UNAUTHENTICATED: grpc.StatusCode.UNAUTHENTICATED,
    CloseCode.HEARTBEAT_TIMEOUT: grpc.StatusCode.UNAVAILABLE,
    CloseCode.SLOW_CONSUMER: grpc.StatusCode.RESOURCE_EXHAUSTED,
}
CLOSE_CODE_KEY = "chat-close-code"

# How the close reasons of a device that did not sign in name what it sends.
REASONS = Reasons("message", elsewhere="authorization metadata")
# Messages of one stream handed to the reactor and not yet handled there; the reader
# waits beyond it, so HTTP/2 flow control holds back a device that floods.
MAX_UNHANDLED = 64
# The key of a fan-out event's gRPC frame (serialized ServerEvent) in EncodedEvent.
FRAME_KEY = "grpc"


def _serialized(encoded):
    return encoded.payload if encoded.payload is not None else encoded.event.SerializeToString()


class End:
    """The end of a stream: a WebSocket close code and its reason.

    ``now``: end at once, dropping what waits to be written (an abort).
    """

    __slots__ = ("code", "reason", "now")

    def __init__(self, code, reason, now=False):
        self.code = code
        self.reason = reason
        self.now = now


class _Handled:
    """Reactor → loop: the reactor has handled one message of the stream."""


HANDLED = _Handled()


class StreamWriter:
    """The loop side of one Connect stream: writes, in order, what the device's Outbox released.

    Loop thread only, but for ``written`` (bytes written so far), which the reactor reads:
    one writer per attribute, so no lock.
    """

    __slots__ = ("frames", "written", "waiter", "end", "abort", "task", "unhandled", "credit")

    def __init__(self):
        self.frames = collections.deque()  # bytes, and the markers that resume the Outbox
        self.written = 0
        self.waiter = None  # the future write_all awaits while nothing is to be written
        self.end = None  # End once the gateway closed the stream (after the frames before it)
        self.abort = None  # End that ends it at once (slow consumer, drain past its deadline)
        self.task = asyncio.current_task()
        self.unhandled = 0  # messages handed to the reactor, not handled yet
        self.credit = asyncio.Event()

    async def received(self):
        """After handing one message to the reactor: wait while too many are unhandled."""
        self.unhandled += 1
        if self.unhandled >= MAX_UNHANDLED:
            self.credit.clear()
            await self.credit.wait()

    def push(self, item):
        """One item of the hand-off: a frame, a resume marker, an End or HANDLED."""
        if item is HANDLED:
            self.unhandled -= 1
            if self.unhandled < MAX_UNHANDLED:
                self.credit.set()
            return
        ends = item.__class__ is End
        if self.abort is not None or (self.end is not None and not (ends and item.now)):
            return
        if ends and item.now:
            self.frames.clear()
            self.abort = item
            self.task.cancel()  # the writer may be stuck in a write the device does not read
            return
        if ends:
            self.end = item
        else:
            self.frames.append(item)
        waiter = self.waiter
        if waiter is not None:  # a bare future: an asyncio.Event costs a deque and a loop lookup per wake-up
            self.waiter = None
            if not waiter.done():
                waiter.set_result(None)

    async def write_all(self, context):
        """Write the frames until the stream ends; returns the End."""
        try:
            while True:
                if self.frames:
                    item = self.frames.popleft()
                    if item.__class__ is bytes:
                        await context.write(item)
                        self.written += len(item)
                    else:
                        item()  # every frame handed before the Outbox paused is written: resume it
                elif self.end is not None:
                    return self.end
                else:
                    self.waiter = self.task.get_loop().create_future()
                    await self.waiter
        except asyncio.CancelledError:
            if self.abort is not None:
                return self.abort
            raise


class Handoff:
    """Reactor → loop: (stream, item) pairs in order, one loop wake-up per batch.

    Without a lock (it would cost more than the rest of a delivery): one thread puts, the
    other drains, deque appends and pops are atomic, and the flag is read after an append
    and cleared before a drain counts what to take, so every item is either taken by the
    wake-up under way or makes the next one.
    """

    def __init__(self, loop):
        self._loop = loop
        self._items = collections.deque()
        self._scheduled = False

    def put(self, stream, item):
        self._items.append((stream, item))
        if self._scheduled:
            return
        self._scheduled = True
        try:
            self._loop.call_soon_threadsafe(self._drain)
        except RuntimeError:  # the loop is closed: the edge has stopped
            pass

    def _drain(self):
        self._scheduled = False
        items = self._items
        for _ in range(len(items)):  # what is there now; later items have their own wake-up
            stream, item = items.popleft()
            stream.push(item)


@implementer(ISessionTransport)
class GrpcDevice:
    """The reactor side of one Connect stream: its sign-in, then a Session's transport."""

    log = Logger()
    transport_name = "grpc"

    def __init__(self, edge, stream, fallback_device, resume_token=""):
        self.edge = edge
        self.gateway = edge.gateway
        self.session = None
        self._stream = stream
        self._handoff = edge.handoff
        self._opening = Opening(
            self.gateway, self, self._session_opened, REASONS, self.log, fallback_device, resume_token
        )
        limit = self.gateway.config.send_buffer_bytes
        self._outbox = Outbox(self._write, limit, self._slow_consumer, unsent=self._unsent)
        self._pause_above = buffer_size(limit)
        self._handed = 0  # bytes handed to the writer
        self._recheck_at = self._pause_above  # handed bytes past which the writer's progress is read
        self._flowing = True  # the Outbox is neither paused nor holding frames, and the stream not closing
        self._closing = False
        self._end = None  # the End of a close, while frames still wait in the Outbox
        self._close_timer = None
        self._gone = False

    # ------------------------------------------------------------ stream events (reactor thread)

    def start(self, token):
        self.edge.devices.add(self)
        if self.edge.stopping or getattr(self.gateway, "draining", False):
            self.close(CloseCode.GOING_AWAY, self.gateway.reconnect_hint())
        elif over_connect_rate(self.gateway, self):  # storm control, before the token is verified
            self.close(CloseCode.TRY_AGAIN_LATER, hinted(TOO_MANY_CONNECTS, self.gateway.connects.retry_after()))
        else:
            self._opening.start(token)

    def received(self, item):
        """One parsed StreamRequest, or the codec.FrameError of one that did not parse."""
        self._handoff.put(self._stream, HANDLED)  # the reader may hand over the next one
        if self._closing or self._gone:
            return
        session = self.session
        if session is None:
            if isinstance(item, codec.FrameError):
                self._opening.undecodable(item)
            else:
                self._opening.receive(item)
            return
        session.activity()
        if isinstance(item, codec.FrameError):
            session.send_error(grpc.StatusCode.INVALID_ARGUMENT, str(item))
        else:
            session.handle(item)

    def over_budget(self, reason):
        """The reader found the device over its inbound budget for OVER_BUDGET_CLOSE_SEC."""
        if not self._closing and not self._gone:
            self.log.info("closing a gRPC stream: {reason}", reason=reason)
            self.close(CloseCode.POLICY, reason)

    def half_closed(self):
        """The device ended its side of the stream: the connection closes normally."""
        self.close(CloseCode.NORMAL, "the device closed its stream")

    def gone(self):
        """The RPC ended, for whatever reason: forget the session everywhere."""
        self._gone = True
        self._flowing = False
        self.edge.devices.discard(self)
        self._outbox.close()
        self._cancel_close_timer()
        if self._opening is not None:
            self._opening.gone()
        if self.session is not None:
            self.session.closed_by_transport()

    def resume_writing(self):
        """The writer has written every frame handed before the Outbox paused."""
        self._outbox.resumeProducing()
        outbox = self._outbox
        self._flowing = not (self._closing or self._gone or outbox.paused or len(outbox))

    def _session_opened(self, session):
        """The Opening's hand-over: messages go to ``session`` from now on."""
        self.session = session
        self._outbox.follow(session)
        self._opening = None

    # ------------------------------------------------------------ ISessionTransport

    # While the Outbox is neither paused nor holding frames it writes every frame straight
    # through, whatever its kind: the frame skips it and the policy lookup (per delivery).

    def send_event(self, event):
        if self._flowing:
            self._hand(event.SerializeToString())
        elif not self._closing:
            kind, key = classify(event)
            self._outbox.send(event.SerializeToString(), kind, key)

    def send_encoded(self, encoded):
        """False when the frame is dropped (the stream closing): the session does not count it as given."""
        if self._flowing:  # _hand, inlined: a fan-out calls this once per recipient
            frame = encoded.frame(FRAME_KEY, _serialized)
            self._handed += len(frame)
            self._handoff.put(self._stream, frame)
            if self._handed > self._recheck_at:
                self._check_unwritten()
            return True
        if self._closing:
            return False
        kind, key = encoded.policy
        return self._outbox.send(encoded.frame(FRAME_KEY, _serialized), kind, key)

    def _hand(self, frame):
        """Hand ``frame`` to the writer; pause the Outbox past its share of unwritten bytes."""
        self._handed += len(frame)
        self._handoff.put(self._stream, frame)
        if self._handed > self._recheck_at:
            self._check_unwritten()

    def _check_unwritten(self):
        written = self._stream.written
        if self._handed - written > self._pause_above:
            self._flowing = False
            self._outbox.pauseProducing()
            # The writer calls it once it has written every frame before it.
            self._handoff.put(self._stream, functools.partial(self.edge.reactor.callFromThread, self.resume_writing))
        else:
            self._recheck_at = written + self._pause_above  # fewer can be unwritten until then

    def _write(self, frame):
        """The Outbox's write, as it releases the frames that waited."""
        self._hand(frame)
        if self._end is not None and not len(self._outbox):
            self._hand_end()

    def _unsent(self):
        return self._handed - self._stream.written

    def _slow_consumer(self):
        self.log.info(
            "ending a slow gRPC consumer: more than {limit} bytes waiting", limit=self.gateway.config.send_buffer_bytes
        )
        self._closing = True
        self._flowing = False
        self.gateway.counts.connection_closing(self, CloseCode.SLOW_CONSUMER)
        reason = "slow consumer: more than SEND_BUFFER_BYTES waiting"
        self._handoff.put(self._stream, End(CloseCode.SLOW_CONSUMER, reason, now=True))

    def ping(self):
        """HTTP/2 keepalive (grpc.keepalive_time_ms) probes the connection; nothing to send."""

    def close(self, code, reason):
        """End the stream after the frames still waiting (for at most CLOSE_TIMEOUT_SEC)."""
        if self._closing or self._gone:
            return
        self._closing = True
        self._flowing = False
        self.gateway.counts.connection_closing(self, code)
        if self._opening is not None:
            self._opening.gone()  # a stream that ends opens no session
        self._end = End(code, reason)
        if not len(self._outbox):
            self._hand_end()
        else:
            self._close_timer = self.gateway.clock.callLater(self.gateway.config.close_timeout_sec, self._close_overdue)

    def _close_overdue(self):
        self._close_timer = None
        self._outbox.close()
        self._hand_end()

    def _hand_end(self):
        end, self._end = self._end, None
        self._cancel_close_timer()
        self._handoff.put(self._stream, end)

    def _cancel_close_timer(self):
        if self._close_timer is not None and self._close_timer.active():
            self._close_timer.cancel()
        self._close_timer = None

    def abort(self):
        """End the stream now, whatever waits to be written (a drain past its deadline)."""
        if not self._gone:
            self._closing = True
            self._flowing = False
            self._end = None
            self._outbox.close()
            self._cancel_close_timer()
            self._handoff.put(self._stream, End(CloseCode.GOING_AWAY, "gateway stopped", now=True))
