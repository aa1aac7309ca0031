"""The reference core as a Twisted service: model + gRPC server, publishing to the bus.

grpcio serves on its own threads; the model publishes from them through
``reactor.callFromThread`` so the bus is only touched on the reactor thread,
in the order the model stored the events. Membership changes are published by
the contract of chatgateway.bus.memberships (the cache updated in the same step),
room events by that of chatgateway.bus.roomstream (positioned, kept in the stream).
"""

import txredisapi
from twisted.application import service
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger

from chatgateway.api import codec
from chatgateway.bus import channels, roomstream
from chatgateway.devcore.model import ChatModel
from chatgateway.devcore.server import ChatCoreServicer, make_grpc_server

ROOM_PREFIX = channels.room("")


class CoreService(service.Service):
    """Serves the ten forwarded ChatService methods on ``interface:port``.

    ``verifier`` has ``verify_blocking(token)`` (default: chatgateway.auth.tokens's
    TokenVerifier for ``config``). ``port`` is the bound port once started.
    """

    log = Logger()

    def __init__(self, config, bus, reactor, port, interface="127.0.0.1", verifier=None):
        self.config = config
        self.bus = bus
        self.reactor = reactor
        self.port = port
        self.interface = interface
        self.verifier = verifier
        self._owns_verifier = verifier is None
        self.model = None
        self.server = None

    def startService(self):
        if self.verifier is None:
            from chatgateway.auth.tokens import TokenVerifier

            self.verifier = TokenVerifier(self.config, self.reactor)
        self.model = ChatModel(self.config.core_db or ":memory:", clock=self.reactor.seconds, publish=self._publish)
        servicer = ChatCoreServicer(self.model, self.verifier.verify_blocking)
        host = f"[{self.interface}]" if ":" in self.interface else self.interface
        try:
            self.server, self.port = make_grpc_server(servicer, f"{host}:{self.port}")
        except Exception:
            self.model.close()
            raise
        super().startService()
        self.log.info(
            "chat core listening on {host}:{port} (storage: {db})",
            host=host,
            port=self.port,
            db=self.config.core_db or "memory",
        )

    def _publish(self, channel, payload):
        self.reactor.callFromThread(self._publish_now, channel, payload)

    def _publish_now(self, channel, payload):
        # By the contracts: a room event gets its position and its place in the room's stream, a
        # membership change updates the membership cache, as they are published.
        d = roomstream.publish_payload(self.bus, channel, payload)
        if d is None:
            return
        if channel.startswith(ROOM_PREFIX):
            d.addCallback(self._published, payload)
        d.addErrback(self._publish_failed, channel)

    def _publish_failed(self, failure, channel):
        # Redis gone (restarting, or the core stopping): an operational event, not a bug; the
        # event stays in the core's history, and gateways catch devices up from it.
        if failure.check(txredisapi.ConnectionError):
            self.log.warn("publishing on {channel} failed: {error}", channel=channel, error=failure.getErrorMessage())
        else:
            self.log.failure("publishing on {channel} failed", failure, channel=channel)

    def _published(self, position, payload):
        """A room event got its position: store it with the event (GetHistory reads by it), off the reactor."""
        event = codec.parse_server_event(payload)
        if not isinstance(position, tuple) or event is None or not event.HasField("message") or self.model is None:
            return  # typing, receipts: not stored
        epoch, offset = position
        d = deferToThreadPool(
            self.reactor, self.reactor.getThreadPool(), self.model.record_position, event.message.id, epoch, offset
        )
        d.addErrback(
            lambda failure: self.log.warn("storing a position failed: {error}", error=failure.getErrorMessage())
        )

    def stopService(self):
        super().stopService()
        server, model = self.server, self.model
        self.server = self.model = None
        grace = self.config.drain_timeout_sec

        def stop_server():
            if server is not None:
                server.stop(grace).wait()

        d = deferToThreadPool(self.reactor, self.reactor.getThreadPool(), stop_server)

        def close_model(result):
            if model is not None:
                model.close()
            return result

        d.addBoth(close_model)
        if self._owns_verifier and self.verifier is not None:
            verifier, self.verifier = self.verifier, None
            d.addBoth(lambda result: verifier.close().addCallback(lambda _: result))
        return d
