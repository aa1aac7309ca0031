"""The event bus on Redis pub/sub, for many gateway instances.

The channels: docs/architecture.md#redis-keys-and-channels.

Two connections, both binary (``charset=None``: payloads are serialized
protobuf and any byte string must arrive unchanged):

- a subscriber connection in pub/sub mode, which receives the messages of the
  channels this gateway has local connections for;
- a normal connection for PUBLISH, for the scripts of the membership cache
  (chatgateway.bus.memberships: the cache lives where its changes are published),
  and for those of the room streams (chatgateway.bus.roomstream: publishing a room
  event, reading a room's stream to fill a gap).

Channels asked for are remembered. When the subscriber connection is lost
(Redis restarted, ``CLIENT KILL TYPE pubsub``, a dead peer found by the
health PING) it reconnects with capped backoff, subscribes to every
remembered channel again, and only then counts as ready and calls the
``on_reconnect`` callbacks: messages published meanwhile are lost by pub/sub,
and the gateway reads them from the rooms' streams (chatgateway.sessions.positions).

``publish`` fails at once while the publishing connection is down instead
of queueing without bound; the caller logs it (the core's stored events stay
available through GetHistory).

Subscribing and unsubscribing are batched: the channels asked for in one
reactor turn leave together, at the start of the next, as one SUBSCRIBE (or
UNSUBSCRIBE) naming them all, in the order asked (a connect storm subscribes
thousands of profile channels; one command each cost the reactor more than
Redis). Redis confirms each channel of such a command separately; the first
confirmation answers txredisapi's command, and the others are taken off its
reply queue by waiters added with the command, so they can never be mistaken
for the answer of a later command (a health PING). Resubscribing after a
reconnection sends SUBSCRIBE_BATCH channels per command.

Redis: 6.2 or later (PUBLISH/SUBSCRIBE and PING in subscribed mode are much
older). Channels are per server, not per database: the /db of EVENTS_URI
does not separate two deployments on one Redis.
"""

from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from chatgateway.bus import IEventBus, memberships, roomstream
from chatgateway.redisconn.connection import REDIS_TIMEOUT_SEC, ConnectionError, RedisConnection
from chatgateway.redisconn.protocols import SubscriberProtocol
from chatgateway.redisconn.tls import TLSSettings
from chatgateway.redisconn.uri import parse_uri

# Channels named by one SUBSCRIBE when resubscribing (keeps each command and its replies small).
SUBSCRIBE_BATCH = 1000


def send_batch(protocol, command, channels):
    """One SUBSCRIBE or UNSUBSCRIBE naming ``channels``; fires with the first confirmation.

    The confirmations of the other channels are consumed by waiters queued right
    behind the command's own (txredisapi matches replies to waiters in order).
    """
    d = protocol.subscribe(channels) if command == "SUBSCRIBE" else protocol.unsubscribe(channels)
    for _ in range(len(channels) - 1):
        protocol.replyQueue.get()
    return d


