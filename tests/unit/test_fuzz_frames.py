"""Property-based fuzzing of what a device may send (hypothesis), through the in-memory harness.

Frames are StreamRequests in both encodings - valid, mutated, truncated, oversized,
deeply nested JSON, arbitrary bytes - sent by a real Autobahn client to the real
edge and Session. For every frame: no exception escapes and nothing is logged as a
failure; a frame that is not a valid StreamRequest is answered (an ``error`` event,
or a ``commandResult`` carrying an error) or ends in a defined close; a command is
answered with its requestId; and a bystander in the same room is unaffected.
"""

import json

import pytest
from google.protobuf import any_pb2
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.logger import globalLogPublisher

from chatgateway.api import chat_pb2 as pb
from chatgateway.api import codec
from chatgateway.bus import channels
from chatgateway.core.client import METHODS
from support.wsharness import Harness

MAX_MESSAGE_BYTES = 4096
DEFINED_CLOSES = {1002, 1007, 1008, 1009, 4401, 4429}

texts = st.text(max_size=24)
room_ids = st.sampled_from(["r1", "r2", "", "nope"]) | texts
scalars = (
    st.none() | st.booleans() | st.integers(-(2**53), 2**53) | st.floats(allow_nan=False, allow_infinity=False) | texts
)
json_values = st.recursive(
    scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(texts, inner, max_size=4), max_leaves=12
)


def _body(method, garbage):
    body = any_pb2.Any()
    if method in METHODS and not garbage:
        body.Pack(METHODS[method][0]())
    else:
        body.type_url = "type.googleapis.com/" + (method or "x")
        body.value = garbage
    return body


commands = st.one_of(
    st.builds(lambda r, on: pb.ClientCommand(typing=pb.TypingCommand(room_id=r, typing=on)), room_ids, st.booleans()),
    st.builds(lambda r, e: pb.ClientCommand(read_marker=pb.ReadMarkerCommand(room_id=r, event_id=e)), room_ids, texts),
    st.builds(lambda rs: pb.ClientCommand(subscribe=pb.RoomsCommand(room_ids=rs)), st.lists(room_ids, max_size=4)),
    st.builds(lambda rs: pb.ClientCommand(unsubscribe=pb.RoomsCommand(room_ids=rs)), st.lists(room_ids, max_size=4)),
    st.builds(
        lambda r, payload: pb.ClientCommand(room_event=_room_event(r, payload)),
        room_ids,
        st.dictionaries(texts, json_values, max_size=4),
    ),
    st.builds(
        lambda m, with_body, garbage: pb.ClientCommand(
            call=pb.CallCommand(method=m, body=_body(m, garbage)) if with_body else pb.CallCommand(method=m)
        ),
        st.sampled_from(sorted(METHODS)) | texts,
        st.booleans(),
        st.binary(max_size=16),
    ),
    st.just(pb.ClientCommand()),
)


def _room_event(room_id, payload):
    event = pb.RoomEvent(room_id=room_id, type=pb.RoomEvent.TEXT)
    try:
        event.payload.update(payload)
    except (ValueError, TypeError):
        pass
    return event


@st.composite
def requests(draw):
    request = pb.StreamRequest()
    kind = draw(st.sampled_from(["command", "ack", "empty", "token"]))
    if kind == "command":
        request.command.CopyFrom(draw(commands))
        request.command.request_id = draw(texts)
    elif kind == "ack":
        request.ack.event_id = draw(texts)
    elif kind == "token":
        request.auth_token = draw(st.sampled_from(["alice", "bad-token", "mallory", ""]))
    if draw(st.booleans()):
        request.device_id = draw(texts)
    return request


def _mutate(data, payload):
    payload = bytearray(payload)
    for _ in range(data.draw(st.integers(1, 4))):
        op = data.draw(st.sampled_from(["flip", "insert", "delete", "truncate"]))
        at = data.draw(st.integers(0, len(payload))) if payload else 0
        if op == "flip" and payload:
            at = min(at, len(payload) - 1)
            payload[at] ^= 1 << data.draw(st.integers(0, 7))
        elif op == "insert":
            payload[at:at] = data.draw(st.binary(min_size=1, max_size=8))
        elif op == "delete":
            del payload[at : at + data.draw(st.integers(1, 8))]
        else:
            del payload[at:]
    return bytes(payload)


def _nested(depth, opener):
    if opener == "object":
        return ('{"command":' * depth + "{}" + "}" * depth).encode()
    if opener == "payload":
        return (
            '{"command":{"requestId":"deep","roomEvent":{"roomId":"r1","payload":{"a":'
            + "[" * depth
            + "]" * depth
            + "}}}}"
        ).encode()
    return ("[" * depth + "]" * depth).encode()


