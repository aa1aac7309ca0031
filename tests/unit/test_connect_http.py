"""The Connect protocol resource, driven without sockets on a task.Clock gateway."""

import io
import json
import struct

import grpc
import pytest
from google.protobuf import json_format
from twisted.web.resource import getChildForRequest
from twisted.web.server import NOT_DONE_YET
from twisted.web.test.requesthelper import DummyRequest

from chatgateway.api import chat_pb2 as pb
from chatgateway.core.client import CoreError
from chatgateway.edge.connect import ERROR_HTTP_STATUS, ConnectService, connect_code
from support.wsharness import Harness, RecordingCore, SlowVerifier


@pytest.fixture
def harness():
    h = Harness(ALLOWED_ORIGINS="https://app.example.com", MAX_MESSAGE_BYTES=1024)
    h.core = h.gateway.core = RecordingCore()
    h.core.rooms = {"alice": ["r1", "r2"], "bob": ["r1"]}
    yield h
    h.stop()


@pytest.fixture
def service(harness):
    return ConnectService(harness.gateway)


class Answer:
    def __init__(self, request):
        self.request = request
        self.status = request.responseCode or 200
        self.body = b"".join(request.written)

    def header(self, name):
        values = self.request.responseHeaders.getRawHeaders(name.encode())
        return values[-1].decode() if values else None

    def json(self):
        assert self.header("content-type") == "application/json"
        return json.loads(self.body)

    def envelopes(self):
        out, rest = [], self.body
        while rest:
            flags, length = struct.unpack(">BI", rest[:5])
            out.append((flags, rest[5 : 5 + length]))
            rest = rest[5 + length :]
        return out


def call(service, method, body=b"", content_type="application/json", token="alice", verb=b"POST", **headers):
    request = send(service, method, body, content_type, token, verb, **headers)
    assert request.finished, "no answer"
    return Answer(request)


def send(service, method, body=b"", content_type="application/json", token="alice", verb=b"POST", **headers):
    """The request, rendered (answered, or not yet)."""
    request = DummyRequest([method.encode()])
    request.method = verb
    request.content = io.BytesIO(body if isinstance(body, bytes) else json.dumps(body).encode())
    if content_type:
        request.requestHeaders.setRawHeaders(b"content-type", [content_type.encode()])
    if token:
        request.requestHeaders.setRawHeaders(b"authorization", [f"Bearer {token}".encode()])
    for name, value in headers.items():
        request.requestHeaders.setRawHeaders(name.replace("_", "-").encode(), [value.encode()])
    resource = getChildForRequest(service, request)
    result = resource.render(request)
    if result is not NOT_DONE_YET:
        request.write(result)
        request.finish()
    return request


def envelope(message_bytes, flags=0):
    return struct.pack(">BI", flags, len(message_bytes)) + message_bytes


def test_error_table_covers_every_status_but_ok():
    assert set(ERROR_HTTP_STATUS) == set(grpc.StatusCode) - {grpc.StatusCode.OK}
    assert connect_code(grpc.StatusCode.PERMISSION_DENIED) == "permission_denied"
    assert ERROR_HTTP_STATUS[grpc.StatusCode.DEADLINE_EXCEEDED] == 504


def test_unary_json(service):
    answer = call(service, "SendEvent", {"event": {"roomId": "r1", "type": "TEXT", "payload": {"text": "hi"}}})
    assert answer.status == 200
    body = answer.json()
    assert body["event"]["roomId"] == "r1" and body["event"]["senderId"] == "alice" and body["event"]["id"] == "e1"


def test_unary_json_reads_either_spelling_and_ignores_unknown_fields(service):
    answer = call(service, "SendEvent", {"event": {"room_id": "r1", "type": "TEXT"}, "futureField": 1})
    assert answer.status == 200


def test_unary_proto(service):
    request = pb.SendEventRequest(event=pb.RoomEvent(room_id="r1", type=pb.RoomEvent.TEXT))
    answer = call(service, "SendEvent", request.SerializeToString(), "application/proto", connect_protocol_version="1")
    assert answer.status == 200 and answer.header("content-type") == "application/proto"
    assert pb.SendEventResponse.FromString(answer.body).event.room_id == "r1"


@pytest.mark.parametrize(
    "method, body, token, status, code",
    [
        ("GetHistory", {"roomId": "nope"}, "alice", 404, "not_found"),
        ("SendEvent", {"event": {"roomId": "r9"}}, "alice", 403, "permission_denied"),
        ("GetHistory", {"roomId": "r1"}, None, 401, "unauthenticated"),
        ("GetHistory", {"roomId": "r1"}, "bad-token", 401, "unauthenticated"),
        ("GetHistory", b"{not json", "alice", 400, "invalid_argument"),
        ("GetHistory", {"roomId": 5}, "alice", 400, "invalid_argument"),
        ("UpdateRoom", {"roomId": "r1"}, "alice", 501, "unimplemented"),  # the fake core's answer
    ],
)
def test_errors_have_connect_bodies_and_http_statuses(service, method, body, token, status, code):
    answer = call(service, method, body, token=token)
    assert answer.status == status
    assert answer.json()["code"] == code
    assert answer.json()["message"]


