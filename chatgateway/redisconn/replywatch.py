"""Reply timeouts that judge Redis, not our own reactor.

When the process is CPU-bound, Twisted runs expired timers before it reads sockets,
so a plain timer would call a reply sitting unread in our socket late and drop a
healthy connection. Here only time during which Redis sent nothing while we were
listening counts (ReplyWatch), and JudgedReplyTimeouts puts a txredisapi protocol's
reply timeouts on one such watch.
"""

import collections
import fcntl
import struct
import termios

# A reply timeout is judged in this many steps, so that a step the reactor ran late
# (busy with other work, not reading sockets) can be left out of the count.
REPLY_TIMEOUT_STEPS = 4
# A step whose check runs at most this share of a step late counts as on time.
ON_TIME_SHARE = 0.1


def unread_bytes(transport):
    """Bytes Redis sent that wait unread in our socket (0 if unknown: no socket)."""
    try:
        fileno = transport.getHandle().fileno()
        return struct.unpack("i", fcntl.ioctl(fileno, termios.FIONREAD, b"\0\0\0\0"))[0]
    except (AttributeError, OSError, TypeError, ValueError):
        return 0


def unsent_bytes(transport):
    """Bytes of our commands still in Twisted's write buffer (twisted.internet.abstract.FileDescriptor)."""
    try:
        return len(transport.dataBuffer) - transport.offset + transport._tempDataLen
    except (AttributeError, TypeError):
        return 0


class _Deadline:
    """The IDelayedCall txredisapi holds for one command (``active``, ``cancel``);
    the connection's ReplyWatch keeps the time."""

    __slots__ = ("expire", "live")

    def __init__(self, expire):
        self.expire = expire
        self.live = True

    def active(self):
        return self.live

    def cancel(self):
        self.live = False


class ReplyWatch:
    """The reply timeouts of one connection's commands, counting only Redis's silence
    while we listened.

    Redis answers in order and txredisapi's timeout aborts the whole connection, so
    one clock per connection does for all its commands: it runs while a command
    waits for its reply and expires the oldest once Redis has been silent for
    ``timeout``. (A timer per command cost a heap insertion and a cancellation per
    command: two thirds of the time of a heartbeat's pipelined refresh of 10,000
    connections.)

    Checked every ``timeout / REPLY_TIMEOUT_STEPS`` seconds. A step adds to the
    silence only if Redis sent nothing during it (nothing read from the
    connection, nothing waiting unread in the socket) and our commands had left
    (nothing of ours unsent); a step the reactor ran late adds only its on-time
    part, since a busy reactor reads nothing. Redis sending anything starts the
    count again: it is alive, our reply is behind what it sent.
    """

    def __init__(self, reactor, protocol, timeout):
        self._reactor = reactor
        self._protocol = protocol
        self._timeout = timeout
        self._step = timeout / REPLY_TIMEOUT_STEPS
        self._waiting = collections.deque()  # _Deadline, oldest first
        self.silence = 0.0
        self._call = None
        self._since = 0.0

    def deadline(self, expire):
        """A deadline for a command sent now; ``expire`` runs if Redis is silent for the timeout."""
        deadline = _Deadline(expire)
        self._waiting.append(deadline)
        if self._call is None:
            self.silence = 0.0
            self._arm()
        return deadline

    def _arm(self):
        self._since = self._reactor.seconds()
        self._call = self._reactor.callLater(self._step, self._check)

    def _oldest(self):
        waiting = self._waiting
        while waiting and not waiting[0].live:
            waiting.popleft()
        return waiting[0] if waiting else None

    def _check(self):
        self._call = None
        oldest = self._oldest()
        if oldest is None:
            return  # every reply came: the next command starts the clock again
        late = self._reactor.seconds() - (self._since + self._step)
        transport = self._protocol.transport
        if self._protocol.heard_at >= self._since or unread_bytes(transport):
            self.silence = 0.0
        elif unsent_bytes(transport):
            pass  # our command is still in our buffer: nothing to hold against Redis
        elif late <= self._step * ON_TIME_SHARE:
            self.silence += self._step
        else:
            self.silence += max(0.0, self._step - late)
        if self.silence >= self._timeout * (1 - 1e-9):
            oldest.live = False
            oldest.expire()  # txredisapi fails every waiting command and aborts the connection
        else:
            self._arm()

    def stop(self):
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call = None
        self._waiting.clear()


class JudgedReplyTimeouts:
    """Mixin for txredisapi protocols: reply timeouts are kept by one ReplyWatch on ``reactor``.

    txredisapi arms ``self.callLater(replyTimeout, fire_timeout)`` for each command
    (its only use of a delay above zero) and cancels it when the reply comes.
    """

    reactor = None  # set by the factory
    heard_at = float("-inf")  # when bytes were last read from Redis
    _reply_watch = None

    def dataReceived(self, data, unpause=False):
        if data and not unpause:  # unpause: txredisapi handing itself back bytes it read before
            self.heard_at = self.reactor.seconds()
        return super().dataReceived(data, unpause)

    def callLater(self, delay, f, *args, **kwargs):
        if delay > 0:
            if self._reply_watch is None:
                self._reply_watch = ReplyWatch(self.reactor, self, delay)
            return self._reply_watch.deadline(lambda: f(*args, **kwargs))
        return self.reactor.callLater(delay, f, *args, **kwargs)

    def connectionLost(self, reason):
        if self._reply_watch is not None:
            self._reply_watch.stop()
        return super().connectionLost(reason)
