"""Found by the chaos test (docs/architecture.md#the-chaos-test) with devices resuming by
their token alone: a live event fanned out to a session after its close frame went (a
drain's 1001, a 4408) is dropped by the WebSocket edge (``send_encoded``: closing, or not
open) yet counted as delivered (``Session.deliver`` records the position), so the position
the gateway keeps for the device runs ahead of what it received, and a resume from the
token or the server-side record skipped those events. Fixed: an event the closing edge
drops does not move the device's position."""

from chatgateway.api import chat_pb2 as pb
from support.stalled import WebSocketDevice
from support.wsharness import Harness


def publish(h, count):
    """``count`` messages of room r1 by the publish contract (positioned, kept in the stream)."""
    for _ in range(count):
        n = h.hub.streams.rooms.get("r1", [None, 0])[1] + 1
        event = pb.ServerEvent(id=f"e{n}", message=pb.RoomEvent(id=f"e{n}", room_id="r1", type=pb.RoomEvent.TEXT))
        h.gateway.bus.publish_room_event("r1", event.SerializeToString())
    h.advance(0)


def test_events_after_the_close_frame_do_not_move_the_devices_position():
    h = Harness(MAX_EVENTS_PER_SECOND=1000)
    try:
        h.core.rooms.update({"reader": ["r1"]})
        device = WebSocketDevice(h, "reader/dev")
        publish(h, 2)
        [session] = h.gateway.registry.sessions
        session.drain("gateway draining")  # the close frame goes at once: nothing waits
        h.advance(0)
        publish(h, 3)  # before the device's close reply: dropped by the edge
        events, close = device.released()
        assert close == 1001
        assert [e.offset for e in events if e.HasField("message")] == [1, 2]
        assert session.position("r1")[1] == 2  # not 5: what the edge dropped is not counted
    finally:
        h.stop()
