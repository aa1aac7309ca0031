"""What an open WebSocket connection keeps (issue #7: idle memory per connection).

Structure, not bytes: bench/suite.py measures the RSS; these keep what it found
from coming back.
"""

import pytest

from chatgateway.api import chat_pb2 as pb
from chatgateway.edge.websocket import HANDSHAKE_ATTRIBUTES
from support.wsharness import Harness

# The most entries a 128-slot dict holds: one more and CPython grows it to 256 (~1.7 KiB more).
DICT_128_CAPACITY = 85


@pytest.fixture
def h():
    harness = Harness()
    harness.core.rooms["alice"] = ["r1"]
    yield harness
    harness.stop()


def test_the_handshake_is_forgotten_once_the_session_is_open(h):
    c = h.connect("alice/phone", headers={"x-extra": "x" * 200})
    server = c.server
    assert server.session is not None
    assert not set(HANDSHAKE_ATTRIBUTES) & set(vars(server))
    assert server._opening is None  # the sign-in's claims, token and pending frames with it


def test_the_protocol_dict_stays_small_once_frames_flow(h):
    c = h.connect("alice/phone")
    c.command(typing=pb.TypingCommand(room_id="r1", typing=True))
    c.server.ping()
    h.flush()
    assert len(vars(c.server)) <= DICT_128_CAPACITY


def test_an_idle_outbox_holds_no_queue(h):
    c = h.connect("alice/phone")
    outbox = c.server._outbox
    assert outbox._queue is None
    outbox.pauseProducing()
    c.command(typing=pb.TypingCommand(room_id="r1", typing=True))
    assert len(outbox) > 0
    outbox.resumeProducing()
    h.flush()
    assert len(outbox) == 0 and outbox._queue is None and outbox._by_key is None and outbox._typing is None


def test_sessions_have_no_instance_dict_nor_timer_of_their_own(h):
    before = len(h.clock.getDelayedCalls())
    connections = [h.connect(f"p{i}/d") for i in range(5)]
    session = connections[0].server.session
    assert not hasattr(session, "__dict__")
    assert len(h.clock.getDelayedCalls()) <= before + 1  # the shared token-expiry timer at most
    assert len(h.gateway.token_expiries) == 5
