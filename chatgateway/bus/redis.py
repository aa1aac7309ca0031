"""The event bus on Redis pub/sub, for many gateway instances (DESIGN §7).

Two connections, both binary (``charset=None``: payloads are serialized
protobuf and any byte string must arrive unchanged):

- a subscriber connection in pub/sub mode, which receives the messages of the
  channels this gateway has local connections for;
- a normal connection for PUBLISH.

Channels asked for are remembered. When the subscriber connection is lost
(Redis restarted, ``CLIENT KILL TYPE pubsub``, a dead peer found by the
health PING) it reconnects with capped backoff, subscribes to every
remembered channel again, and only then counts as ready and calls the
``on_reconnect`` callbacks: messages published meanwhile are lost (pub/sub
keeps nothing), and the gateway tells its devices so they can catch up.

``publish`` fails at once while the publishing connection is down instead
of queueing without bound; the caller logs it (the core's stored events stay
available through GetHistory).

Each SUBSCRIBE/UNSUBSCRIBE names one channel, so every command gets exactly
one confirmation and txredisapi's replies stay matched to their commands
(with several channels per command, the extra confirmations could be taken
by a later PING).

Redis: 6.2 or later (PUBLISH/SUBSCRIBE and PING in subscribed mode are much
older). Channels are per server, not per database: the /db of EVENTS_URI
does not separate two deployments on one Redis.
"""

from twisted.internet import defer
from twisted.logger import Logger
from zope.interface import implementer

from chatgateway.bus import IEventBus
from chatgateway.redisconn import REDIS_TIMEOUT_SEC, ConnectionError, RedisConnection, SubscriberProtocol, parse_uri


@implementer(IEventBus)
class RedisBus:
    log = Logger()

    def __init__(self, config, reactor, clock=None, timeout=REDIS_TIMEOUT_SEC):
        address = parse_uri(config.events_uri)
        self._channels = set()
        self._receiver = None
        self._reconnect_callbacks = []
        self.subscriber = RedisConnection(
            address,
            reactor,
            "bus-subscriber",
            charset=None,
            protocol=SubscriberProtocol,
            timeout=timeout,
            clock=clock,
            prepare=self._resubscribe,
            on_message=self._message,
        )
        self.subscriber.on_ready(self._back)
        self.publisher = RedisConnection(address, reactor, "bus-publisher", charset=None, timeout=timeout, clock=clock)

    @property
    def ready(self):
        """Subscribed to every remembered channel and receiving."""
        return self.subscriber.ready

    @property
    def channels(self):
        return frozenset(self._channels)

    def start(self, receiver):
        """Connect both connections in the background; messages go to receiver(channel, payload)."""
        self._receiver = receiver
        self.subscriber.start()
        self.publisher.start()

    def on_reconnect(self, callback):
        """Call ``callback()`` once resubscribed after messages may have been missed."""
        self._reconnect_callbacks.append(callback)

    def subscribe(self, channel):
        if channel in self._channels:
            return defer.succeed(None)
        self._channels.add(channel)
        protocol = self.subscriber.protocol
        if protocol is None:
            # Subscribed when the connection is (back) up; until then we miss messages.
            self.subscriber.needs_resync = True
            return defer.succeed(None)
        return self._confirmed(defer.maybeDeferred(protocol.subscribe, channel))

    def unsubscribe(self, channel):
        if channel not in self._channels:
            return defer.succeed(None)
        self._channels.discard(channel)
        protocol = self.subscriber.protocol
        if protocol is None:
            return defer.succeed(None)
        return self._confirmed(defer.maybeDeferred(protocol.unsubscribe, channel))

    def publish(self, channel, payload):
        return self.publisher.execute("PUBLISH", channel, payload).addCallback(lambda _: None)

    def stop(self):
        self._receiver = None
        return defer.gatherResults([self.subscriber.stop(), self.publisher.stop()], consumeErrors=True)

    # ------------------------------------------------------------ internals

    def _confirmed(self, d):
        # A connection lost meanwhile is not an error: the channel is remembered
        # and (un)subscribed on the next connection.
        d.addCallbacks(lambda _: None, lambda f: None if f.check(ConnectionError) else f)
        return d

    def _resubscribe(self, protocol):
        """On each new subscriber connection: SUBSCRIBE every remembered channel."""
        subscribed = [defer.maybeDeferred(protocol.subscribe, c) for c in sorted(self._channels)]
        return defer.gatherResults(subscribed, consumeErrors=True)

    def _message(self, channel, payload):
        channel = channel.decode("utf-8", "replace") if isinstance(channel, bytes) else channel
        if channel not in self._channels or self._receiver is None:
            return  # in flight when we unsubscribed
        try:
            self._receiver(channel, payload)
        except Exception:
            self.log.failure("receiver of {channel} failed", channel=channel)

    def _back(self, resync):
        if not resync:
            return
        self.log.info("bus resubscribed to {count} channels; messages published meanwhile were missed",
                      count=len(self._channels))
        for callback in list(self._reconnect_callbacks):
            try:
                callback()
            except Exception:
                self.log.failure("bus on_reconnect callback failed")
