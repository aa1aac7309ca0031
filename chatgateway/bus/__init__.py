"""The event bus: channels of serialized ServerEvents between cores and gateways.

Two implementations of IEventBus: ``memory`` (one process, the embedded
default) and ``redis`` (many instances). A bus hands every message of the
channels it is subscribed to to one receiver, ``receiver(channel, payload)``.
"""

from zope.interface import Attribute, Interface


class IEventBus(Interface):
    ready = Attribute("True while the bus can deliver (for /readyz).")

    def start(receiver):
        """Begin delivering messages of subscribed channels to receiver(channel, payload)."""

    def subscribe(channel):
        """Receive this channel's messages. Returns a Deferred."""

    def unsubscribe(channel):
        """Stop receiving this channel's messages. Returns a Deferred."""

    def publish(channel, payload):
        """Send bytes to every subscriber of channel. Returns a Deferred."""

    def stop():
        """Release connections. Returns a Deferred."""

    def on_reconnect(callback):
        """Call ``callback()`` when delivery resumes after messages may have been missed."""


def make_bus(config, reactor, hub=None, counts=None):
    """The bus named by config.events_uri; ``hub`` shares one in-memory bus in a process.

    ``counts``: the GatewayCounts a Redis bus counts its failed commands into.
    """
    if config.events_uri == "memory://":
        from chatgateway.bus.memory import MemoryBus

        return MemoryBus(hub)
    from chatgateway.bus.redis import RedisBus

    return RedisBus(config, reactor, counts=counts)
