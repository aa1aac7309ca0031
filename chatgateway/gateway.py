"""The gateway's state and the operations its edges share.

A Gateway owns the local connection registry, the fan-out, and the clients
of the core, the bus and the store. Edges (WebSocket now, gRPC later)
authenticate a device, then call ``open_session``; every Session calls back
into ``forward``, ``publish`` and ``memberships``.
"""

import uuid

from twisted.application import service
from twisted.internet import defer, task
from twisted.logger import Logger

from chatgateway import channels, codec, membership
from chatgateway.api import chat_pb2 as pb
from chatgateway.fanout import Fanout
from chatgateway.registry import ConnectionRegistry
from chatgateway.session import CloseCode, Session

# Rooms asked of the core per streamed page when a device connects.
MEMBERSHIP_PAGE = 500


class Gateway(service.Service):
    log = Logger()

    def __init__(self, config, reactor, verifier, core, bus, store, clock=None):
        self.config = config
        self.reactor = reactor
        self.clock = clock if clock is not None else reactor
        self.verifier = verifier
        self.core = core
        self.bus = bus
        self.store = store
        self.registry = ConnectionRegistry(bus, store, config.max_connections_per_device)
        self.fanout = Fanout(self.registry, self.apply_membership, reactor)
        self._heartbeat = task.LoopingCall(self._heartbeat_tick)
        self._heartbeat.clock = self.clock

    # ------------------------------------------------------------ service

    def startService(self):
        super().startService()
        self.bus.start(self.fanout.receive)
        self._heartbeat.start(self.config.heartbeat_interval_sec, now=False)

    def stopService(self):
        super().stopService()
        if self._heartbeat.running:
            self._heartbeat.stop()
        for session in list(self.registry.sessions):
            session.close(CloseCode.GOING_AWAY, "gateway shutting down")
        self.fanout.stop()
        return defer.succeed(None)

    # ------------------------------------------------------------ sessions

    async def memberships(self, token, device_id):
        """Room ids the token's profile is a member of, asked of the core."""
        pages = await self.core.call(
            "SearchRooms", pb.SearchRoomsRequest(page_size=MEMBERSHIP_PAGE), token, device_id
        )
        return [room.id for page in pages for room in page.data]

    async def open_session(self, transport, claims, token, device_id):
        """Register an authenticated device and send it ``connected``.

        Fails with CoreError when the core cannot tell the device's rooms.
        """
        rooms = await self.memberships(token, device_id)
        session = Session(self, transport, claims, token, device_id, rooms)
        for older in self.registry.add(session):
            older.close(CloseCode.REPLACED, "replaced by a newer connection of this device")
        session.send(session.connected_event())
        self.log.debug(
            "device {profile_id}/{device_id} connected with {rooms} rooms",
            profile_id=session.profile_id,
            device_id=device_id,
            rooms=len(rooms),
        )
        return session

    def session_closed(self, session):
        self.registry.remove(session)

    def _heartbeat_tick(self):
        """Ping every device; close those silent for CONNECTION_TIMEOUT_SEC."""
        now = self.clock.seconds()
        deadline = now - self.config.connection_timeout_sec
        alive = []
        for session in list(self.registry.sessions):
            if session.last_active <= deadline:
                session.close(CloseCode.HEARTBEAT_TIMEOUT, "heartbeat timeout")
                continue
            session.transport.ping()
            session.last_heartbeat = now
            alive.append(session.meta())
        if alive:
            d = self.store.refresh(alive)
            d.addErrback(lambda f: self.log.failure("metadata refresh failed", f))

    # ------------------------------------------------------------ shared operations

    async def forward(self, session, method, request):
        """Call the core with the device's token; re-scope on membership changes."""
        response = await self.core.call(method, request, session.token, session.device_id)
        for change in membership.changes(method, request, response, session.profile_id):
            self.apply_membership(change)
            if self.config.publish_forwarded_events:
                self.publish(channels.profile(change.profile_id), pb.ServerEvent(id=uuid.uuid4().hex, subscription_event=change))
        if method == "DeleteRoom":
            for local in list(self.registry.room_sessions(request.room_id)):
                local.apply_membership(
                    membership.event(request.room_id, local.profile_id, pb.SubscriptionEvent.Change.REMOVED)
                )
        if method == "SendEvent" and self.config.publish_forwarded_events:
            self.publish(channels.room(response.event.room_id), pb.ServerEvent(id=response.event.id, message=response.event))
        return response

    def apply_membership(self, change):
        for session in list(self.registry.profile_sessions(change.profile_id)):
            session.apply_membership(change)

    def publish(self, channel, event):
        codec.stamp(event, self.clock.seconds())
        d = self.bus.publish(channel, event.SerializeToString())
        d.addErrback(lambda f: self.log.failure("publish to {channel} failed", f, channel=channel))

