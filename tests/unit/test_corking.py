"""A burst's frames for one connection leave in one send (chatgateway.sessions.corking).

Connections are fakes shaped like Twisted's tcp.Server as write_now reads it, whose
socket records every send(); the burst comes from where the gateway opens the Cork:
a read of the Redis subscriber connection, a chunk of the fan-out's queue.
"""

import pytest
from twisted.internet import task
from twisted.internet.testing import MemoryReactorClock, StringTransport

from chatgateway import config
from chatgateway.api import chat_pb2 as pb
from chatgateway.bus import channels
from chatgateway.bus.memory import MemoryBus
from chatgateway.bus.redis import RedisBus
from chatgateway.redisconn.protocols import SubscriberProtocol
from chatgateway.sessions.corking import Cork
from chatgateway.sessions.fanout import CHUNK
from chatgateway.sessions.outbox import TWISTED_BUFFER_SIZE
from support.rawdevice import Device
from support.wsharness import Harness


class RecordingConnection:
    """What write_now reads of a tcp.Server; its socket records each send() and takes ``room`` bytes."""

    connected = True
    disconnecting = False
    _aborting = False

    def __init__(self, room=1 << 30, buffer_size=TWISTED_BUFFER_SIZE):
        self.room = room
        self.bufferSize = buffer_size
        self.dataBuffer = b""
        self._tempDataLen = 0
        self.sends = []  # what each send() took
        self.buffered = []  # what went to Twisted's write()
        self.socket = self

    def send(self, data):
        taken = bytes(data[: self.room])
        self.room -= len(taken)
        self.sends.append(taken)
        return len(taken)

    def write(self, data):
        self.buffered.append(bytes(data))
        self._tempDataLen += len(data)

    @property
    def received(self):
        return b"".join(self.sends) + b"".join(self.buffered)


def test_a_frame_outside_a_burst_is_sent_at_once():
    cork, connection = Cork(), RecordingConnection()
    cork.write(connection, b"one")
    assert connection.sends == [b"one"]  # during the call: no timer, no later turn
    cork.write(connection, b"two")
    assert connection.sends == [b"one", b"two"]


def test_a_burst_of_frames_for_one_connection_is_one_send():
    cork, a, b = Cork(), RecordingConnection(), RecordingConnection()
    with cork.corked():
        for n in range(10):
            cork.write(a, b"a%d" % n)
            cork.write(b, b"b%d" % n)
        assert a.sends == [] and b.sends == []
        assert cork.held(a) == 20
    assert a.sends == [b"".join(b"a%d" % n for n in range(10))]
    assert b.sends == [b"".join(b"b%d" % n for n in range(10))]
    assert cork.held(a) == 0 and (cork.writes, cork.frames) == (2, 20)


def test_nested_bursts_send_when_the_outermost_ends_and_an_error_still_sends():
    cork, connection = Cork(), RecordingConnection()
    with pytest.raises(RuntimeError):
        with cork.corked():
            with cork.corked():
                cork.write(connection, b"x")
            assert connection.sends == []
            cork.write(connection, b"y")
            raise RuntimeError("a receiver failed")
    assert connection.sends == [b"xy"]
    cork.write(connection, b"z")  # open again
    assert connection.sends == [b"xy", b"z"]


def test_what_the_kernel_does_not_take_goes_behind_twisteds_buffer_in_order():
    cork, connection = Cork(), RecordingConnection(room=5)
    with cork.corked():
        cork.write(connection, b"abc")
        cork.write(connection, b"defg")
    assert connection.sends == [b"abcde"] and connection.buffered == [b"fg"]
    with cork.corked():
        cork.write(connection, b"hi")
    assert connection.buffered == [b"fg", b"hi"]  # Twisted holds bytes: behind them, not past them
    assert connection.received == b"abcdefghi"


def test_a_burst_holds_no_more_for_a_connection_than_its_transport_buffer():
    cork, connection = Cork(), RecordingConnection(buffer_size=100)
    with cork.corked():
        for _ in range(5):
            cork.write(connection, b"x" * 30)
        # 120 bytes reached the buffer size: written then; the rest waits for the burst's end
        assert connection.sends == [b"x" * 120]
        assert cork.held(connection) == 30
    assert connection.sends == [b"x" * 120, b"x" * 30]


def test_release_writes_what_is_held_and_discard_forgets_it():
    cork, a, b = Cork(), RecordingConnection(), RecordingConnection()
    with cork.corked():
        cork.write(a, b"held")
        cork.release(a)  # e.g. before Autobahn writes a close frame past the Cork
        assert a.sends == [b"held"]
        cork.write(b, b"lost")
        cork.discard(b)
        cork.release(None)  # no plain socket: nothing held
        assert cork.held(None) == 0
    assert a.sends == [b"held"] and b.sends == []


