"""The gateway's state and the operations its edges share.

A Gateway owns the local connection registry, the fan-out, and the clients
of the core, the bus and the store. Edges (WebSocket, the gRPC stream)
authenticate a device, then call ``open_session``, which takes the device's
rooms from the membership cache or the core (``connect_rooms``); every Session
calls back into ``forward``, ``publish`` and ``memberships``.
"""

import json
import uuid

import grpc
from twisted.application import service
from twisted.internet import defer, task
from twisted.logger import Logger

from chatgateway.api import chat_pb2 as pb
from chatgateway.api import codec
from chatgateway.bus import channels, roomstream
from chatgateway.sessions import membership
from chatgateway.sessions.calls import CallSignals
from chatgateway.sessions.catchup import CatchUps, Pacer
from chatgateway.sessions.corking import Cork
from chatgateway.sessions.fanout import EncodedEvent, Fanout
from chatgateway.sessions.positions import RoomPositions
from chatgateway.sessions.presence import Presence
from chatgateway.sessions.ratelimit import ConnectRate
from chatgateway.sessions.reconnect import drain_delay, hinted
from chatgateway.sessions.registry import ConnectionRegistry
from chatgateway.sessions.resume import Resumption
from chatgateway.sessions.session import CloseCode, Session, TokenExpiries, error_detail
from chatgateway.sessions.sharedlimits import SharedLimits
from chatgateway.sessions.streamreads import StreamReads
from chatgateway.sessions.waits import at_most
from chatgateway.telemetry.counts import GatewayCounts

# Rooms asked of the core per streamed page when a device connects.
MEMBERSHIP_PAGE = 500
# Look for dead gateways to clean up after every this many heartbeat ticks.
REAP_EVERY_TICKS = 5
# Sessions the heartbeat sweep visits per reactor turn.
HEARTBEAT_SLICE = 2000
REPLACED_REASON = "replaced by a newer connection of this device"
# Of DRAIN_TIMEOUT_SEC, the share (at most DRAIN_RESERVE_MAX_SEC) kept for what follows the
# devices' closes: dropping the stragglers, calls to the core, releasing metadata in the store.
DRAIN_RESERVE_SHARE = 0.25
DRAIN_RESERVE_MAX_SEC = 5.0
# Longest a connect waits for its profile's channel to be subscribed before reading its rooms
# (Redis slow or gone: the connect goes on, and the bus reports what was missed when it is back).
WATCH_WAIT_SEC = 2.0


