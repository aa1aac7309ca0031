"""The chaos test's judge (support.deliverycheck) and the fleet's frames (support.fleet)."""

from chatgateway.api import chat_pb2 as pb
from support.deliverycheck import check, check_room
from support.fleet import Device, client_frame, resume_with
from support.rawwebsocket import frame_header


def records(numbers, first_offset=1, epoch="e1"):
    return [[epoch, first_offset + i, n] for i, n in enumerate(numbers)]


def test_every_event_once_in_order_is_clean():
    assert not check_room(records([0, 1, 2, 3]), [0, 1, 2, 3])


def test_a_device_that_joined_late_still_must_hold_every_confirmed_event():
    finding = check_room(records([2, 3], first_offset=3), [0, 1, 2, 3])
    assert finding.missing == [0, 1]
    assert not finding.out_of_order


def test_missing_doubled_and_out_of_order_are_each_named():
    held = [["e1", 1, 0], ["e1", 2, 1], ["e1", 2, 1], ["e1", 5, 4], ["e1", 4, 3]]
    finding = check_room(held, [0, 1, 2, 3, 4])
    assert finding.missing == [2]
    assert finding.doubled == [1]
    assert (3, "offset 5 after 2 (skipped)") in finding.out_of_order
    assert (4, "n 3 after 4") in finding.out_of_order
    assert (4, "offset 4 after 5 (back)") in finding.out_of_order


def test_an_uncertain_send_is_neither_required_nor_unexpected_but_a_stranger_is():
    assert not check_room(records([0, 2]), [0, 2], uncertain=[1])
    assert not check_room(records([0, 1, 2]), [0, 2], uncertain=[1])
    assert check_room(records([0, 1, 2]), [0, 2]).unexpected == [1]


def test_events_without_a_number_take_offsets_and_a_repeated_one_is_doubled():
    assert not check_room([["e1", 7, -1], ["e1", 8, 0]], [0])
    assert check_room([["e1", 7, -1], ["e1", 7, -1], ["e1", 8, 0]], [0]).doubled == ["offset 7"]


def test_the_report_lists_devices_gaps_errors_and_stray_rooms():
    published = {"sent": {"r1": [0, 1, 2], "r2": [0]}, "uncertain": {}}
    dump = {
        "a": {"rooms": {"r1": records([0, 1, 2])}, "gaps": [], "errors": []},
        "b": {"rooms": {"r1": [["e1", 1, 0], ["e1", 3, 2]]}, "gaps": [["r1", "e1", 2, 2, "gone"]], "errors": []},
        "c": {"rooms": {"r2": records([0]), "r1": records([0])}, "gaps": [], "errors": [["DATA_LOSS", "x"]]},
    }
    report = check({"a": ["r1"], "b": ["r1"], "c": ["r2"], "d": ["r2"]}, published, dump)
    assert not report.ok and not report.complete
    assert set(report.findings) == {("b", "r1"), ("d", "r2")}
    assert report.findings[("d", "r2")].missing == [0]  # never connected: holds nothing
    assert report.gaps == {"b": [["r1", "e1", 2, 2, "gone"]]}
    assert report.errors == {"c": [["DATA_LOSS", "x"]]}
    assert report.strays == {"c": ["r1"]}
    counts = report.counts()
    assert counts["missing"] == 2 and counts["devices_missing"] == 2 and counts["expected"] == 8
    text = report.describe()
    assert "b room r1: missing 1: 1; out_of_order 1: [(1, 'offset 3 after 1 (skipped)')]" in text


def test_missing_events_are_described_as_runs():
    published = {"sent": {"r": list(range(10))}}
    report = check({"a": ["r"]}, published, {"a": {"rooms": {"r": records([0, 4, 5, 9])}, "gaps": [], "errors": []}})
    assert "missing 6: 1-3, 6-8" in report.describe()


def test_a_clean_run_is_ok():
    published = {"sent": {"r": [0, 1]}}
    report = check({"a": ["r"]}, published, {"a": {"rooms": {"r": records([0, 1])}, "gaps": [], "errors": []}})
    assert report.ok and report.complete