# ---------------------------------------------------------------- where the gateway corks


def test_the_messages_of_one_redis_read_are_delivered_in_one_burst():
    cork, connection = Cork(), RecordingConnection()

    class Subscriber(SubscriberProtocol):
        def messageReceived(self, pattern, channel, message):
            cork.write(connection, message)

    protocol = Subscriber(charset=None, replyTimeout=2.0, convertNumbers=False)
    protocol.reactor = task.Clock()
    protocol.batch = cork.corked
    protocol.makeConnection(StringTransport())
    protocol.dataReceived(b"".join(b"*3\r\n$7\r\nmessage\r\n$1\r\nc\r\n$2\r\n%02d\r\n" % n for n in range(40)))
    assert connection.sends == [b"".join(b"%02d" % n for n in range(40))]


def test_the_redis_bus_hands_its_batch_to_every_subscriber_connection():
    reactor = MemoryReactorClock()
    bus = RedisBus(config.load({"JWT_SECRET": "x", "EVENTS_URI": "redis://127.0.0.1:1/0"}), reactor, clock=reactor)
    cork = Cork()
    bus.start(lambda channel, payload: None, batch=cork.corked)
    try:
        assert bus.subscriber._factory.buildProtocol(None).batch == cork.corked
    finally:
        bus.stop()


def _event(n):
    return pb.ServerEvent(id=f"e{n}", message=pb.RoomEvent(id=f"e{n}", room_id="r1")).SerializeToString()


def _device(h, profile):
    device = Device(h, token=profile)
    connection = RecordingConnection()
    device.protocol._socket = connection  # as direct_socket finds a plain TCP connection
    return device, connection


@pytest.fixture
def room():
    h = Harness()
    h.core.rooms = {f"p{i}": ["r1"] for i in range(3)}
    devices = [_device(h, f"p{i}") for i in range(3)]
    yield h, devices
    h.stop()


def test_events_of_one_burst_reach_each_device_in_one_send(room):
    h, devices = room
    with h.gateway.cork.corked():  # as a read of the Redis subscriber connection holds it
        for n in range(5):
            h.gateway.receive(channels.room("r1"), _event(n))
    for _, connection in devices:
        assert len(connection.sends) == 1
        assert connection.received.count(b'"message"') == 5


def test_a_chunk_of_the_fanout_queue_reaches_each_device_in_one_send(room):
    h, devices = room
    h.gateway.fanout._spent = CHUNK  # this turn's budget is spent: the events wait for the pump
    for n in range(5):
        h.gateway.receive(channels.room("r1"), _event(n))
    assert all(connection.sends == [] for _, connection in devices)
    h.clock.advance(0)
    for _, connection in devices:
        assert len(connection.sends) == 1
        frames = connection.received
        assert [frames.find(b'"e%d"' % n) for n in range(5)] == sorted(frames.find(b'"e%d"' % n) for n in range(5))


def test_frames_held_in_a_burst_count_for_the_slow_consumer_limit(room):
    h, devices = room
    device, connection = devices[0]
    with h.gateway.cork.corked():
        h.gateway.receive(channels.room("r1"), _event(0))
        held = h.gateway.cork.held(connection)
        assert held > 0
        assert device.protocol._outbox.buffered == held


def test_a_close_frame_goes_after_the_frames_a_burst_holds(room):
    h, devices = room
    device, connection = devices[0]
    log = []  # a plain TCP connection is one stream: the Cork's sends and Autobahn's writes, in order
    connection.send = lambda data: log.append(("send", bytes(data))) or len(data)
    write = device.transport.write
    device.transport.write = lambda data: log.append(("autobahn", bytes(data))) or write(data)
    with h.gateway.cork.corked():
        h.gateway.receive(channels.room("r1"), _event(0))
        device.protocol.close(4001, "replaced")  # the close frame is written past the Cork
    assert [kind for kind, _ in log] == ["send", "autobahn"]
    assert b'"e0"' in log[0][1] and log[1][1][0] == 0x88  # the event, then the close frame


def test_the_gateway_corks_what_its_bus_delivers_together(monkeypatch):
    batches = []
    monkeypatch.setattr(MemoryBus, "start", lambda self, receiver, batch=None: batches.append(batch))
    h = Harness()
    assert batches == [h.gateway.cork.corked]
    h.stop()


def test_a_room_larger_than_a_chunk_gets_a_burst_in_one_send_per_device(room, monkeypatch):
    monkeypatch.setattr("chatgateway.sessions.fanout.CHUNK", 2)  # 3 devices: more than a chunk
    h, devices = room
    for n in range(4):
        h.gateway.receive(channels.room("r1"), _event(n))
    while h.gateway.fanout._pumping is not None:
        h.clock.advance(0)
    for _, connection in devices:
        assert len(connection.sends) == 1
        assert connection.received.count(b'"message"') == 4
