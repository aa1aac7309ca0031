"""The event bus on a Redis Cluster: sharded pub/sub (SPUBLISH/SSUBSCRIBE, Redis 7).

Each channel lives on the primary of its slot (chatgateway.redisconn.slots), and only
there: a message crosses one shard, not every node as classic cluster pub/sub would.
Room, profile and control channels alike.

- The subscriber side is a ClusterConnection of ShardedSubscriberProtocol
  connections, one per primary; a channel is SSUBSCRIBEd on its slot's primary (one
  command per channel: SSUBSCRIBE takes channels of one slot only).
- When a primary's connection comes up (a start, a reconnection, the replica that
  took over its slots), it SSUBSCRIBEs every remembered channel of its slots before
  the cluster counts as ready; the ``on_reconnect`` callbacks then run, and the
  gateway fills the gap of every room from its stream (chatgateway.sessions.positions),
  as after a restart of one Redis.
- A ``sunsubscribe`` Redis sends unasked (the slot left that node) subscribes the
  channel again where the slot map now puts it, and counts as a gap.
- The room streams and the membership cache use the cluster forms of their keys
  (hash-tagged with their channel: one slot per script) and publish with SPUBLISH
  (``cluster=True`` of chatgateway.bus.roomstream and chatgateway.bus.memberships).
"""

from twisted.internet import defer
from zope.interface import implementer

from chatgateway.bus import IEventBus, memberships, roomstream
from chatgateway.bus.redis import RedisBus
from chatgateway.redisconn.cluster import ClusterConnection, CrossSlotError
from chatgateway.redisconn.connection import REDIS_TIMEOUT_SEC, ConnectionError
from chatgateway.redisconn.protocols import ShardedSubscriberProtocol
from chatgateway.redisconn.slots import key_slot
from chatgateway.redisconn.tls import TLSSettings
from chatgateway.redisconn.uri import parse_uri


@implementer(IEventBus)
class ClusterBus(RedisBus):
    def __init__(self, config, reactor, clock=None, timeout=REDIS_TIMEOUT_SEC, counts=None):
        address = parse_uri(config.events_uri, TLSSettings.of(config))
        self._reactor = reactor
        self._channels = set()
        self._confirming = {}  # channel -> [Deferred] of later subscribers, while its SSUBSCRIBE is unconfirmed
        self._receiver = None
        self._reconnect_callbacks = []
        self._batch = []
        self._flush_call = None
        self._stream_max_len = config.room_stream_max_len
        self._stream_max_age_sec = config.room_stream_max_age_sec
        self.publisher = ClusterConnection(
            address, reactor, "bus-publisher", charset=None, timeout=timeout, clock=clock, counts=counts
        )
        self.subscriber = ClusterConnection(
            address,
            reactor,
            "bus-subscriber",
            charset=None,
            protocol=ShardedSubscriberProtocol,
            timeout=timeout,
            clock=clock,
            prepare=self._resubscribe_node,
            on_message=self._message,
            counts=counts,
            slots_from=self.publisher,
        )
        self.subscriber.on_ready(self._back)

    def subscribe(self, channel):
        if channel in self._channels:
            waiting = self._confirming.get(channel)
            if waiting is None:
                return defer.succeed(None)
            d = defer.Deferred()
            waiting.append(d)
            return d
        self._channels.add(channel)
        waiting = self._confirming[channel] = []

        def confirmed(result):
            if self._confirming.get(channel) is waiting:
                del self._confirming[channel]
            for d in waiting:
                d.callback(None)
            return result

        return self._send("SSUBSCRIBE", channel).addBoth(confirmed)

    def unsubscribe(self, channel):
        if channel not in self._channels:
            return defer.succeed(None)
        self._channels.discard(channel)
        return self._send("SUNSUBSCRIBE", channel)

    def publish(self, channel, payload):
        return self.publisher.execute("SPUBLISH", channel, payload).addCallback(lambda _: None)

    def publish_membership(self, profile_id, room_id, change, payload):
        call = memberships.change_call(profile_id, room_id, change, payload, cluster=True)
        return self._eval_with_channel(call).addCallback(lambda _: None)

    def publish_room_event(self, room_id, payload):
        call = roomstream.publish_call(room_id, payload, self._stream_max_len, self._stream_max_age_sec, cluster=True)
        return self._eval_with_channel(call).addCallback(roomstream.parse_published)

    def read_room_stream(self, room_id, after, count=roomstream.READ_CHUNK):
        call = roomstream.read_call(room_id, after, count, cluster=True)
        return self.publisher.eval(*call).addCallback(roomstream.parse_read)

    def cached_memberships(self, profile_id):
        return self.publisher.eval(*memberships.read_call(profile_id, cluster=True)).addCallback(memberships.parse_read)

    def cache_memberships(self, profile_id, rooms, version, ttl):
        d = self.publisher.eval(*memberships.write_call(profile_id, rooms, version, ttl, cluster=True))
        return d.addCallback(lambda written: bool(written))

    def stop(self):
        self._receiver = None
        return defer.gatherResults([self.subscriber.stop(), self.publisher.stop()], consumeErrors=True)

    # ------------------------------------------------------------ internals

    def _eval_with_channel(self, call):
        """A publish script: its channel (ARGV[1]) must be in its keys' slot, or SPUBLISH
        inside it would publish on the wrong shard (Redis 7.0 does not refuse it)."""
        script, keys, args = call
        try:
            if key_slot(args[0]) != ClusterConnection.slot_of(keys):
                raise CrossSlotError(f"channel {args[0]!r} is not in the slot of its keys {keys}")
        except Exception:
            return defer.fail()
        return self.publisher.eval(script, keys, args)

    def _send(self, command, channel):
        conn = self.subscriber.connection_of(key_slot(channel))
        protocol = conn.protocol if conn is not None else None
        if protocol is None:
            # Subscribed when that primary's connection is (back) up; until then messages are missed.
            self.subscriber.needs_resync = True
            return defer.succeed(None)
        d = defer.maybeDeferred(protocol.execute_command, command, channel, apply_timeout=False)
        return self._confirmed(d)

    def _resubscribe_node(self, protocol, node):
        """On each new connection to a primary: SSUBSCRIBE the remembered channels of its slots."""
        protocol.on_dropped = self._dropped
        mine = sorted(c for c in self._channels if self.subscriber.node_of(key_slot(c)) == node)
        sent = [protocol.execute_command("SSUBSCRIBE", channel, apply_timeout=False) for channel in mine]
        return defer.gatherResults(sent, consumeErrors=True)

    def _dropped(self, channel):
        """Redis unsubscribed us (the slot left that node): subscribe again where it is now."""
        channel = channel.decode("utf-8", "replace") if isinstance(channel, bytes) else channel
        if channel not in self._channels:
            return
        self.subscriber.needs_resync = True
        self._channels.discard(channel)
        self._reactor.callLater(0.1, self._again, channel)

    def _again(self, channel):
        if self._receiver is not None and channel not in self._channels:
            self.subscribe(channel).addErrback(lambda f: None if f.check(ConnectionError) else f)