@implementer(IEventBus)
class RedisBus:
    log = Logger()

    def __init__(self, config, reactor, clock=None, timeout=REDIS_TIMEOUT_SEC, counts=None):
        address = parse_uri(config.events_uri, TLSSettings.of(config))
        self._reactor = reactor
        self._batch = []  # [command, [(channel, Deferred)]] runs, in the order asked
        self._flush_call = None
        self._channels = set()
        self._confirming = {}  # channel -> [Deferred] of later subscribers, while its SUBSCRIBE is unconfirmed
        self._receiver = None
        self._reconnect_callbacks = []
        self._stream_max_len = config.room_stream_max_len
        self._stream_max_age_sec = config.room_stream_max_age_sec
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
            counts=counts,
        )
        self.subscriber.on_ready(self._back)
        self.publisher = RedisConnection(
            address, reactor, "bus-publisher", charset=None, timeout=timeout, clock=clock, counts=counts
        )

    @property
    def ready(self):
        """Subscribed to every remembered channel and receiving."""
        return self.subscriber.ready

    @property
    def channels(self):
        return frozenset(self._channels)

    def start(self, receiver, batch=None):
        """Connect both connections in the background; messages go to receiver(channel, payload),
        those of one read of the subscriber connection inside one ``batch()``."""
        self._receiver = receiver
        if batch is not None:
            self.subscriber.batch = batch
        self.subscriber.start()
        self.publisher.start()

    def on_reconnect(self, callback):
        """Call ``callback()`` once resubscribed after messages may have been missed."""
        self._reconnect_callbacks.append(callback)

    def subscribe(self, channel):
        """Fires once Redis confirmed the subscription (at once while disconnected: the channel
        is subscribed on the next connection, and the gateway is told messages were missed)."""
        if channel in self._channels:
            waiting = self._confirming.get(channel)
            if waiting is None:
                return defer.succeed(None)
            d = defer.Deferred()
            waiting.append(d)  # asked again before the first SUBSCRIBE is confirmed: wait for it too
            return d
        self._channels.add(channel)
        if self.subscriber.protocol is None:
            # Subscribed when the connection is (back) up; until then we miss messages.
            self.subscriber.needs_resync = True
            return defer.succeed(None)
        waiting = self._confirming[channel] = []

        def confirmed(result):
            if self._confirming.get(channel) is waiting:
                del self._confirming[channel]
            for d in waiting:
                d.callback(None)
            return result

        return self._confirmed(self._queue("SUBSCRIBE", channel)).addBoth(confirmed)

    def unsubscribe(self, channel):
        if channel not in self._channels:
            return defer.succeed(None)
        self._channels.discard(channel)
        if self.subscriber.protocol is None:
            return defer.succeed(None)
        return self._confirmed(self._queue("UNSUBSCRIBE", channel))

    def publish(self, channel, payload):
        return self.publisher.execute("PUBLISH", channel, payload).addCallback(lambda _: None)

    # The membership cache lives here, in the Redis that publishes the changes: the
    # contract's script updates it in the same step as the PUBLISH (chatgateway.bus.memberships).

    def publish_membership(self, profile_id, room_id, change, payload):
        d = memberships.publish_change(self.publisher.eval, profile_id, room_id, change, payload)
        return d.addCallback(lambda _: None)

    # Room streams live here too: the contract's script appends a room event to its stream
    # in the same step as the PUBLISH (chatgateway.bus.roomstream).

    def publish_room_event(self, room_id, payload):
        d = roomstream.publish_room_event(
            self.publisher.eval, room_id, payload, self._stream_max_len, self._stream_max_age_sec
        )
        return d.addCallback(roomstream.parse_published)

    def read_room_stream(self, room_id, after, count=roomstream.READ_CHUNK):
        return self.publisher.eval(*roomstream.read_call(room_id, after, count)).addCallback(roomstream.parse_read)

    def cached_memberships(self, profile_id):
        return self.publisher.eval(*memberships.read_call(profile_id)).addCallback(memberships.parse_read)

    def cache_memberships(self, profile_id, rooms, version, ttl):
        d = self.publisher.eval(*memberships.write_call(profile_id, rooms, version, ttl))
        return d.addCallback(lambda written: bool(written))

    def stop(self):
        self._receiver = None
        if self._flush_call is not None and self._flush_call.active():
            self._flush_call.cancel()
        self._flush()  # what was asked is sent (or fails with the connection), never left waiting
        return defer.gatherResults([self.subscriber.stop(), self.publisher.stop()], consumeErrors=True)

    # ------------------------------------------------------------ internals

    def _queue(self, command, channel):
        """A Deferred fired when ``channel``'s command of this turn's batch is confirmed."""
        d = defer.Deferred()
        if self._batch and self._batch[-1][0] == command:
            self._batch[-1][1].append((channel, d))
        else:
            self._batch.append((command, [(channel, d)]))
        if self._flush_call is None:
            self._flush_call = self._reactor.callLater(0, self._flush)
        return d

    def _flush(self):
        self._flush_call = None
        batch, self._batch = self._batch, []
        for command, entries in batch:
            protocol = self.subscriber.protocol
            if protocol is None:
                # Lost meanwhile: the next connection subscribes to every remembered channel.
                self.subscriber.needs_resync = True
                sent = defer.fail(ConnectionError(f"redis {self.subscriber.name} is not connected"))
            else:
                sent = defer.maybeDeferred(send_batch, protocol, command, [channel for channel, _ in entries])
            sent.addBoth(_fire_all, [d for _, d in entries])

    def _confirmed(self, d):
        # A connection lost meanwhile is not an error: the channel is remembered
        # and (un)subscribed on the next connection.
        d.addCallbacks(lambda _: None, lambda f: None if f.check(ConnectionError) else f)
        return d

    def _resubscribe(self, protocol):
        """On each new subscriber connection: SUBSCRIBE every remembered channel."""
        channels = sorted(self._channels)
        subscribed = [
            defer.maybeDeferred(send_batch, protocol, "SUBSCRIBE", channels[i : i + SUBSCRIBE_BATCH])
            for i in range(0, len(channels), SUBSCRIBE_BATCH)
        ]
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
        self.log.info(
            "bus resubscribed to {count} channels; messages published meanwhile were missed", count=len(self._channels)
        )
        for callback in list(self._reconnect_callbacks):
            try:
                callback()
            except Exception:
                self.log.failure("bus on_reconnect callback failed")


def _fire_all(result, waiters):
    """Hand one command's outcome to the Deferred of each channel it named."""
    for d in waiters:
        if isinstance(result, Failure):
            d.errback(result)
        else:
            d.callback(None)
