"""The same slow device on both edges: WebSocket and gRPC release the same frames under the
per-kind policy of chatgateway.sessions.outbox, and end it with 4429 past SEND_BUFFER_BYTES.

A device reads its ``connected`` event and then stops reading. Over WebSocket, what the
gateway writes stays in Twisted's buffer, which pauses the Outbox past its bufferSize; over
gRPC, what the device's Outbox hands to the stream's writer is never written, and the device
pauses its Outbox past the same share. Either way, what waits after that is shaped by the
same policy, and the frames the gateway releases are compared event by event.
"""

import functools

import pytest

from chatgateway.api import chat_pb2 as pb
from chatgateway.bus import channels
from chatgateway.sessions.session import CloseCode
from support.stalled import GrpcStreamDevice, WebSocketDevice
from support.wsharness import Harness

LIMIT = 4096  # SEND_BUFFER_BYTES; the transports hold up to half of it before the Outbox waits


@pytest.fixture
def h():
    harness = Harness(SEND_BUFFER_BYTES=LIMIT, MAX_EVENTS_PER_SECOND=1000)
    harness.core.rooms.update({"reader": ["r1"]})
    yield harness
    harness.stop()


def message(i, size):
    event = pb.RoomEvent(id=f"e{i}", room_id="r1", sender_id="writer", type=pb.RoomEvent.TEXT)
    event.payload.update({"text": "x" * size})
    return pb.ServerEvent(id=f"e{i}", message=event)


def typing(profile, on=True):
    return pb.ServerEvent(typing_event=pb.TypingEvent(room_id="r1", profile_id=profile, typing=on))


def receipt(profile, event_id):
    return pb.ServerEvent(receipt_event=pb.ReceiptEvent(room_id="r1", profile_id=profile, event_id=event_id))


def label(event):
    which = event.WhichOneof("payload")
    if which == "message":
        return event.message.id
    if which == "typing_event":
        return f"typing {event.typing_event.profile_id} {'on' if event.typing_event.typing else 'off'}"
    if which == "receipt_event":
        return f"receipt {event.receipt_event.profile_id} {event.receipt_event.event_id}"
    return which


def stalled_then_read(h, device):
    """The device stops reading after ``connected``: events arrive, then it reads again;
    then it stops reading for good and the events keep coming.

    The sizes keep every decision 40 bytes or more away from its threshold, more than
    the WebSocket frame headers (2 or 4 bytes a frame) add over the gRPC frames.
    """
    publish = functools.partial(h.publish, channels.room("r1"))
    device.stop_reading()
    publish(message(1, 2100))  # fills the transport's share: from here on frames wait
    publish(typing("alice"))
    publish(typing("bob"))
    publish(receipt("alice", "e0"))
    publish(message(2, 300))
    publish(typing("alice", on=False))  # replaces alice's earlier typing event
    publish(receipt("alice", "e2"))  # replaces alice's receipt, after the message it refers to
    publish(message(3, 300))
    publish(receipt("bob", "e3"))
    publish(message(4, 535))  # fits only without the oldest typing event (bob's), which goes
    device.read_again()
    device.stop_reading()
    publish(message(5, 2100))
    for i in range(6, 12):
        publish(message(i, 300))  # past SEND_BUFFER_BYTES: a slow consumer
    events, close = device.released()
    return [label(e) for e in events], close


def test_a_slow_device_gets_the_same_frames_and_close_over_websocket_and_grpc(h):
    websocket = stalled_then_read(h, WebSocketDevice(h, "reader/ws"))
    grpc = stalled_then_read(h, GrpcStreamDevice(h, "reader/grpc"))
    assert websocket == grpc
    labels, close = grpc
    assert labels == [
        "connected",
        "e1",
        "e2",
        "typing alice off",
        "receipt alice e2",
        "e3",
        "receipt bob e3",
        "e4",
        "e5",
    ]
    assert close == CloseCode.SLOW_CONSUMER
