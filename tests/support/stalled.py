"""Devices that stop reading (and read again), over WebSocket and over the gRPC stream.

WebSocket: a transport with Twisted's buffer accounting: what the gateway writes meanwhile
waits, and past ``bufferSize`` the connection's Outbox is paused. gRPC: a stream whose
writer writes nothing until the device reads again; the device pauses its Outbox past its
share, as chatgateway.edge.grpcstream does."""

import functools

from twisted.internet.address import IPv4Address
from twisted.internet.testing import StringTransport

from chatgateway.api import chat_pb2 as pb
from chatgateway.api import codec
from chatgateway.edge import grpcstream
from support.rawwebsocket import upgrade_request


class StalledTransport(StringTransport):
    """A TCP transport whose peer stops reading, with Twisted's accounting
    (twisted.internet.abstract.FileDescriptor): what is written meanwhile stays in
    ``dataBuffer``, and past ``bufferSize`` the streaming producer is paused."""

    offset = 0
    _tempDataLen = 0
    bufferSize = 65536

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.dataBuffer = b""
        self.stalled = False

    def write(self, data):
        if not self.stalled:
            super().write(data)
            return
        self.dataBuffer += data
        if self.producer is not None and self.streaming and len(self.dataBuffer) > self.bufferSize:
            self.producer.pauseProducing()

    def read_again(self):
        """The peer reads everything: once the buffer is empty Twisted resumes the producer."""
        self.stalled = False
        super().write(self.dataBuffer)
        self.dataBuffer = b""
        if self.producer is not None:
            self.producer.resumeProducing()


def server_frames(data):
    """(opcode, payload) of every frame in ``data`` (server frames are unmasked)."""
    frames, i = [], 0
    while i < len(data):
        opcode, length, head = data[i] & 0x0F, data[i + 1] & 0x7F, 2
        if length == 126:
            length, head = int.from_bytes(data[i + 2 : i + 4], "big"), 4
        frames.append((opcode, data[i + head : i + head + length]))
        i += head + length
    return frames


class WebSocketDevice:
    def __init__(self, harness, token):
        address = IPv4Address("TCP", "10.0.0.1", 40000)
        self.server = harness.factory.buildProtocol(address)
        self.transport = StalledTransport(peerAddress=address)
        self.server.makeConnection(self.transport)
        headers = {"Authorization": f"Bearer {token}"}
        self.server.dataReceived(upgrade_request("gw", "/ws", codec.PROTO, headers))
        assert b" 101 " in self.transport.value().split(b"\r\n", 1)[0]

    def stop_reading(self):
        self.transport.stalled = True

    def read_again(self):
        self.transport.read_again()

    def released(self):
        """The events the gateway wrote, and the close code if it closed."""
        frames = server_frames(self.transport.value().split(b"\r\n\r\n", 1)[1] + self.transport.dataBuffer)
        events = [codec.decode_event(payload, True) for opcode, payload in frames if opcode == 2]
        closes = [int.from_bytes(payload[:2], "big") for opcode, payload in frames if opcode == 8]
        return events, (closes or [None])[0]


class StalledWriter:
    """The loop side of a stream whose device stops reading: nothing handed is written."""

    written = 0


class RecordingHandoff:
    def __init__(self):
        self.items = []

    def put(self, stream, item):
        self.items.append(item)


class SameThreadReactor:
    def callFromThread(self, f, *args, **kwargs):
        f(*args, **kwargs)


class FakeGrpcEdge:
    def __init__(self, harness):
        self.gateway = harness.gateway
        self.reactor = SameThreadReactor()
        self.devices = set()
        self.stopping = False
        self.handoff = RecordingHandoff()


class GrpcStreamDevice:
    def __init__(self, harness, token):
        self.edge = FakeGrpcEdge(harness)
        self.writer = StalledWriter()
        self.device = grpcstream.GrpcDevice(self.edge, self.writer, "")
        self.device.start(token)
        self.read_again()  # the connected event is written

    def stop_reading(self):
        pass  # the writer writes nothing more until read_again

    def read_again(self):
        """What StreamWriter does once its writes go through: write every frame, and resume
        the Outbox at the marker after them."""
        while True:
            handed = self.edge.handoff.items
            self.writer.written = sum(len(item) for item in handed if isinstance(item, bytes))
            markers = [item for item in handed if isinstance(item, functools.partial)]
            self.edge.handoff.items = [item for item in handed if not isinstance(item, functools.partial)]
            if not markers:
                return
            markers[-1]()  # resumes the Outbox, which may hand (and pause) again

    def released(self):
        items = self.edge.handoff.items
        events = [pb.ServerEvent.FromString(item) for item in items if isinstance(item, bytes)]
        ends = [item.code for item in items if isinstance(item, grpcstream.End)]
        return events, (ends or [None])[0]
