"""chatgateway.client.tail: what tail keeps to resume, and what it prints of a gap."""

from chatgateway.api import chat_pb2 as pb
from chatgateway.client.tail import TailState, gap_text, reconnected_text


def message(offset, epoch="e"):
    return pb.ServerEvent(message=pb.RoomEvent(room_id="r", id=f"m{offset}"), epoch=epoch, offset=offset)


def test_the_position_follows_what_was_printed_and_an_event_at_or_below_it_is_a_duplicate():
    tail = TailState("r")
    assert tail.fresh(message(1)) and tail.fresh(message(2))
    assert not tail.fresh(message(2)) and not tail.fresh(message(1))
    assert tail.positions == {"r": ("e", 2)}
    assert tail.fresh(message(1, epoch="new"))  # a new epoch voids the old position
    assert tail.positions == {"r": ("new", 1)}
    assert tail.fresh(pb.ServerEvent(message=pb.RoomEvent(room_id="r")))  # no position: printed


def test_a_gap_moves_the_position_past_it_and_is_printed():
    tail = TailState("r")
    tail.fresh(message(4))
    gap = pb.GapEvent(room_id="r", epoch="e", first_offset=5, last_offset=9, reason="trimmed")
    tail.gap(gap)
    assert tail.positions == {"r": ("e", 9)}
    assert gap_text(gap) == "--:--:-- [gap] events 5-9 of epoch e are missing (trimmed)"


def test_acks_go_out_at_most_once_a_second():
    tail = TailState("r")
    assert [tail.ack_due(t) for t in (0.0, 0.2, 0.99, 1.0, 1.5, 2.1)] == [True, False, False, True, False, True]


def test_tail_says_whether_a_reconnect_resumed():
    tail = TailState("r")
    tail.fresh(message(7))
    resumed = pb.Connected(gateway_id="gw-b", resumed=True)
    assert reconnected_text(resumed, tail) == "reconnected to gw-b; resumed after offset 7 of epoch e"
    assert reconnected_text(pb.Connected(gateway_id="gw-b"), tail).endswith("not resumed (nothing to catch up from)")
