"""Connections to Redis (txredisapi) for the store and the bus.

``parse_uri`` turns CACHE_URI / EVENTS_URI into a RedisAddress:

    redis://[[user]:password@]host[:port][/db]      (port 6379, db 0 by default)
    unix:///path/to/redis.sock[?db=N][&password=P]
    rediss://...                                    refused: TLS is not supported yet

``RedisConnection`` is one connection that the process never waits for:

- It connects in the background; Redis being down at start does not stop the
  gateway from starting, it only keeps ``ready`` False (and /readyz red).
- It reconnects for ever with txredisapi's jittered exponential backoff, from
  RECONNECT_INITIAL_DELAY_SEC capped at RECONNECT_MAX_DELAY_SEC. Failed AUTH
  or SELECT keep retrying too (txredisapi would stop for good; a Redis that is
  still loading its dataset refuses both for a while).
- Every command has a reply timeout (REDIS_TIMEOUT_SEC): a Redis that stops
  answering (``DEBUG SLEEP``, a dead peer) fails our calls within that bound,
  and txredisapi then aborts the connection so it is re-established.
  A PING every HEALTH_CHECK_INTERVAL_SEC finds a dead peer when we are idle.
- The timeout judges Redis, not our own reactor (``ReplyWatch``): when the
  process is CPU-bound, Twisted runs expired timers before it reads sockets,
  so a plain timer would call a reply sitting unread in our socket late and
  drop a healthy connection. Only time during which Redis sent nothing while
  we were listening counts.
- While it is not ready, calls fail at once with ConnectionError instead of
  waiting in an unbounded queue (txredisapi's pool would park them until a
  connection comes back).
- ``ready`` means: connected and it answered a PING (and the owner's
  ``prepare`` step, e.g. resubscribing, is done).

Commands go straight to the live protocol, in call order, on one TCP
connection. ``pipeline`` issues a batch in one reactor turn; Twisted buffers
transport writes until the reactor flushes them, so the batch leaves in one
write and costs one round trip, as txredisapi's ``pipeline()`` would, but
without checking the connection out of txredisapi's pool queue (where other
calls wait unboundedly and may be reordered).

txredisapi 1.6 schedules reconnection on the global reactor; reply timeouts,
the endpoint, health checks and logging use the reactor passed in.
"""

import collections
import dataclasses
import fcntl
import struct
import termios
from urllib.parse import parse_qs, unquote, urlsplit

import txredisapi
from twisted.internet import defer, task
from twisted.internet.endpoints import HostnameEndpoint, UNIXClientEndpoint
from twisted.logger import Logger

from chatgateway import telemetry

# A Redis that has not answered a command within this many seconds is treated as down.
REDIS_TIMEOUT_SEC = 2.0
# Reconnection backoff: first retry after about this long, then growing by e.
RECONNECT_INITIAL_DELAY_SEC = 0.5
# ... never waiting longer than this between attempts.
RECONNECT_MAX_DELAY_SEC = 5.0
# An idle connection is PINGed this often, so a dead peer is noticed.
HEALTH_CHECK_INTERVAL_SEC = 5.0
# While Redis is unreachable, a warning is logged this often.
DOWN_WARNING_INTERVAL_SEC = 30.0
# A reply timeout is judged in this many steps, so that a step the reactor ran late
# (busy with other work, not reading sockets) can be left out of the count.
REPLY_TIMEOUT_STEPS = 4
# A step whose check runs at most this share of a step late counts as on time.
ON_TIME_SHARE = 0.1

ConnectionError = txredisapi.ConnectionError
TimeoutError = txredisapi.TimeoutError


@dataclasses.dataclass(frozen=True)
class RedisAddress:
    host: str = None
    port: int = None
    path: str = None  # unix socket
    db: int = 0
    username: str = None
    password: str = dataclasses.field(default=None, repr=False)

    def __str__(self):
        """For logs: never shows the password."""
        where = f"unix://{self.path}" if self.path else f"redis://{self.host}:{self.port}"
        return f"{where}/{self.db}"

    def endpoint(self, reactor, timeout):
        if self.path:
            return UNIXClientEndpoint(reactor, self.path, timeout=timeout)
        return HostnameEndpoint(reactor, self.host, self.port, timeout=timeout)


