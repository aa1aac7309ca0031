"""The core client's readiness pings and its stop: a ping's subscription to the channel ends
with the ping (a timed-out one too), and the channel is closed only once every ping has ended
(grpc's connectivity poller dies with "Channel closed!" on a channel closed under it)."""

import threading

import grpc
import pytest_twisted
from twisted.internet import defer, reactor, threads

from chatgateway.core import client as core_module
from chatgateway.core.client import CoreClient


class _Channel:
    def __init__(self):
        self.closed = threading.Event()

    def unary_unary(self, *args, **kwargs):
        return None

    unary_stream = unary_unary

    def close(self):
        self.closed.set()


class _ReadyFuture:
    """channel_ready_future's stand-in: ``result`` waits for ``release`` (then times out, or not)."""

    def __init__(self, ready):
        self.ready = ready
        self.release = threading.Event()
        self.entered = threading.Event()
        self.cancelled = False

    def result(self, timeout=None):
        self.entered.set()
        self.release.wait(10)
        if not self.ready:
            raise grpc.FutureTimeoutError()

    def cancel(self):
        self.cancelled = True
        return not self.ready


def _client(monkeypatch, future):
    monkeypatch.setattr(core_module.grpc, "channel_ready_future", lambda channel: future)
    monkeypatch.setattr(core_module, "POLLER_LINGER_SEC", 0.0)
    channel = _Channel()
    client = CoreClient("unused:1", reactor, 1.0, 1, "gw-unit", channel=channel)
    client.start()
    return client, channel


@pytest_twisted.ensureDeferred
async def test_a_timed_out_ping_unsubscribes(monkeypatch):
    future = _ReadyFuture(ready=False)
    future.release.set()
    client, _ = _client(monkeypatch, future)
    assert await client.ping() is False
    assert future.cancelled
    await client.stop()


@pytest_twisted.ensureDeferred
async def test_stop_closes_the_channel_only_after_the_ping_in_flight_ended(monkeypatch):
    future = _ReadyFuture(ready=True)
    client, channel = _client(monkeypatch, future)
    pinged = client.ping()
    await threads.deferToThread(future.entered.wait, 10)
    stopped = client.stop()
    # the stop's thread waits for the ping: the channel stays open meanwhile
    assert await threads.deferToThread(channel.closed.wait, 0.3) is False
    future.release.set()
    assert await pinged is True
    await defer.gatherResults([stopped])
    assert channel.closed.is_set()
