"""Reply timeouts that judge Redis, not our reactor (chatgateway.redisconn.replywatch.ReplyWatch).

A real txredisapi protocol over a StringTransport on a task.Clock: ``clock.advance(x)``
in one call is a reactor turn that lasted x seconds (timers due meanwhile run late).
"""

import socket

import pytest
from twisted.internet import task
from twisted.internet.testing import StringTransport

from chatgateway.redisconn import replywatch
from chatgateway.redisconn.connection import RedisConnection, TimeoutError
from chatgateway.redisconn.protocols import RedisProtocol, SubscriberProtocol
from chatgateway.redisconn.uri import parse_uri

TIMEOUT = 2.0
STEP = TIMEOUT / replywatch.REPLY_TIMEOUT_STEPS


class SocketTransport(StringTransport):
    """A StringTransport whose handle is a real socket, so FIONREAD can be asked of it."""

    def __init__(self, sock):
        super().__init__()
        self.sock = sock

    def getHandle(self):
        return self.sock


class Redis:
    """One protocol, connected to ``transport``; results of its commands recorded."""

    def __init__(self, transport=None, protocol=RedisProtocol):
        self.clock = task.Clock()
        self.transport = transport or StringTransport()
        self.protocol = protocol(replyTimeout=TIMEOUT, convertNumbers=False)
        self.protocol.reactor = self.clock
        self.protocol.makeConnection(self.transport)

    def command(self, *args):
        results = []
        self.protocol.execute_command(*args).addBoth(results.append)
        return results

    def on_time(self, seconds):
        """Time passes with the reactor idle: every timer runs when due."""
        for _ in range(round(seconds / STEP)):
            self.clock.advance(STEP)

    @property
    def aborted(self):
        return self.transport.disconnecting


def failed_with_timeout(results):
    return len(results) == 1 and not isinstance(results[0], (bytes, str)) and results[0].check(TimeoutError)


def test_a_silent_redis_times_out_after_the_timeout_and_the_connection_is_aborted():
    r = Redis()
    results = r.command("PING")
    r.on_time(TIMEOUT - STEP)
    assert results == [] and not r.aborted
    r.on_time(STEP)
    assert failed_with_timeout(results)
    assert r.aborted


def test_a_reply_in_time_ends_the_deadline():
    r = Redis()
    results = r.command("PING")
    r.on_time(STEP)
    r.protocol.dataReceived(b"+PONG\r\n")
    assert results == ["PONG"]
    r.on_time(STEP)  # the watch stops at its next check: nothing is waiting
    assert r.clock.getDelayedCalls() == []
    r.on_time(TIMEOUT * 2)
    assert not r.aborted


def test_one_timer_keeps_the_deadlines_of_a_whole_pipeline():
    r = Redis()
    results = [r.command("GET", f"k{i}") for i in range(1000)]
    assert len(r.clock.getDelayedCalls()) == 1
    r.protocol.dataReceived(b"$-1\r\n" * 999)
    assert all(res == [None] for res in results[:999]) and results[999] == []
    r.on_time(STEP)  # Redis spoke during this step: not silence
    r.on_time(TIMEOUT - STEP)
    assert results[999] == [] and not r.aborted
    r.on_time(STEP)  # the last command's reply never came: its own timeout, counted from the last reply
    assert failed_with_timeout(results[999])
    assert r.aborted


def test_a_command_sent_after_the_watch_stopped_gets_a_full_timeout():
    r = Redis()
    r.command("PING")
    r.protocol.dataReceived(b"+PONG\r\n")
    r.on_time(TIMEOUT * 3)  # idle: the watch stopped
    results = r.command("PING")
    r.on_time(TIMEOUT - STEP)
    assert results == [] and not r.aborted
    r.on_time(STEP)
    assert failed_with_timeout(results)


def test_a_long_reactor_turn_is_not_held_against_redis():
    r = Redis()
    results = r.command("PING")
    r.clock.advance(TIMEOUT + 1)  # one CPU-bound turn: the command was not even flushed
    assert results == [] and not r.aborted
    r.protocol.dataReceived(b"+PONG\r\n")  # read in the next turn
    assert results == ["PONG"]


