"""In-process bus: the embedded default for a single instance."""

import collections
import time

from twisted.internet import defer
from twisted.logger import Logger
from zope.interface import implementer

from chatgateway.bus import IEventBus, channels, roomstream
from chatgateway.bus.memberships import PATCH, Cached


class MembershipCache:
    """The in-process membership cache: the Redis scripts of chatgateway.bus.memberships
    on dicts. Everything runs on one thread, so each call is as atomic as a script.

    ``now()``: the clock TTLs are measured on. Entries past their TTL are dropped
    when read; versions stay (one integer per profile that changed).
    """

    def __init__(self, now=time.time):
        self._now = now
        self.rooms = {}  # profile id -> (set of room ids, expires at)
        self.versions = {}  # profile id -> changes published

    def read(self, profile_id):
        entry = self.rooms.get(profile_id)
        if entry is not None:
            if entry[1] > self._now():
                return Cached(sorted(entry[0]), None)
            del self.rooms[profile_id]
        return Cached(None, str(self.versions.get(profile_id, 0)))

    def write(self, profile_id, rooms, version, ttl):
        if str(self.versions.get(profile_id, 0)) != version:
            return False
        self.rooms[profile_id] = (set(rooms), self._now() + ttl)
        return True

    def changed(self, profile_id, room_id, change):
        self.versions[profile_id] = self.versions.get(profile_id, 0) + 1
        entry = self.rooms.get(profile_id)
        patch = PATCH.get(change, "")
        if entry is not None and patch == "+":
            entry[0].add(room_id)
        elif entry is not None and patch == "-":
            entry[0].discard(room_id)


class RoomStreams:
    """The in-process room streams: chatgateway.bus.roomstream's scripts on a counter and a
    bounded deque per room (one thread: each call is as atomic as a script). The epoch of a
    room is made when it first publishes; nothing here is ever lost, so it never changes."""

    def __init__(self, now=time.time):
        self._now = now
        self.max_len = roomstream.MAX_LEN
        self.max_age_sec = roomstream.MAX_AGE_SEC
        self.rooms = {}  # room id -> [epoch, last offset, deque of (offset, time, payload)]

    def limit(self, max_len, max_age_sec):
        self.max_len, self.max_age_sec = max_len, max_age_sec

    def append(self, room_id, payload):
        """``payload`` with the room's next position, kept in its stream."""
        room = self.rooms.get(room_id)
        if room is None:
            room = self.rooms[room_id] = [roomstream.new_epoch(), 0, collections.deque()]
        room[1] += 1
        event = payload + roomstream.position_suffix(room[0], room[1])
        now = self._now()
        entries = room[2]
        entries.append((room[1], now, event))
        while len(entries) > self.max_len or entries[0][1] < now - self.max_age_sec:
            entries.popleft()
        return event

    def read(self, room_id, after, count):
        room = self.rooms.get(room_id)
        if room is None:
            return roomstream.StreamRead("", 0, [])
        cutoff = self._now() - self.max_age_sec
        events = [(offset, event) for offset, at, event in room[2] if offset > after and at >= cutoff]
        return roomstream.StreamRead(room[0], room[1], events[:count])


class MemoryHub:
    """The channels of one process; each MemoryBus on it is one subscriber.

    The reference core and the gateway share one hub in development mode, and with it
    the membership cache. Delivery is synchronous, so publish order is delivery order.
    ``clock``: what the cache's TTLs are measured on (default: the system's time).
    """

    log = Logger()

    def __init__(self, clock=None):
        self.receivers = {}  # channel -> [callable(channel, payload)]
        now = clock.seconds if clock is not None else time.time
        self.memberships = MembershipCache(now)
        self.streams = RoomStreams(now)

    def deliver(self, channel, payload):
        for receiver in tuple(self.receivers.get(channel, ())):
            try:
                receiver(channel, payload)
            except Exception:
                self.log.failure("receiver of {channel} failed", channel=channel)


@implementer(IEventBus)
class MemoryBus:
    ready = True

    def __init__(self, hub=None):
        self.hub = hub if hub is not None else MemoryHub()
        self._receiver = None
        self._channels = set()

    def start(self, receiver, batch=None):
        # Every publish is delivered alone, at once: a batch of one has nothing to coalesce.
        self._receiver = receiver

    def subscribe(self, channel):
        if channel not in self._channels:
            self._channels.add(channel)
            self.hub.receivers.setdefault(channel, []).append(self._receive)
        return defer.succeed(None)

    def unsubscribe(self, channel):
        if channel in self._channels:
            self._channels.discard(channel)
            receivers = self.hub.receivers[channel]
            receivers.remove(self._receive)
            if not receivers:
                del self.hub.receivers[channel]
        return defer.succeed(None)

    def on_reconnect(self, callback):
        """Never called: an in-process bus misses nothing."""

    def publish(self, channel, payload):
        self.hub.deliver(channel, payload)
        return defer.succeed(None)

    def publish_membership(self, profile_id, room_id, change, payload):
        # The cache first, then delivery, in one call: no reader runs between them.
        self.hub.memberships.changed(profile_id, room_id, change)
        self.hub.deliver(channels.profile(profile_id), payload)
        return defer.succeed(None)

    def publish_room_event(self, room_id, payload):
        self.hub.deliver(channels.room(room_id), self.hub.streams.append(room_id, payload))
        epoch, offset, _ = self.hub.streams.rooms[room_id]
        return defer.succeed((epoch, offset))

    def read_room_stream(self, room_id, after, count=roomstream.READ_CHUNK):
        return defer.succeed(self.hub.streams.read(room_id, after, count))

    def cached_memberships(self, profile_id):
        return defer.succeed(self.hub.memberships.read(profile_id))

    def cache_memberships(self, profile_id, rooms, version, ttl):
        return defer.succeed(self.hub.memberships.write(profile_id, rooms, version, ttl))

    def stop(self):
        for channel in list(self._channels):
            self.unsubscribe(channel)
        self._receiver = None
        return defer.succeed(None)

    def _receive(self, channel, payload):
        if self._receiver is not None:
            self._receiver(channel, payload)
