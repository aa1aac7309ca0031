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
- A room event or membership change whose shard has no ready primary (failing over; the
  other nodes answer CLUSTERDOWN meanwhile) is not failed at once: it waits, with the later publishes of the same channel behind it
  (their order is kept), and is sent when the promoted replica answers, within
  PUBLISH_WAIT_SEC. Only publishes refused before being sent wait: one lost in flight
  with the primary may or may not have been applied, and is failed rather than sent twice.
- The room streams and the membership cache use the cluster forms of their keys
  (hash-tagged with their channel: one slot per script) and publish with SPUBLISH
  (``cluster=True`` of chatgateway.bus.roomstream and chatgateway.bus.memberships).
"""

import bisect

from twisted.internet import defer
from zope.interface import implementer

from chatgateway.bus import IEventBus, channels, memberships, roomstream
from chatgateway.bus.redis import RedisBus
from chatgateway.redisconn.cluster import ClusterConnection, CrossSlotError, redirect_of
from chatgateway.redisconn.connection import REDIS_TIMEOUT_SEC, ConnectionError, NotConnected
from chatgateway.redisconn.protocols import ShardedSubscriberProtocol
from chatgateway.redisconn.slots import key_slot
from chatgateway.redisconn.tls import TLSSettings
from chatgateway.redisconn.uri import parse_uri

# A channel whose SSUBSCRIBE met MOVED (or that Redis unsubscribed) is subscribed again
# after this long, at most this many times, each after reading the slot map again.
RESUBSCRIBE_DELAY_SEC = 0.1
RESUBSCRIBE_ATTEMPTS = 20
# A publish waits this long at most for its shard's primary (a failover takes a few seconds),
# trying again every PUBLISH_RETRY_SEC.
PUBLISH_WAIT_SEC = 15.0
PUBLISH_RETRY_SEC = 0.2


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
        self._waiting = {}  # channel -> [(call number, send, Deferred, deadline)] while its shard fails over
        self._calls = 0
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
        return self._in_order(channels.profile(profile_id), lambda: self._eval_with_channel(call)).addCallback(
            lambda _: None
        )

    def publish_room_event(self, room_id, payload):
        # One epoch per publish call (a new epoch is used only if the room has none).
        call = roomstream.publish_call(room_id, payload, self._stream_max_len, self._stream_max_age_sec, cluster=True)
        d = self._in_order(channels.room(room_id), lambda: self._eval_with_channel(call))
        return d.addCallback(roomstream.parse_published)

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

    def _in_order(self, channel, send):
        """``send()`` now, or behind the publishes of ``channel`` that wait for their shard."""
        self._calls += 1
        seq = self._calls
        if channel in self._waiting:
            return self._wait(channel, seq, send)
        return send().addErrback(self._refused, channel, seq, send)

    def _refused(self, failure, channel, seq, send):
        if not _not_sent(failure) or self._receiver is None:
            return failure
        # Not applied (the shard's primary is gone): wait for the new one.
        return self._wait(channel, seq, send)

    def _wait(self, channel, seq, send):
        """Queue a publish by the order it was asked in (one sent earlier may be refused later)."""
        d = defer.Deferred()
        queue = self._waiting.get(channel)
        if queue is None:
            queue = self._waiting[channel] = []
            self._reactor.callLater(PUBLISH_RETRY_SEC, self._retry, channel)
        bisect.insort(queue, (seq, send, d, self._reactor.seconds() + PUBLISH_WAIT_SEC), key=lambda e: e[0])
        return d

    def _retry(self, channel):
        queue = self._waiting.get(channel)
        if not queue:
            self._waiting.pop(channel, None)
            return
        entry = queue[0]
        _, send, d, deadline = entry

        def sent(result):
            queue.remove(entry)  # not pop(0): one refused late may have been put in front meanwhile
            d.callback(result)
            self._retry(channel)

        def failed(failure):
            if _not_sent(failure) and self._reactor.seconds() < deadline and self._receiver is not None:
                self._reactor.callLater(PUBLISH_RETRY_SEC, self._retry, channel)
                return
            queue.remove(entry)
            d.errback(failure)
            self._retry(channel)

        send().addCallbacks(sent, failed)

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
        if command == "SSUBSCRIBE":
            d.addErrback(self._moved, channel)
        return self._confirmed(d)

    def _resubscribe_node(self, protocol, node):
        """On each new connection to a primary: SSUBSCRIBE the remembered channels of its slots."""
        protocol.on_dropped = self._dropped
        mine = sorted(c for c in self._channels if self.subscriber.node_of(key_slot(c)) == node)
        sent = [
            protocol.execute_command("SSUBSCRIBE", channel, apply_timeout=False).addErrback(self._moved, channel)
            for channel in mine
        ]
        return defer.gatherResults(sent, consumeErrors=True)

    def _moved(self, failure, channel, attempt=0):
        """SSUBSCRIBE answered MOVED (our map is stale): read the map again, subscribe there."""
        if redirect_of(failure.value) is None:
            return failure
        if attempt < RESUBSCRIBE_ATTEMPTS:
            self.subscriber.needs_resync = True
            self.subscriber.refresh()
            self._reactor.callLater(RESUBSCRIBE_DELAY_SEC, self._again, channel, attempt + 1)
        return None

    def _dropped(self, channel):
        """Redis unsubscribed us (the slot left that node): subscribe again where it is now."""
        channel = channel.decode("utf-8", "replace") if isinstance(channel, bytes) else channel
        if channel not in self._channels:
            return
        self.subscriber.needs_resync = True
        self.subscriber.refresh()
        self._reactor.callLater(RESUBSCRIBE_DELAY_SEC, self._again, channel, 0)

    def _again(self, channel, attempt):
        """SSUBSCRIBE ``channel`` where the map puts it now; then fill the gap (messages were missed)."""
        conn = self.subscriber.connection_of(key_slot(channel))
        protocol = conn.protocol if conn is not None else None
        if self._receiver is None or channel not in self._channels or protocol is None:
            return  # unsubscribed meanwhile, or resubscribed with the node's connection
        d = defer.maybeDeferred(protocol.execute_command, "SSUBSCRIBE", channel, apply_timeout=False)
        d.addCallback(lambda _: self._back(True))
        d.addErrback(self._moved, channel, attempt)
        d.addErrback(lambda f: None if f.check(ConnectionError) else self.log.failure("resubscribing failed", f))


def _not_sent(failure):
    """Whether a publish failed without being applied: refused before it was sent, or refused
    by the cluster (CLUSTERDOWN while a slot has no primary, TRYAGAIN during a migration)."""
    if failure.check(NotConnected):
        return True
    return str(failure.value).startswith(("CLUSTERDOWN", "TRYAGAIN"))