def test_a_reactor_always_late_still_finds_a_dead_peer():
    r = Redis()
    results = r.command("PING")
    late = 0.3  # every step runs 0.3 s late: only its on-time 0.2 s counts
    for _ in range(9):
        r.clock.advance(STEP + late)
    assert results == []
    r.clock.advance(STEP + late)
    assert failed_with_timeout(results)


def test_a_reply_waiting_unread_in_the_socket_keeps_the_connection():
    ours, theirs = socket.socketpair()
    try:
        r = Redis(SocketTransport(ours))
        results = r.command("PING")
        theirs.sendall(b"+PONG\r\n")  # Redis answered; our reactor has not read it yet
        assert replywatch.unread_bytes(r.transport) == 7
        r.on_time(3 * TIMEOUT)
        assert results == [] and not r.aborted
        r.protocol.dataReceived(ours.recv(100))
        assert results == ["PONG"]
    finally:
        ours.close()
        theirs.close()


def test_an_empty_socket_counts_as_silence():
    ours, theirs = socket.socketpair()
    try:
        r = Redis(SocketTransport(ours))
        results = r.command("PING")
        r.on_time(TIMEOUT)
        assert failed_with_timeout(results)
    finally:
        ours.close()
        theirs.close()


def test_a_command_still_in_our_write_buffer_is_not_held_against_redis():
    r = Redis()
    r.transport.dataBuffer, r.transport.offset, r.transport._tempDataLen = b"*1\r\n$4\r\nPING\r\n", 0, 0
    assert replywatch.unsent_bytes(r.transport) == 14
    results = r.command("PING")
    r.on_time(3 * TIMEOUT)
    assert results == []
    r.transport.dataBuffer = b""  # the kernel took it: from now on Redis owes the reply
    r.on_time(TIMEOUT)
    assert failed_with_timeout(results)


def test_redis_sending_anything_starts_the_count_again():
    r = Redis()
    first, second = r.command("GET", "a"), r.command("GET", "b")
    r.on_time(TIMEOUT - STEP)
    r.protocol.dataReceived(b"$1\r\nA\r\n")  # the first reply: Redis is alive, the second is behind it
    assert first == ["A"]
    r.on_time(TIMEOUT)  # the step in which Redis spoke does not count
    assert second == []
    r.on_time(STEP)
    assert failed_with_timeout(second)


def test_pubsub_messages_keep_a_pending_reply_alive():
    messages = []

    class Subscriber(SubscriberProtocol):
        def messageReceived(self, pattern, channel, message):
            messages.append(message)

    r = Redis(protocol=Subscriber)
    results = r.command("PING")
    for n in range(10):  # a flood of messages ahead of the reply
        r.on_time(STEP)
        r.protocol.dataReceived(b"*3\r\n$7\r\nmessage\r\n$1\r\nc\r\n$1\r\n%d\r\n" % n)
    assert len(messages) == 10 and results == [] and not r.aborted
    r.protocol.dataReceived(b"+PONG\r\n")
    assert results == ["PONG"]


def test_every_complete_reply_of_a_read_is_handled_in_that_read():
    messages = []

    class Subscriber(SubscriberProtocol):
        def messageReceived(self, pattern, channel, message):
            messages.append(message)

    r = Redis(protocol=Subscriber)
    read = b"".join(b"*3\r\n$7\r\nmessage\r\n$1\r\nc\r\n$4\r\n%04d\r\n" % n for n in range(1000))
    r.protocol.dataReceived(read[:-3])  # the last message is cut short
    assert messages == [f"{n:04d}" for n in range(999)]
    assert r.clock.getDelayedCalls() == []  # nothing left for a later reactor turn
    r.protocol.dataReceived(read[-3:])
    assert messages[-1] == "0999"


def test_the_connection_takes_only_protocols_with_judged_timeouts():
    import txredisapi

    address = parse_uri("redis://127.0.0.1:1/0")
    with pytest.raises(TypeError, match="JudgedReplyTimeouts"):
        RedisConnection(address, task.Clock(), "test", protocol=txredisapi.RedisProtocol)
    connection = RedisConnection(address, task.Clock(), "test")
    protocol = connection._factory.buildProtocol(None)
    assert isinstance(protocol, RedisProtocol) and protocol.reactor is connection.reactor