class Gateway(service.Service):
    log = Logger()

    def __init__(self, config, reactor, verifier, core, bus, store, clock=None, counts=None):
        self.config = config
        self.reactor = reactor
        self.clock = clock if clock is not None else reactor
        self.verifier = verifier
        self.core = core
        self.bus = bus
        self.store = store
        # What the sessions, the fan-out and the edges count (the service tree's; without one, its own).
        self.counts = counts if counts is not None else GatewayCounts()
        self.registry = ConnectionRegistry(bus, store, config.max_connections_per_device, self._quietly)
        self.token_expiries = TokenExpiries(self.clock)  # one timer for every session's token
        # Frames for one device produced in one burst (a bus read, a fan-out chunk) leave in one write.
        self.cork = Cork()
        self.fanout = Fanout(self.registry, self.apply_membership, reactor, self.counts, corked=self.cork.corked)
        # Reads of the rooms' streams and of the core's history, shared by every session (and counted).
        self.reads = StreamReads(bus, core, self.counts, self.clock)
        self.fanout.observe = self.reads.observe
        # Room events pass the position check before the fan-out; gaps are filled from the rooms' streams.
        self.positions = RoomPositions(self.reads, self.fanout.receive_event, self._events_lost, self.clock)
        self.reads.live_position = self.positions.position
        self.reads.subscribed = self._room_subscribed
        self.registry.room_released = self._room_released
        # Sessions catching up in a room (a resume, a hole in their delivery, after falling behind).
        pacer = Pacer(self.clock, self.cork.corked)
        ended = self.positions.ended
        self.catchups = CatchUps(self.reads, self.positions.position, pacer, self.clock, self.counts, ended)
        self.fanout.on_shed = self.catchups.shed
        # Resume (docs/architecture.md#resume): tokens and plans at open, the devices' server-side positions.
        self.resumption = Resumption.of(config, store, bus, core, self.clock, self.positions.position, self.counts)
        self.device_positions = self.resumption.device_positions
        # New connections of every edge, let in before their tokens are verified (storm control).
        self.connects = ConnectRate(config.max_connects_per_second, config.connect_burst, self.clock)
        self.addresses = []  # where devices reach this instance (set by the service tree)
        self.presence = Presence(self)  # leases of the local devices; presenceEvents to fellow members
        self.calls = CallSignals(self)  # call signals relayed on the callees' profile channels
        self.limits = SharedLimits(config, store, self.clock, self.counts)  # per profile and per room
        self._control_channel = channels.control(config.gateway_id)
        self._heartbeat = task.LoopingCall(self._heartbeat_tick)
        self._heartbeat.clock = self.clock
        self._ticks = 0
        self._started_at = None
        self.draining = False
        self._opening = 0  # sessions waiting for their rooms (not yet in the registry)
        # A twisted Logger builds and filters every event, kept or not: a debug line per
        # connect is only emitted when it can be written.
        self._log_connects = config.log_level == "debug"
        self._gone_waiters = []  # Deferreds fired when no session is left (drain)
        self._watchers = {}  # profile id -> [membership changes recorded for each opening session]

    # ------------------------------------------------------------ service

    def startService(self):
        super().startService()
        self._started_at = self.clock.seconds()
        self.bus.start(self.receive, batch=self.cork.corked)
        self.bus.on_reconnect(self._bus_reconnected)
        self.store.on_reconnect(self._store_reconnected)
        self._quietly(self.bus.subscribe(self._control_channel), "subscribing to the control channel")
        self._announce()
        self._heartbeat.start(self.config.heartbeat_interval_sec, now=False)

    def stopService(self):
        super().stopService()
        return defer.Deferred.fromCoroutine(self.drain())

    async def drain(self, timeout=None):
        """Stop serving devices: each is closed with 1001 and a reconnect hint once the
        commands it has in flight are answered; those still connected when ``timeout``
        (DRAIN_TIMEOUT_SEC less a reserve) runs out are dropped. Fires when every
        session is gone, so its metadata has been released in the store."""
        self.draining = True
        if self._heartbeat.running:
            self._heartbeat.stop()
        if timeout is None:
            total = self.config.drain_timeout_sec
            timeout = total - min(DRAIN_RESERVE_MAX_SEC, DRAIN_RESERVE_SHARE * total)
        reserve = self.config.drain_timeout_sec - timeout
        sessions = list(self.registry.sessions)
        if sessions:
            self.log.info("draining: closing {count} devices (1001)", count=len(sessions))
        for session in sessions:
            session.drain(self.reconnect_hint())
        await self._sessions_gone(timeout)
        if self.registry.sessions:
            self.log.warn(
                "drain: {count} devices still connected after {timeout:.1f}s; dropping them",
                count=len(self.registry.sessions),
                timeout=timeout,
            )
            for session in list(self.registry.sessions):
                session.abort()
            await self._sessions_gone(reserve / 2)
            for session in list(self.registry.sessions):
                session.closed_by_transport()  # a transport that could not be dropped: forget it
        await self.device_positions.flush()  # the closed devices' last positions, before the store stops
        self.fanout.stop()
        self.catchups.pacer.stop()

    def reconnect_hint(self):
        """The close reason of a draining gateway: reconnect (elsewhere) after a random delay."""
        return hinted("gateway draining", drain_delay())

    def _sessions_gone(self, timeout):
        """A Deferred firing when no session is left (or opening), or after ``timeout`` seconds."""
        if not self.registry.sessions and not self._opening:
            return defer.succeed(None)
        gone = defer.Deferred()
        self._gone_waiters.append(gone)
        return at_most(self.clock, gone, timeout).addBoth(lambda result: self._forget_waiter(gone, result))

    def _forget_waiter(self, gone, result):
        if gone in self._gone_waiters:
            self._gone_waiters.remove(gone)
        return result

    def _check_gone(self):
        if not self.registry.sessions and not self._opening:
            for d in list(self._gone_waiters):
                if not d.called:
                    d.callback(None)

    # ------------------------------------------------------------ sessions

    async def memberships(self, token, device_id):
        """Room ids the token's profile is a member of, asked of the core."""
        pages = await self.core.call("SearchRooms", pb.SearchRoomsRequest(page_size=MEMBERSHIP_PAGE), token, device_id)
        return [room.id for page in pages for room in page.data]

    async def connect_rooms(self, profile_id, token, device_id):
        """The rooms of a connecting device's profile: from the membership cache, else asked of
        the core and cached (docs/architecture.md#membership-cache). A cache that cannot be
        read is passed by: the core is asked."""
        ttl = self.config.membership_cache_ttl_sec
        if ttl <= 0:
            return await self.memberships(token, device_id)
        try:
            cached = await self.bus.cached_memberships(profile_id)
        except Exception:  # noqa: BLE001 - the bus counted and logged what failed; the core answers instead
            self.counts.membership_lookup("error")
            return await self.memberships(token, device_id)
        if cached.rooms is not None:
            self.counts.membership_lookup("hit")
            return cached.rooms
        self.counts.membership_lookup("miss")
        rooms = await self.memberships(token, device_id)
        # Written only if no change was published since the read (the bus's script checks).
        self._quietly(self.bus.cache_memberships(profile_id, rooms, cached.version, ttl), "caching memberships")
        return rooms

    async def open_session(self, transport, claims, token, device_id, abandoned=None, resume=None):
        """Register an authenticated device and send it ``connected``.

        Its rooms come from the membership cache, or from the core (``connect_rooms``).
        ``resume`` (a chatgateway.sessions.resume.ResumeRequest) and the device's server-side
        positions say where it catches up from in each of its rooms.
        Fails with CoreError when the core, asked, cannot tell the device's rooms. When
        ``abandoned()`` says, once the rooms are known, that the device went away
        meanwhile, nothing is registered (no older session of the device is replaced)
        and the result is None.
        """
        self._opening += 1
        profile_id = claims.profile_id
        # The profile's channel first, then its rooms: a change published after the read is
        # received, and recorded here until the session can take it (_replay_changes).
        changes = self._watch(profile_id)
        try:
            record = defer.Deferred.fromCoroutine(self.resumption.record(profile_id, device_id))  # meanwhile
            await at_most(self.clock, self.registry.watch_profile(profile_id), WATCH_WAIT_SEC)
            rooms = await self.connect_rooms(profile_id, token, device_id)
            resolved = await self.resumption.resolve(profile_id, device_id, rooms, resume, await record, token)
        except BaseException:
            self._unwatch(profile_id, changes)
            self._opened_none()
            raise
        if abandoned is not None and abandoned():
            self._unwatch(profile_id, changes)
            self._opened_none()
            return None
        self._opening -= 1  # registered below, before anything else runs
        session = Session(self, transport, claims, token, device_id, rooms)
        # The local limit holds at once; the store then enforces it across gateways.
        for older in (replaced := self.registry.add(session)):
            older.close(CloseCode.REPLACED, REPLACED_REASON)
        self._unwatch(profile_id, changes)
        self.counts.session_opened(session)
        planned, begins, resume_token, notices = self.resumption.finish(session, resolved, replaced)
        for event in (session.connected_event(resume_token, resumed=bool(planned)), *notices):
            session.send(event)  # connected first
        self._replay_changes(session, changes)
        # In this turn still: no live event of its rooms can reach the session before its catch-up starts.
        self.resumption.start(session, planned, begins)
        self._register(session)
        self.presence.arrived(session)
        if self.draining:
            session.drain(self.reconnect_hint())
        if self._log_connects:
            self.log.debug(
                "device {profile_id}/{device_id} connected with {rooms} rooms",
                profile_id=session.profile_id,
                device_id=device_id,
                rooms=len(rooms),
            )
        return session

    def _watch(self, profile_id):
        """A list that records the profile's membership changes (change, ServerEvent or None) while it opens."""
        changes = []
        self._watchers.setdefault(profile_id, []).append(changes)
        return changes

    def _unwatch(self, profile_id, changes):
        watchers = self._watchers[profile_id]
        watchers.remove(changes)
        if not watchers:
            del self._watchers[profile_id]
        self.registry.unwatch_profile(profile_id)

    def _replay_changes(self, session, changes):
        """Apply to a new session what changed while it opened; its rooms may already say so
        (each change is idempotent, and they come in publish order)."""
        for change, event in changes:
            session.apply_membership(change)
            if event is not None:
                self.fanout.deliver(EncodedEvent(event), [session])

    def _opened_none(self):
        """An opening ended without a session."""
        self._opening -= 1
        if self.draining:
            self._check_gone()

    def session_closed(self, session):
        self.device_positions.closed(session)
        self.registry.remove(session)
        self.counts.session_closed(session)
        self._quietly(
            self.store.release_device(session.profile_id, session.device_id, self.config.gateway_id, session.id),
            "releasing a device",
        )
        self.presence.departed(session)
        if self.draining:
            self._check_gone()

    def _register(self, session):
        """Write the session's metadata and claim its place in the device's list across gateways,
        in one store call; evict what is beyond the limit."""
        d = self.store.open_connection(session.meta(), session.id, self.config.max_connections_per_device)
        d.addCallback(self._evict_all)
        self._quietly(d, "registering a connection")

    def _evict_all(self, evicted):
        for gateway_id, session_id in evicted:
            self.evict(gateway_id, session_id)

    def evict(self, gateway_id, session_id, code=CloseCode.REPLACED, reason=REPLACED_REASON):
        """Close a session wherever it lives: here, or through its gateway's control channel."""
        if gateway_id == self.config.gateway_id:
            session = self.registry.session(session_id)
            if session is not None:
                session.close(code, reason)
            return
        message = {"evict": {"session_id": session_id, "code": code, "reason": reason}}
        self._quietly(
            self.bus.publish(channels.control(gateway_id), json.dumps(message).encode("utf-8")),
            "sending an eviction",
        )

    # ------------------------------------------------------------ bus, store and instance

    def receive(self, channel, payload):
        """Bus receiver: control messages for this instance, events for its devices."""
        if channel == self._control_channel:
            self._control(payload)
        else:
            self.positions.receive(channel, payload)

    def _control(self, payload):
        try:
            evict = json.loads(payload)["evict"]
            session_id, code, reason = evict["session_id"], int(evict["code"]), str(evict["reason"])
        except (ValueError, KeyError, TypeError):
            self.log.warn("ignored a malformed control message")
            return
        session = self.registry.session(session_id)
        if session is not None:
            session.close(code, reason)

    def _bus_reconnected(self):
        """Pub/sub was down: events published meanwhile were not received. Each room with a
        position reads them from its stream; in a room without one (no event of it came since
        it was subscribed) each device catches up from its own position (``_events_lost``)."""
        rooms = self.registry.room_ids()
        blind = [room_id for room_id in rooms if self.positions.position(room_id) is None]
        if rooms:  # at start (subscribed before the first connection) there is nothing to read
            self.log.info(
                "event bus reconnected; reading the streams of {count} rooms ({blind} without a position: per device)",
                count=len(rooms),
                blind=len(blind),
            )
        self.positions.resync()
        for room_id in blind:
            self._events_lost(room_id)

    def _events_lost(self, room_id):
        """Events of the room may have been missed (the gateway's fill could not tell them, the
        stream was lost): each local session with a position in the room catches up from it
        (docs/architecture.md#catch-up); one without (it got no event of the room yet) is
        told, in order with its events (DATA_LOSS)."""
        blind = []
        for session in list(self.registry.room_sessions(room_id)):
            last = session.delivered.get(room_id)
            if last is not None:
                self.catchups.start(session, room_id, last[1], last[2])
            elif room_id not in session.catching:
                blind.append(session)
        if not blind:
            return
        event = pb.ServerEvent(
            id=uuid.uuid4().hex,
            error=error_detail(grpc.StatusCode.DATA_LOSS, f"events of room {room_id} may have been missed"),
        )
        self.fanout.deliver(EncodedEvent(codec.stamp(event, self.clock.seconds())), blind)

    def _room_subscribed(self, room_id):
        """Fires once the room's channel is subscribed (at once when no local session has it)."""
        if not self.registry.room_sessions(room_id):
            return defer.succeed(None)
        return self.bus.subscribe(channels.room(room_id))

    def _room_released(self, room_id):
        """The room's last local session left: its position and catch-up window mean nothing any more."""
        self.positions.forget(room_id)
        self.reads.forget(room_id)

    def _store_reconnected(self):
        """The store came back and may have lost writes: rewrite every live connection."""
        sessions = list(self.registry.sessions)
        self.log.info("store reconnected; rewriting {count} connections", count=len(sessions))
        for session in sessions:
            self._register(session)
        self._announce()
        for session in sessions:  # after the registration their leases hang on
            self.presence.arrived(session)

    def _announce(self):
        info = {
            "started": int(self._started_at or self.clock.seconds()),
            "addresses": list(self.addresses),
            "connections": len(self.registry),
        }
        self._quietly(self.store.instance_alive(self.config.gateway_id, info), "renewing the instance entry")

    def _reap(self):
        d = self.store.reap_dead_instances(self.config.gateway_id)
        d.addCallback(lambda reaped: reaped and self.log.info("cleaned up after dead gateways {ids}", ids=reaped))
        self._quietly(d, "cleaning up after dead gateways")

    def _quietly(self, d, doing):
        """Store and bus failures never reach devices; they are logged (readiness shows the outage)."""
        if d is not None:
            d.addErrback(lambda f: self.log.warn("{doing} failed: {error}", doing=doing, error=f.getErrorMessage()))
        return d

    def _heartbeat_tick(self):
        """Ping every device; close those silent for CONNECTION_TIMEOUT_SEC; refresh their metadata."""
        now = self.clock.seconds()
        sessions = list(self.registry.sessions)
        self._sweep(sessions, 0, now, now - self.config.connection_timeout_sec, [])
        self._announce()
        self.presence.tick()
        self._ticks += 1
        if self._ticks % REAP_EVERY_TICKS == 0:
            self._reap()

    def _sweep(self, sessions, start, now, deadline, alive):
        """The heartbeat's walk over ``sessions``, HEARTBEAT_SLICE per reactor turn: 20,000
        devices in one turn would hold back every other connection for a quarter second."""
        end = min(len(sessions), start + HEARTBEAT_SLICE)
        for i in range(start, end):
            session = sessions[i]
            if session.closed:
                continue  # closed while the sweep was under way
            if session.last_active <= deadline:
                session.close(CloseCode.HEARTBEAT_TIMEOUT, "heartbeat timeout")
                continue
            session.transport.ping()
            session.last_heartbeat = now
            alive.append(session.meta())
            self.device_positions.note(session)
        if end < len(sessions):
            self.clock.callLater(0, self._sweep, sessions, end, now, deadline, alive)
        else:
            self.device_positions.flush()  # one batch per sweep: at most a write per heartbeat per device
            if alive:
                self._quietly(self.store.refresh(alive), "refreshing metadata")

    # ------------------------------------------------------------ shared operations

    async def forward(self, session, method, request):
        """Call the core with the device's token; re-scope on membership changes."""
        # call_options: a Caller of chatgateway.sessions.forwarding may carry traceparent/timeout; Sessions do not.
        options = getattr(session, "call_options", None) or {}
        response = await self.core.call(method, request, session.token, session.device_id, **options)
        for change in membership.changes(method, request, response, session.profile_id):
            self.apply_membership(change)
            if self.config.publish_forwarded_events:
                self.publish(
                    channels.profile(change.profile_id), pb.ServerEvent(id=uuid.uuid4().hex, subscription_event=change)
                )
        if method == "DeleteRoom":
            for local in list(self.registry.room_sessions(request.room_id)):
                local.apply_membership(
                    membership.event(request.room_id, local.profile_id, pb.SubscriptionEvent.Change.REMOVED)
                )
        if method == "SendEvent" and self.config.publish_forwarded_events:
            self.publish(
                channels.room(response.event.room_id), pb.ServerEvent(id=response.event.id, message=response.event)
            )
        return response

    def apply_membership(self, change, event=None):
        """Re-scope the profile's sessions (``event``: the ServerEvent it came in, from the bus)."""
        for changes in self._watchers.get(change.profile_id, ()):
            changes.append((change, event))
        for session in list(self.registry.profile_sessions(change.profile_id)):
            session.apply_membership(change)
        self.presence.membership_changed(change)

    def publish(self, channel, event):
        """Publish ``event`` by the contracts: a room event gets its position and its place in the
        room's stream, a membership change updates the membership cache (chatgateway.bus.roomstream)."""
        codec.stamp(event, self.clock.seconds())
        self._quietly(roomstream.publish_event(self.bus, channel, event), f"publishing to {channel}")