def parse_uri(uri):
    """The RedisAddress of a redis:// or unix:// URI; ValueError (one clear line) otherwise."""
    parts = urlsplit(uri.strip())
    query = parse_qs(parts.query)
    if parts.scheme == "rediss":
        raise ValueError(f"{uri!r}: rediss:// (TLS to Redis) is not supported yet; use redis:// or unix://")
    if parts.scheme not in ("redis", "unix"):
        raise ValueError(f"{uri!r}: not a Redis URI; use redis://host:port/db or unix:///path?db=N")
    password = unquote(parts.password) if parts.password else None
    password = query.get("password", [password])[0]
    username = unquote(parts.username) if parts.username else None
    try:
        if parts.scheme == "unix":
            if not parts.path:
                raise ValueError("unix:// must name a socket path, e.g. unix:///run/redis.sock?db=0")
            db = int(query.get("db", ["0"])[0])
            address = RedisAddress(path=parts.path, db=db, username=username, password=password)
        else:
            if not parts.hostname:
                raise ValueError("must name a host, e.g. redis://127.0.0.1:6379/0")
            db_text = parts.path.strip("/") or query.get("db", ["0"])[0]
            address = RedisAddress(
                host=parts.hostname, port=parts.port or 6379, db=int(db_text), username=username, password=password
            )
    except ValueError as e:
        raise ValueError(f"{uri!r}: {e}") from None
    if address.db < 0:
        raise ValueError(f"{uri!r}: the database number must be 0 or more")
    return address


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


def all_replies(sent):
    """A Deferred of the replies of ``sent`` (Deferreds), in order; on a failure, that
    failure itself (not gatherResults' FirstError wrapping it)."""
    d = defer.gatherResults(sent, consumeErrors=True)
    return d.addErrback(lambda f: f.value.subFailure if f.check(defer.FirstError) else f)


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


class PromptReader:
    """Mixin for txredisapi protocols: every complete reply of a read is handled in that read.

    txredisapi hands the bytes that follow each bulk string to a callLater(0) and
    pauses the transport until then: one bulk string per reactor turn, so a pub/sub
    message takes three turns and, while the reactor is busy (a fan-out), the socket
    is not read and Redis's output buffer for us grows (past
    client-output-buffer-limit pubsub, Redis drops the subscriber). Here those bytes
    are parsed at once, in a loop (not recursively: a read holds hundreds of bulks).

    Reads are fed in pieces of READ_PIECE bytes: txredisapi copies what is left of
    its buffer at every line and bulk, so a whole 64 KiB read would cost a copy of
    tens of KiB per reply.
    """

    READ_PIECE = 4096
    _rest = None

    def setLineMode(self, extra=b""):
        self.line_mode = 1
        if extra:
            self._rest = extra

    def dataReceived(self, data, unpause=False):
        piece = self.READ_PIECE
        for start in range(0, max(len(data), 1), piece):
            super().dataReceived(data[start : start + piece], unpause)
            while self._rest is not None:
                rest, self._rest = self._rest, None
                super().dataReceived(rest)


class RedisProtocol(JudgedReplyTimeouts, PromptReader, txredisapi.RedisProtocol):
    """txredisapi's protocol, reading promptly, with judged reply timeouts."""


