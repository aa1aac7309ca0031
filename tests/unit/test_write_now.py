"""Frames handed to the kernel at once on a plain TCP connection (chatgateway.sessions.outbox.write_now),
or a burst of them in one send (chatgateway.sessions.corking.Cork).

Real sockets on the real reactor: what the peer reads must be every byte, in order,
whether the kernel takes a write whole, in part, or not at all.
"""

import socket

import pytest_twisted
from twisted.internet import defer, protocol, reactor
from twisted.internet.testing import StringTransport
from twisted.protocols.policies import ProtocolWrapper, WrappingFactory

from chatgateway.sessions.corking import Cork
from chatgateway.sessions.outbox import direct_socket, write_now


class Sink(protocol.Protocol):
    def __init__(self, expected):
        self.expected = expected
        self.received = bytearray()
        self.done = defer.Deferred()

    def dataReceived(self, data):
        self.received += data
        if len(self.received) >= self.expected and not self.done.called:
            self.done.callback(bytes(self.received))


class Holder(protocol.Protocol):
    def __init__(self, connected):
        self.connected_d = connected

    def connectionMade(self):
        self.connected_d.callback(self)


async def _pair(expected, wrap=False):
    """A listening Holder (optionally behind a ProtocolWrapper) and a connected Sink."""
    connected = defer.Deferred()
    factory = protocol.Factory.forProtocol(lambda: Holder(connected))
    port = reactor.listenTCP(0, WrappingFactory(factory) if wrap else factory, interface="127.0.0.1")
    sink = Sink(expected)
    client = await protocol.ClientCreator(reactor, lambda: sink).connectTCP("127.0.0.1", port.getHost().port)
    server = await connected
    return port, client, server, sink


async def _unpair(port, client, server):
    client.transport.loseConnection()
    server.transport.loseConnection()
    await port.stopListening()


@pytest_twisted.ensureDeferred
async def test_every_byte_arrives_in_order_past_the_kernel_buffers():
    frames = [bytes([i % 251]) * size for i, size in enumerate([10, 3_000, 200_000, 7, 50_000, 1])]
    expected = b"".join(frames)
    port, client, server, sink = await _pair(len(expected))
    try:
        connection = direct_socket(server.transport, ProtocolWrapper)
        assert connection is server.transport
        # Small kernel buffers, so the big frames cannot be taken whole.
        connection.socket.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        client.transport.socket.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        for frame in frames:
            write_now(connection, frame)
        assert connection.dataBuffer or connection._tempDataLen  # 200 KB did not fit: the rest waits in Twisted
        assert await sink.done == expected
    finally:
        await _unpair(port, client, server)


@pytest_twisted.ensureDeferred
async def test_a_small_write_on_an_idle_connection_leaves_nothing_buffered():
    port, client, server, sink = await _pair(5)
    try:
        write_now(server.transport, b"hello")
        assert not server.transport.dataBuffer and not server.transport._tempDataLen
        assert await sink.done == b"hello"
    finally:
        await _unpair(port, client, server)


@pytest_twisted.ensureDeferred
async def test_the_connection_is_found_under_pass_through_wrappers_only():
    port, client, server, sink = await _pair(0, wrap=True)
    try:
        assert direct_socket(server.transport, ProtocolWrapper) is server.transport.transport
        assert direct_socket(server.transport, ()) is None  # an unknown layer (TLS...) is never bypassed
        assert direct_socket(StringTransport(), ProtocolWrapper) is None
    finally:
        await _unpair(port, client, server)


@pytest_twisted.ensureDeferred
async def test_a_closing_connection_is_written_as_twisted_would():
    port, client, server, sink = await _pair(4)
    try:
        server.transport.loseConnection()
        write_now(server.transport, b"late")  # disconnecting: not sent behind Twisted's back
        assert server.transport._tempDataLen == 4
        assert await sink.done == b"late"  # Twisted flushes what was written before it closes
    finally:
        await port.stopListening()


class RecordingSocket:
    """The connection's real socket, with every send() recorded."""

    def __init__(self, sock):
        self._sock = sock
        self.sends = []

    def send(self, data):
        sent = self._sock.send(data)
        self.sends.append(sent)
        return sent

    def __getattr__(self, name):
        return getattr(self._sock, name)


@pytest_twisted.ensureDeferred
async def test_a_burst_of_frames_is_one_send_and_a_lone_frame_goes_at_once():
    frames = [b"frame %d;" % n for n in range(50)]
    expected = b"lone;" + b"".join(frames)
    port, client, server, sink = await _pair(len(expected))
    recording = server.transport.socket = RecordingSocket(server.transport.socket)
    try:
        cork = Cork()
        cork.write(server.transport, b"lone;")
        assert recording.sends == [5]  # at once, in the call
        with cork.corked():
            for frame in frames:
                cork.write(server.transport, frame)
            assert recording.sends == [5]
        assert recording.sends == [5, len(expected) - 5]  # 50 frames, one send
        assert await sink.done == expected
    finally:
        server.transport.socket = recording._sock
        await _unpair(port, client, server)
