"""Connections to Redis (txredisapi) for the store and the bus.

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
- The timeout judges Redis, not our own reactor (chatgateway.redisconn.replywatch):
  only time during which Redis sent nothing while we were listening counts.
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

import contextlib

import txredisapi
from OpenSSL import SSL
from twisted.internet import defer, task
from twisted.logger import Logger

from chatgateway.redisconn.protocols import RedisProtocol
from chatgateway.redisconn.replywatch import JudgedReplyTimeouts
from chatgateway.telemetry.counts import GatewayCounts

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

ConnectionError = txredisapi.ConnectionError
TimeoutError = txredisapi.TimeoutError


def all_replies(sent):
    """A Deferred of the replies of ``sent`` (Deferreds), in order; on a failure, that
    failure itself (not gatherResults' FirstError wrapping it)."""
    d = defer.gatherResults(sent, consumeErrors=True)
    return d.addErrback(lambda f: f.value.subFailure if f.check(defer.FirstError) else f)


class _Factory(txredisapi.RedisFactory):
    """txredisapi's factory, reporting connections to its RedisConnection."""

    initialDelay = RECONNECT_INITIAL_DELAY_SEC
    maxDelay = RECONNECT_MAX_DELAY_SEC

    def __init__(self, owner, address, protocol, charset, timeout):
        if not issubclass(protocol, JudgedReplyTimeouts):
            raise TypeError(
                f"{protocol.__name__} must derive from JudgedReplyTimeouts (e.g. redisconn.protocols.RedisProtocol)"
            )
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
        p.batch = self.owner.batch
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
        self.owner.log.error(
            "redis {name} at {address} refused AUTH or SELECT; retrying",
            name=self.owner.name,
            address=self.owner.address,
        )
        return defer.succeed(None)

    def connectionError(self, why):
        # Lazy connections have nobody waiting on self.deferred; log instead.
        self.owner.log.warn("redis {name}: {why}", name=self.owner.name, why=why)


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
        counts=None,
    ):
        self.address = address
        self.reactor = reactor
        self.clock = clock if clock is not None else reactor
        self.name = name
        self.timeout = timeout
        self.prepare = prepare
        self.on_message = on_message or (lambda channel, message: None)
        # What the pub/sub messages of one read are handled in (a context manager factory).
        self.batch = contextlib.nullcontext
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
        self._tls_error = None  # the last TLS failure logged (each new one is logged once)
        self._health = task.LoopingCall(self._check)
        self._health.clock = self.clock
        self._health_interval = health_interval
        # Failed commands are counted as dependency errors (the service tree's GatewayCounts; without one, its own).
        self._counts = counts if counts is not None else GatewayCounts()

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
        self._counts.dependency_error("redis", failure.type.__name__)
        if failure.check(TimeoutError):
            # txredisapi aborts the connection on the next reactor turn; from now on it is not ready.
            self._ready = False
            self.needs_resync = True
        return failure

    def _live(self):
        if not self._ready or self._protocol is None or not self._protocol.connected:
            self.needs_resync = True
            self._counts.dependency_error("redis", "not_connected")
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
            self.log.warn(
                "redis {name}: new connection not usable ({error}); reconnecting",
                name=self.name,
                error=failure.getErrorMessage(),
            )
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
            self.log.warn(
                "redis {name}: connection to {address} lost; reconnecting", name=self.name, address=self.address
            )

    def lost_because(self, protocol, reason):
        """A connection of ours was lost (ReportsLoss): a TLS failure is an error to log, once per kind."""
        if self.stopping or not reason.check(SSL.Error):
            return
        error = reason.getErrorMessage()
        if error != self._tls_error:
            self._tls_error = error
            self.log.error(
                "redis {name}: TLS with {address} failed ({error}); check REDIS_TLS_CA_FILE, "
                "REDIS_TLS_CERT_FILE/REDIS_TLS_KEY_FILE, REDIS_TLS_VERIFY and the host name of the URI; retrying",
                name=self.name,
                address=self.address,
                error=error,
            )

    def _check(self):
        """Health check: PING when connected; warn now and then while down."""
        if self._ready and self._protocol is not None:
            if self.clock.seconds() - self.last_message_at < self._health_interval:
                # Messages are arriving: the peer is alive. A PING would wait behind
                # that backlog and could time out on a busy but healthy connection.
                return
            d = self._protocol.ping()  # a timeout aborts the connection: reconnect follows
            d.addErrback(
                lambda f: self.log.warn(
                    "redis {name}: health check failed: {error}", name=self.name, error=f.getErrorMessage()
                )
            )
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