def test_protocol_errors(service):
    assert call(service, "GetHistory", {}, "text/plain").status == 415
    assert call(service, "GetHistory", envelope(b"{}"), "application/connect+json").status == 415  # unary method
    assert call(service, "GetHistory", {}, connect_protocol_version="2").json()["code"] == "invalid_argument"
    gzip = call(service, "GetHistory", {}, content_encoding="gzip")
    assert (gzip.status, gzip.json()["code"]) == (501, "unimplemented")
    big = call(service, "GetHistory", {"roomId": "r" * 2000})
    assert (big.status, big.json()["code"]) == (429, "resource_exhausted")
    assert call(service, "GetHistory", {}, connect_timeout_ms="soon").status == 400
    get = call(service, "GetHistory", verb=b"GET")
    assert get.status == 405 and get.header("allow") == "POST"
    assert call(service, "NoSuchMethod", {}).status == 501
    connect = call(service, "Connect", {})
    assert connect.status == 501 and "WebSocket" in connect.json()["message"]


def test_empty_json_body_is_the_empty_message(service, harness):
    answer = call(service, "SearchRooms", b"")
    assert [r["id"] for r in answer.json()["data"]] == ["r1", "r2"]


def test_search_rooms_streams_with_connect_envelopes(service):
    request = json_format.MessageToJson(pb.SearchRoomsRequest(page_size=1)).encode()
    answer = call(service, "SearchRooms", envelope(request), "application/connect+json")
    assert answer.status == 200 and answer.header("content-type") == "application/connect+json"
    frames = answer.envelopes()
    assert [flags for flags, _ in frames] == [0, 0, 2]
    assert [json.loads(m)["data"][0]["id"] for _, m in frames[:2]] == ["r1", "r2"]
    assert json.loads(frames[-1][1]) == {}


def test_search_rooms_streams_protobuf(service):
    request = pb.SearchRoomsRequest(page_size=1).SerializeToString()
    answer = call(service, "SearchRooms", envelope(request), "application/connect+proto")
    frames = answer.envelopes()
    assert [pb.SearchRoomsResponse.FromString(m).data[0].id for _, m in frames[:-1]] == ["r1", "r2"]
    assert frames[-1] == (2, b"{}")


def test_search_rooms_unary_fallback_merges_the_pages(service):
    answer = call(service, "SearchRooms", {"pageSize": 1})
    body = answer.json()
    assert [r["id"] for r in body["data"]] == ["r1", "r2"]
    assert body["nextCursor"] == "r2"


def test_streaming_errors_end_the_stream_with_http_200(service, harness):
    harness.core.fail_search = CoreError(grpc.StatusCode.UNAVAILABLE, "core unavailable (circuit open)")
    answer = call(service, "SearchRooms", envelope(b"{}"), "application/connect+json")
    assert answer.status == 200
    assert answer.envelopes() == [
        (2, json.dumps({"error": {"code": "unavailable", "message": "core unavailable (circuit open)"}}).encode())
    ]
    bad = call(service, "SearchRooms", envelope(b"{}", flags=1), "application/connect+json")
    assert json.loads(bad.envelopes()[0][1])["error"]["code"] == "unimplemented"
    two = call(service, "SearchRooms", envelope(b"{}") + envelope(b"{}"), "application/connect+json")
    assert json.loads(two.envelopes()[0][1])["error"]["code"] == "invalid_argument"


def test_trace_context_deadline_and_device_reach_the_core(service, harness):
    trace = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
    call(
        service,
        "SendEvent",
        {"event": {"roomId": "r1"}},
        traceparent=trace,
        tracestate="k=v",
        connect_timeout_ms="1500",
        x_device_id="web-1",
    )
    method, device_id, options = harness.core.options[-1]
    assert method == "SendEvent" and device_id == "web-1"
    assert options == {"traceparent": trace, "tracestate": "k=v", "timeout": 1.5}


@pytest.mark.parametrize("headers, left", [({}, 5.0 - 1.25), ({"connect_timeout_ms": "2000"}, 2.0 - 1.25)])
def test_the_deadline_counts_from_the_requests_arrival(service, harness, headers, left):
    harness.gateway.verifier = SlowVerifier(harness.gateway.verifier, harness.clock, 1.25)
    request = send(service, "SendEvent", {"event": {"roomId": "r1"}}, **headers)
    assert not request.finished
    harness.clock.advance(1.25)
    assert request.finished
    method, _, options = harness.core.options[-1]
    assert method == "SendEvent" and options["timeout"] == pytest.approx(left)


def test_device_id_claim_wins_over_the_header(service, harness):
    call(service, "SendEvent", {"event": {"roomId": "r1"}}, token="alice/phone", x_device_id="web-1")
    assert harness.core.options[-1][1] == "phone"


def test_membership_changes_rescope_live_connections(service, harness):
    carol = harness.connect("carol")
    harness.core.rooms["carol"] = []
    answer = call(service, "AddRoomSubscriptions", {"roomId": "r2", "members": [{"profileId": "carol"}]})
    assert answer.status == 200
    assert "r2" in carol.server.session.rooms


def test_cors(service):
    preflight = call(
        service, "SendEvent", verb=b"OPTIONS", content_type=None, token=None, origin="https://app.example.com"
    )
    assert preflight.status == 204
    assert preflight.header("access-control-allow-origin") == "https://app.example.com"
    assert "authorization" in preflight.header("access-control-allow-headers")
    allowed = call(service, "SendEvent", {"event": {"roomId": "r1"}}, origin="https://app.example.com")
    assert allowed.status == 200 and allowed.header("access-control-allow-origin") == "https://app.example.com"
    refused = call(service, "SendEvent", {"event": {"roomId": "r1"}}, origin="https://evil.example.net")
    assert refused.status == 403
    assert call(service, "SendEvent", verb=b"OPTIONS", token=None, origin="https://evil.example.net").status == 403
