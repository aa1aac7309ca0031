"""The local connections of this gateway and the indexes delivery reads.

room -> sessions and profile -> sessions are O(1) lookups on the hot path.
The registry subscribes the bus to a room's (or profile's) channel when its
first local session arrives and unsubscribes when the last one leaves, and
mirrors every change into the shared store - except a new session, which the
gateway writes together with its device claim in one store call
(``open_connection``).
"""

from chatgateway.bus import channels


class ConnectionRegistry:
    def __init__(self, bus, store, max_per_device, background):
        self._bus = bus
        self._store = store
        self._background = background  # background(deferred, what) logs a failure
        self._max_per_device = max_per_device
        self.sessions = set()
        self._by_id = {}  # session id -> Session
        self._by_device = {}  # (profile_id, device_id) -> [Session], oldest first
        self._by_room = {}  # room_id -> {Session}
        self._by_profile = {}  # profile_id -> {Session}
        self._watched = {}  # profile_id -> sessions of it being opened (their channel stays subscribed)

    def __len__(self):
        return len(self.sessions)

    def session(self, session_id):
        return self._by_id.get(session_id)

    def room_sessions(self, room_id):
        return self._by_room.get(room_id, ())

    def profile_sessions(self, profile_id):
        return self._by_profile.get(profile_id, ())

    def device_sessions(self, profile_id, device_id):
        return self._by_device.get((profile_id, device_id), ())

    def add(self, session):
        """Index a new session; returns the older sessions of its device to close (4001)."""
        self.sessions.add(session)
        self._by_id[session.id] = session
        device = self._by_device.setdefault((session.profile_id, session.device_id), [])
        device.append(session)
        excess = len(device) - self._max_per_device
        evicted = device[:excess] if excess > 0 else []
        self._index(self._by_profile, session.profile_id, session, channels.profile)
        for room_id in session.rooms:
            self._index(self._by_room, room_id, session, channels.room)
        return evicted

    def remove(self, session):
        if session not in self.sessions:
            return
        self.sessions.discard(session)
        self._by_id.pop(session.id, None)
        key = (session.profile_id, session.device_id)
        device = self._by_device.get(key, [])
        if session in device:
            device.remove(session)
        self._unindex(self._by_profile, session.profile_id, session, channels.profile)
        for room_id in session.rooms:
            self._unindex(self._by_room, room_id, session, channels.room)
        if device:
            # Another connection of the same device lives on: its metadata stays.
            self._write(self._store.rooms_changed(device[-1].meta(), (), session.rooms - device[-1].rooms))
        else:
            self._by_device.pop(key, None)
            self._write(self._store.disconnected(session.meta()))

    def watch_profile(self, profile_id):
        """Subscribe the profile's channel for a session of it about to open, before its rooms are
        read, so no membership change published after the read is missed. A Deferred that fires
        (with None, failures logged) once subscribed; ``unwatch_profile`` when the opening ends."""
        self._watched[profile_id] = self._watched.get(profile_id, 0) + 1
        d = self._bus.subscribe(channels.profile(profile_id))
        self._write(d)
        return d

    def unwatch_profile(self, profile_id):
        left = self._watched.pop(profile_id) - 1
        if left:
            self._watched[profile_id] = left
        elif profile_id not in self._by_profile:
            self._write(self._bus.unsubscribe(channels.profile(profile_id)))

    def join(self, session, room_ids):
        """Deliver these rooms to the session too."""
        added = [r for r in room_ids if r not in session.rooms]
        for room_id in added:
            session.rooms.add(room_id)
            self._index(self._by_room, room_id, session, channels.room)
        if added and session in self.sessions:
            self._write(self._store.rooms_changed(session.meta(), added, ()))
        return added

    def leave(self, session, room_ids):
        """Stop delivering these rooms to the session."""
        removed = [r for r in room_ids if r in session.rooms]
        for room_id in removed:
            session.rooms.discard(room_id)
            self._unindex(self._by_room, room_id, session, channels.room)
        if removed and session in self.sessions:
            self._write(self._store.rooms_changed(session.meta(), (), removed))
        return removed

    def _index(self, index, key, session, channel_of):
        members = index.get(key)
        if members is None:
            members = index[key] = set()
            self._write(self._bus.subscribe(channel_of(key)))
        members.add(session)

    def _unindex(self, index, key, session, channel_of):
        members = index.get(key)
        if members is None:
            return
        members.discard(session)
        if not members:
            del index[key]
            if not (index is self._by_profile and key in self._watched):
                self._write(self._bus.unsubscribe(channel_of(key)))

    def _write(self, d):
        # Store and bus writes never hold up delivery.
        self._background(d, "updating the store or the bus")