class _Factory(txredisapi.RedisFactory):
    """txredisapi's factory, reporting connections to its RedisConnection."""

    initialDelay = RECONNECT_INITIAL_DELAY_SEC
    maxDelay = RECONNECT_MAX_DELAY_SEC

    def __init__(self, owner, address, protocol, charset, timeout):
        if not issubclass(protocol, JudgedReplyTimeouts):
            raise TypeError(f"{protocol.__name__} must derive from JudgedReplyTimeouts (e.g. redisconn.RedisProtocol)")
        super().__init__(
            str(address),
            address.db or None,  # db 0 needs no SELECT round trip
            1,
            isLazy=True,
            charset=charset,
            password=address.password,
            replyTimeout=timeout,
            convertNumbers=False,  # a payload or member like b"42" stays what it is
            username=address.username,
        )
        self.protocol = protocol
        self.owner = owner

    def buildProtocol(self, addr):
        p = super().buildProtocol(addr)
        p.reactor = self.owner.reactor
        return p

    def addConnection(self, conn):
        super().addConnection(conn)
        if conn in self.pool:
            self.owner._connection_made(conn)

    def delConnection(self, conn):
        super().delConnection(conn)
        # We never take connections from txredisapi's queue; drop the dead one.
        if conn in self.connectionQueue.pending:
            self.connectionQueue.remove(conn)
        self.owner._connection_lost(conn)

    def stopTrying(self):
        # txredisapi stops for good when AUTH or SELECT fails; a loading or
        # misconfigured Redis should be retried (with backoff) and logged.
        if self.owner.stopping:
            return super().stopTrying()
        self.owner.log.error("redis {name} at {address} refused AUTH or SELECT; retrying", name=self.owner.name,
                             address=self.owner.address)
        return defer.succeed(None)

    def connectionError(self, why):
        # Lazy connections have nobody waiting on self.deferred; log instead.
        self.owner.log.warn("redis {name}: {why}", name=self.owner.name, why=why)


class SubscriberProtocol(JudgedReplyTimeouts, PromptReader, txredisapi.SubscriberProtocol):
    """Hands every pub/sub message to the connection's ``on_message``."""

    def messageReceived(self, pattern, channel, message):
        owner = self.factory.owner
        owner.last_message_at = owner.clock.seconds()
        owner.on_message(channel, message)