def test_client_frames_are_masked_and_carry_the_payload_at_every_length():
    for size in (5, 125, 126, 65535, 65536):
        payload = bytes(range(256)) * (size // 256) + bytes(size % 256)
        frame = client_frame(payload)
        assert frame[0] == 0x82 and frame[1] & 0x80  # FIN + binary, masked
        # the server-side reading of the same header, once the mask bit and key are taken out
        unmasked = bytes([frame[0], frame[1] & 0x7F]) + frame[2:]
        header_len = {5: 2, 125: 2, 126: 4, 65535: 4, 65536: 10}[size]
        unmasked = unmasked[:header_len] + unmasked[header_len + 4 :]
        opcode, start, length = frame_header(unmasked)
        assert (opcode, length) == (2, size) and unmasked[start:] == payload


def test_a_sign_in_frame_parses_as_a_stream_request():
    request = pb.StreamRequest(auth_token="t", resume_token="r")
    request.positions.add(room_id="room", epoch="e", offset=3)
    frame = client_frame(request.SerializeToString())
    assert pb.StreamRequest.FromString(frame[6:]) == request


def test_mixed_resume_spreads_the_kinds_over_the_devices():
    assert [resume_with("mixed", i) for i in range(3)] == [(True, False), (False, True), (True, True)]
    assert resume_with("none", 4) == (False, False)
    assert resume_with("both", 4) == (True, True)


class FakeFleet:
    targets = [("h:1", "/ws", None), ("h:2", "/ws", None)]
    spread = True
    events = 0
    last_event = None
    connected = 0


def test_a_device_signs_in_bare_first_then_resumes_with_its_token_and_last_positions():
    device = Device(FakeFleet(), 3, "p3", "jwt", use_token=True, use_positions=True)
    assert device.url == 1  # spread: device i starts on URL i mod 2
    assert device.sign_in() == pb.StreamRequest(auth_token="jwt")
    device.opened(pb.Connected(gateway_id="gw-0", resume_token="r1", room_ids=["b", "a"]))
    for room, offset, n in (("a", 7, 0), ("a", 8, 1), ("b", 3, 0)):
        event = pb.ServerEvent(id=f"{room}{n}", epoch="e", offset=offset)
        event.message.room_id, event.message.id = room, f"{room}{n}"
        event.message.payload.update({"n": n})
        device.record(event)
    assert device.rooms == {"a": [["e", 7, 0], ["e", 8, 1]], "b": [["e", 3, 0]]}
    request = device.sign_in()
    assert request.resume_token == "r1"
    assert [(p.room_id, p.epoch, p.offset) for p in request.positions] == [("a", "e", 8), ("b", "e", 3)]
    assert device.history[0][1:] == ["open", "gw-0", False, False, {}]


def test_a_token_only_device_sends_no_positions():
    device = Device(FakeFleet(), 0, "p0", "jwt", use_token=True, use_positions=False)
    device.opened(pb.Connected(resume_token="r1"))
    device.last["a"] = ("x", "e", 5)
    request = device.sign_in()
    assert request.resume_token == "r1" and not request.positions


def test_an_at_least_once_device_may_be_given_again_what_it_holds_but_not_miss_or_reorder():
    published = {"sent": {"r": [0, 1, 2, 3]}}
    again = [["e1", 1, 0], ["e1", 2, 1], ["e1", 3, 2], ["e1", 2, 1], ["e1", 3, 2], ["e1", 4, 3]]
    dump = {"a": {"rooms": {"r": again}, "gaps": [], "errors": []}}
    assert not check({"a": ["r"]}, published, dump).ok  # exactly once: doubled
    report = check({"a": ["r"]}, published, dump, at_least_once=["a"])
    assert report.ok and report.redelivered == 2
    skipped = {
        "a": {"rooms": {"r": [["e1", 1, 0], ["e1", 1, 0], ["e1", 3, 2], ["e1", 4, 3]]}, "gaps": [], "errors": []}
    }
    report = check({"a": ["r"]}, published, skipped, at_least_once=["a"])
    assert report.findings[("a", "r")].missing == [1] and report.redelivered == 1