@st.composite
def frames(draw, subprotocol):
    """(payload, is_binary) of one frame for a connection speaking ``subprotocol``."""
    shape = draw(
        st.sampled_from(["valid", "mutated", "truncated", "oversized", "nested", "bytes", "json", "other-encoding"])
    )
    request = draw(requests())
    payload, is_binary = _encode(request, subprotocol)
    if shape == "mutated":
        payload = _mutate(draw(st.data()), payload)
    elif shape == "truncated":
        payload = payload[: draw(st.integers(0, max(0, len(payload) - 1)))]
    elif shape == "oversized":
        payload = payload + b" " * (MAX_MESSAGE_BYTES + 1 - len(payload) + draw(st.integers(0, 2000)))
    elif shape == "nested":
        payload = _nested(
            draw(st.integers(1, 100_000).filter(lambda d: 6 * d < MAX_MESSAGE_BYTES) | st.integers(50, 600)),
            draw(st.sampled_from(["object", "payload", "list"])),
        )
        is_binary = subprotocol == codec.PROTO and draw(st.booleans())
    elif shape == "bytes":
        payload = draw(st.binary(max_size=200))
    elif shape == "json":
        payload = json.dumps(draw(json_values)).encode()
    elif shape == "other-encoding":
        payload, is_binary = _encode(request, codec.PROTO if subprotocol == codec.JSON else codec.JSON)
    return payload, is_binary


def _encode(request, subprotocol):
    try:
        return codec.encode_request(request, subprotocol)
    except (TypeError, ValueError):
        # An Any of an unknown type has no JSON form: write what a JSON client would.
        call = request.command.call
        document = {
            "command": {
                "requestId": request.command.request_id,
                "call": {"method": call.method, "body": {"@type": call.body.type_url}},
            }
        }
        return json.dumps(document).encode(), False


def _expected(payload, is_binary, subprotocol):
    """ "close" | "answer" | request_id (a command to answer) | None (nothing owed)."""
    if len(payload) > MAX_MESSAGE_BYTES:
        return "close"
    if not is_binary:
        try:
            payload.decode("utf-8")
        except UnicodeDecodeError:
            return "close"  # 1007
    try:
        request = codec.decode_request(payload, is_binary, subprotocol)
    except codec.FrameError:
        return "answer"
    if request.WhichOneof("payload") == "command":
        return ("command", request.command.request_id)
    return None


class _Failures:
    def __init__(self):
        self.events = []

    def __call__(self, event):
        if (
            event.get("log_failure") is not None
            or event.get("log_level") is not None
            and event["log_level"].name in ("error", "critical")
        ):
            self.events.append(event)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(data=st.data(), subprotocol=st.sampled_from([codec.JSON, codec.PROTO]))
def test_no_frame_crashes_the_session_or_disturbs_others(data, subprotocol):
    failures = _Failures()
    globalLogPublisher.addObserver(failures)
    h = Harness(MAX_MESSAGE_BYTES=MAX_MESSAGE_BYTES, MAX_EVENTS_PER_SECOND=1000)
    try:
        h.core.rooms.update({"alice": ["r1"], "bob": ["r1"]})
        victim = h.connect("alice", protocols=(subprotocol,))
        bystander = h.connect("bob", protocols=(codec.PROTO,))
        for n in range(data.draw(st.integers(1, 4), label="frames")):
            payload, is_binary = data.draw(frames(subprotocol), label=f"frame {n}")
            before = len(victim.events)
            victim.send_raw(payload, is_binary)
            expected = _expected(payload, is_binary, subprotocol)
            if victim.closed is not None:
                assert victim.closed[0] in DEFINED_CLOSES, victim.closed
                break
            assert expected != "close", "a frame the server must refuse was accepted"
            new = victim.events[before:]
            if expected == "answer":
                assert any(
                    e.WhichOneof("payload") == "error"
                    or (e.HasField("command_result") and e.command_result.HasField("error"))
                    for e in new
                ), new
            elif isinstance(expected, tuple):
                answered = [e.command_result.request_id for e in new if e.HasField("command_result")]
                assert expected[1] in answered, (expected, new)
        # others are unaffected, and a victim still connected still works
        h.publish(channels.room("r1"), pb.ServerEvent(id="after", message=pb.RoomEvent(id="after", room_id="r1")))
        assert bystander.closed is None
        assert bystander.of("message")[-1].message.id == "after"
        if victim.closed is None and "r1" in victim.server.session.rooms:  # it may have unsubscribed
            assert victim.of("message")[-1].message.id == "after"
        assert failures.events == []
    finally:
        globalLogPublisher.removeObserver(failures)
        h.stop()


@pytest.mark.parametrize(
    "frame",
    [
        rb'{"command": {"requestId": "\udc00", "typing": {"roomId": "r1", "typing": true}}}',
        rb'{"command": {"requestId": "q1", "typing": {"roomId": "\ud800x", "typing": true}}}',
        rb'{"ack": {"eventId": "\uDFFF"}}',
    ],
)
def test_a_lone_surrogate_escape_is_answered_not_a_crash(frame):
    # Valid UTF-8 on the wire, but "\udc00" decodes to a str no encoder takes: hypothesis found
    # that echoing such a requestId crashed the frame's handling inside Autobahn.
    failures = _Failures()
    globalLogPublisher.addObserver(failures)
    h = Harness()
    try:
        h.core.rooms["alice"] = ["r1"]
        device = h.connect("alice")
        device.send_raw(frame, False)
        assert device.closed is None
        errors = [e.error for e in device.of("error")] + [e.command_result.error for e in device.of("command_result")]
        assert len(errors) == 1 and "surrogate" in errors[0].message, errors
        device.command(request_id="after", typing=pb.TypingCommand(room_id="r1", typing=True))
        assert "after" in [e.command_result.request_id for e in device.of("command_result")]
        assert failures.events == []
    finally:
        globalLogPublisher.removeObserver(failures)
        h.stop()