class RedisConnection:
    """One lazily connected, self-healing connection to Redis (see the module docstring).

    ``prepare(protocol)`` (optional) runs on each new connection after its
    first PING and before it counts as ready; it may return a Deferred.
    ``on_ready(callback)`` registers ``callback(resync)``, called each time the
    connection becomes ready; ``resync`` is True when writes may have been
    lost since the previous ready state (the connection was lost, or a call
    was refused, or ``needs_resync`` was set by the owner).
    """

    log = Logger()

    def __init__(
        self,
        address,
        reactor,
        name,
        charset="utf-8",
        protocol=RedisProtocol,
        timeout=REDIS_TIMEOUT_SEC,
        clock=None,
        prepare=None,
        on_message=None,
        health_interval=HEALTH_CHECK_INTERVAL_SEC,
    ):
        self.address = address
        self.reactor = reactor
        self.clock = clock if clock is not None else reactor
        self.name = name
        self.timeout = timeout
        self.prepare = prepare
        self.on_message = on_message or (lambda channel, message: None)
        self.last_message_at = float("-inf")  # when pub/sub last delivered a message
        self.stopping = False
        self.needs_resync = False
        self._factory = _Factory(self, address, protocol, charset, timeout)
        self._protocol = None  # the live connection, ready or not
        self._ready = False
        self._ready_callbacks = []
        self._started = False
        self._down_since = None
        self._warned_at = None
        self._health = task.LoopingCall(self._check)
        self._health.clock = self.clock
        self._health_interval = health_interval

    @property
    def ready(self):
        return self._ready

    @property
    def protocol(self):
        """The connected protocol (ready or still preparing), or None."""
        return self._protocol

    def on_ready(self, callback):
        self._ready_callbacks.append(callback)

    def start(self):
        """Begin connecting in the background; returns at once."""
        if self._started:
            return
        self._started = True
        self._down_since = self.clock.seconds()
        self.log.info("redis {name}: connecting to {address}", name=self.name, address=self.address)
        self._factory.startConnecting(self.address.endpoint(self.reactor, self.timeout))
        self._health.start(self._health_interval, now=False)

    def stop(self):
        """Stop reconnecting and close the connection. Returns a Deferred; calling it again is harmless."""
        if self.stopping:
            return defer.succeed(None)
        self.stopping = True
        self._ready = False
        if self._health.running:
            self._health.stop()
        if not self._started:
            return defer.succeed(None)
        d = self._factory.disconnect()
        # It fires inside a transition of ClientService's state machine; let the
        # caller go on (and maybe stop another connection) after it.
        return d.addCallback(lambda _: task.deferLater(self.reactor, 0, lambda: None))

    # ------------------------------------------------------------ commands

    def execute(self, *args):
        """One command. Fails at once with ConnectionError while not ready."""
        try:
            return self._live().execute_command(*args).addErrback(self._failed)
        except Exception:
            return defer.fail()

    def pipeline(self, commands):
        """Send ``commands`` (tuples of arguments) in one write; their replies, in order."""
        try:
            conn = self._live()
            sent = [conn.execute_command(*command) for command in commands]
        except Exception:
            return defer.fail()
        return all_replies(sent).addErrback(self._failed)

    def eval(self, script, keys=(), args=()):
        """EVALSHA, falling back to EVAL when the script is not cached (txredisapi does both)."""
        try:
            return self._live().eval(script, list(keys), list(args)).addErrback(self._failed)
        except Exception:
            return defer.fail()

    def _failed(self, failure):
        telemetry.dependency_error("redis", failure.type.__name__)
        if failure.check(TimeoutError):
            # txredisapi aborts the connection on the next reactor turn; from now on it is not ready.
            self._ready = False
            self.needs_resync = True
        return failure

    def _live(self):
        if not self._ready or self._protocol is None or not self._protocol.connected:
            self.needs_resync = True
            telemetry.dependency_error("redis", "not_connected")
            raise ConnectionError(f"redis {self.name} at {self.address} is not connected")
        return self._protocol

    # ------------------------------------------------------------ connection state

    def _connection_made(self, protocol):
        if self.stopping:
            return
        self._protocol = protocol
        d = protocol.ping()
        if self.prepare is not None:
            d.addCallback(lambda _: self.prepare(protocol))
        d.addCallbacks(self._prepared, self._prepare_failed, callbackArgs=(protocol,), errbackArgs=(protocol,))

    def _prepared(self, _, protocol):
        if protocol is not self._protocol or not protocol.connected or self.stopping:
            return
        self._ready = True
        resync, self.needs_resync = self.needs_resync, False
        self._down_since = self._warned_at = None
        self.log.info("redis {name}: connected to {address}", name=self.name, address=self.address)
        for callback in list(self._ready_callbacks):
            try:
                callback(resync)
            except Exception:
                self.log.failure("redis {name}: ready callback failed", name=self.name)

    def _prepare_failed(self, failure, protocol):
        if protocol is self._protocol and protocol.connected and not self.stopping:
            self.log.warn("redis {name}: new connection not usable ({error}); reconnecting", name=self.name,
                          error=failure.getErrorMessage())
            protocol.transport.abortConnection()

    def _connection_lost(self, protocol):
        if protocol is not self._protocol:
            return
        was_ready = self._ready
        self._protocol = None
        self._ready = False
        if self.stopping:
            return
        self.needs_resync = True
        self._down_since = self.clock.seconds()
        if was_ready:
            self.log.warn("redis {name}: connection to {address} lost; reconnecting", name=self.name,
                          address=self.address)

    def _check(self):
        """Health check: PING when connected; warn now and then while down."""
        if self._ready and self._protocol is not None:
            if self.clock.seconds() - self.last_message_at < self._health_interval:
                # Messages are arriving: the peer is alive. A PING would wait behind
                # that backlog and could time out on a busy but healthy connection.
                return
            d = self._protocol.ping()  # a timeout aborts the connection: reconnect follows
            d.addErrback(lambda f: self.log.warn("redis {name}: health check failed: {error}", name=self.name,
                                                 error=f.getErrorMessage()))
            return
        now = self.clock.seconds()
        if self._down_since is None:
            return
        if self._warned_at is None or now - self._warned_at >= DOWN_WARNING_INTERVAL_SEC:
            self._warned_at = now
            self.log.warn(
                "redis {name}: {address} unreachable for {seconds:.0f} s; still retrying",
                name=self.name,
                address=self.address,
                seconds=now - self._down_since,
            )
