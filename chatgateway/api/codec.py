"""Frames <-> messages for the two WebSocket subprotocols (docs/protocol.md#subprotocols).

chat.v1.json: text frames, canonical proto3 JSON (lowerCamelCase on output;
either spelling accepted on input). chat.v1.proto: binary protobuf frames.
"""

import json

from google.protobuf import json_format
from google.protobuf.message import DecodeError

from chatgateway.api import chat_pb2 as pb

JSON = "chat.v1.json"
PROTO = "chat.v1.proto"
SUBPROTOCOLS = (JSON, PROTO)


class FrameError(Exception):
    """A frame that is not a valid StreamRequest; request_id set when it could be read."""

    def __init__(self, message, request_id=""):
        super().__init__(message)
        self.request_id = request_id


def decode_request(payload, is_binary, subprotocol):
    """StreamRequest from one frame, or FrameError saying what was wrong."""
    if subprotocol == PROTO:
        if not is_binary:
            raise FrameError("chat.v1.proto takes binary frames")
        request = pb.StreamRequest()
        try:
            request.ParseFromString(payload)
        except (DecodeError, RecursionError, ValueError) as e:
            raise FrameError(f"not a StreamRequest: {e}") from None
        return request
    if is_binary:
        raise FrameError("chat.v1.json takes text frames")
    try:
        document = json.loads(payload)
    except (ValueError, RecursionError) as e:
        raise FrameError(f"not JSON: {e}") from None
    if not isinstance(document, dict):
        raise FrameError("a frame must be a JSON object")
    request_id = _request_id(document)
    try:
        return json_format.ParseDict(document, pb.StreamRequest())
    except (json_format.ParseError, RecursionError, TypeError, ValueError) as e:
        raise FrameError(f"invalid StreamRequest: {e}", request_id) from None


def _request_id(document):
    command = document.get("command")
    if isinstance(command, dict):
        value = command.get("requestId", command.get("request_id", ""))
        if isinstance(value, str) and _encodable(value):
            return value
    return ""


def _encodable(text):
    """False for a str holding a lone surrogate ("\\udc00" in JSON is valid UTF-8 on the wire):
    echoed back in an answer, no encoder would take it."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def encode_event(event, subprotocol):
    """(payload, is_binary) of one ServerEvent for a subprotocol."""
    if subprotocol == PROTO:
        return event.SerializeToString(), True
    return json_format.MessageToJson(event, indent=None).encode("utf-8"), False


def encode_request(request, subprotocol):
    """(payload, is_binary) of one StreamRequest (for clients)."""
    if subprotocol == PROTO:
        return request.SerializeToString(), True
    return json_format.MessageToJson(request, indent=None).encode("utf-8"), False


def decode_event(payload, is_binary):
    """ServerEvent from a frame of either subprotocol (for clients)."""
    event = pb.ServerEvent()
    if is_binary:
        event.ParseFromString(payload)
    else:
        json_format.Parse(payload, event)
    return event


def parse_server_event(payload):
    """A serialized ServerEvent (bus payload, stream entry) parsed; None when it does not parse."""
    event = pb.ServerEvent()
    try:
        event.ParseFromString(payload)
    except DecodeError:
        return None
    return event


def stamp(event, now):
    """Set the event's timestamp to ``now`` (seconds since the epoch) and return it."""
    event.timestamp.FromNanoseconds(int(now * 1e9))
    return event
