"""In-process bus: the embedded default for a single instance."""

from twisted.internet import defer
from twisted.logger import Logger
from zope.interface import implementer

from chatgateway.bus import IEventBus


class MemoryHub:
    """The channels of one process; each MemoryBus on it is one subscriber.

    The reference core and the gateway share one hub in development mode.
    Delivery is synchronous, so publish order is delivery order.
    """

    log = Logger()

    def __init__(self):
        self.receivers = {}  # channel -> [callable(channel, payload)]

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

    def stop(self):
        for channel in list(self._channels):
            self.unsubscribe(channel)
        self._receiver = None
        return defer.succeed(None)

    def _receive(self, channel, payload):
        if self._receiver is not None:
            self._receiver(channel, payload)
