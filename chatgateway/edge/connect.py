"""The Connect protocol on HTTP_PORT: the ten forwarded methods as plain HTTP, and GetPresence.

``POST /chat.v1.ChatService/<Method>`` (https://connectrpc.com/docs/protocol):

- unary: ``Content-Type: application/json`` (canonical proto3 JSON; unknown
  fields are ignored, as connect-go does) or ``application/proto``; the answer
  has the same type, HTTP 200; an error is HTTP 4xx/5xx (ERROR_HTTP_STATUS) with
  ``{"code": "permission_denied", "message": "..."}``.
- SearchRooms is server-streaming: with ``application/connect+json`` or
  ``application/connect+proto`` it streams one enveloped SearchRoomsResponse per
  page, then the end-of-stream message (errors in it, HTTP 200, as the protocol
  says). Sent as unary (``application/json``/``proto``), it answers one
  SearchRoomsResponse holding every page's rooms (``next_cursor`` of the last
  page): the fallback for curl.
- ``Authorization: Bearer <jwt>`` (required), ``X-Device-ID`` (when the token has
  no device_id claim), ``traceparent``/``tracestate`` (passed to the core),
  ``Connect-Timeout-Ms`` (shortens the core's deadline), ``Connect-Protocol-Version``
  (optional; must be 1 when sent). Only the identity encoding; a body over
  MAX_MESSAGE_BYTES is resource_exhausted.
- Browsers: a cross-origin request needs its Origin in ALLOWED_ORIGINS (empty:
  any); preflight ``OPTIONS`` requests are answered for allowed origins.

Runs on the reactor thread like the rest of twisted.web; calls go through
chatgateway.sessions.forwarding, the path the gRPC unary RPCs take. ``GetPresence``
(docs/protocol.md#presence) is the gateway's own, answered by
chatgateway.sessions.presence.get_presence with the same codecs and errors.
"""

import functools
import json
import struct

import grpc
from google.protobuf import json_format
from google.protobuf.message import DecodeError
from twisted.internet import defer
from twisted.logger import Logger
from twisted.web import resource, server

from chatgateway.api import chat_pb2 as pb
from chatgateway.core.client import METHODS, SERVICE, CoreError
from chatgateway.edge.origins import OriginPolicy
from chatgateway.sessions import forwarding, presence
from chatgateway.sessions.opening import bearer_token

# gRPC status -> (Connect code, HTTP status), from the protocol's table.
ERROR_HTTP_STATUS = {
    grpc.StatusCode.CANCELLED: 499,
    grpc.StatusCode.UNKNOWN: 500,
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.ALREADY_EXISTS: 409,
    grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.FAILED_PRECONDITION: 400,
    grpc.StatusCode.ABORTED: 409,
    grpc.StatusCode.OUT_OF_RANGE: 400,
    grpc.StatusCode.UNIMPLEMENTED: 501,
    grpc.StatusCode.INTERNAL: 500,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DATA_LOSS: 500,
    grpc.StatusCode.UNAUTHENTICATED: 401,
}

GET_PRESENCE = (pb.GetPresenceRequest, pb.GetPresenceResponse, False)
UNARY_TYPES = {"application/json": "json", "application/proto": "proto"}
STREAM_TYPES = {"application/connect+json": "json", "application/connect+proto": "proto"}
END_STREAM = 0x02
COMPRESSED = 0x01
ENVELOPE = struct.Struct(">BI")
MAX_TIMEOUT_DIGITS = 10
CORS_HEADERS = (
    "authorization, content-type, connect-protocol-version, connect-timeout-ms, "
    "x-device-id, traceparent, tracestate, x-user-agent"
)


def connect_code(code):
    """The Connect code of a grpc.StatusCode: its name in lower case."""
    return code.name.lower()


def error_body(code, message):
    body = {"code": connect_code(code)}
    if message:
        body["message"] = message
    return body


class ConnectError(Exception):
    def __init__(self, code, message):
        super().__init__(message)
        self.code = code
        self.message = message


def _encode(message, codec):
    if codec == "json":
        return json_format.MessageToJson(message, indent=None).encode("utf-8")
    return message.SerializeToString()


def _decode(payload, message_cls, codec):
    message = message_cls()
    try:
        if codec == "json":
            if payload.strip():
                json_format.Parse(payload.decode("utf-8"), message, ignore_unknown_fields=True)
        else:
            message.ParseFromString(payload)
    except (json_format.ParseError, DecodeError, UnicodeDecodeError, RecursionError, ValueError, TypeError) as e:
        raise ConnectError(
            grpc.StatusCode.INVALID_ARGUMENT, f"cannot decode {message_cls.DESCRIPTOR.full_name}: {e}"
        ) from e
    return message


def _envelope(flags, payload):
    return ENVELOPE.pack(flags, len(payload)) + payload


def _unenvelope(body):
    """The one message of an enveloped request body."""
    if len(body) < ENVELOPE.size:
        raise ConnectError(grpc.StatusCode.INVALID_ARGUMENT, "a streaming request needs one enveloped message")
    flags, length = ENVELOPE.unpack_from(body)
    if flags & COMPRESSED:
        raise ConnectError(grpc.StatusCode.UNIMPLEMENTED, "compressed messages are not supported (identity only)")
    if flags & ~COMPRESSED or len(body) != ENVELOPE.size + length:
        raise ConnectError(grpc.StatusCode.INVALID_ARGUMENT, "a server-streaming request carries exactly one message")
    return body[ENVELOPE.size :]


def _header(request, name):
    """A request header as str (latin-1, as HTTP headers are), stripped; None when absent."""
    value = request.getHeader(name)
    if isinstance(value, bytes):
        value = value.decode("latin-1")
    return value.strip() if value else None


class ConnectService(resource.Resource):
    """``/chat.v1.ChatService``: one child per forwarded method."""

    def __init__(self, gateway):
        super().__init__()
        self._gateway = gateway
        self._origins = OriginPolicy(gateway.config.allowed_origins)
        for name in METHODS:
            self.putChild(name.encode("ascii"), ConnectMethod(gateway, name, self._origins))
        # Served by the gateway itself, not forwarded (docs/protocol.md#presence).
        self.putChild(
            b"GetPresence",
            ConnectMethod(gateway, "GetPresence", self._origins, GET_PRESENCE, presence.get_presence),
        )

    def getChild(self, path, request):
        return _Unimplemented(path.decode("utf-8", "replace"))

    def render(self, request):
        return _Unimplemented("").render(request)


class _Unimplemented(resource.Resource):
    isLeaf = True

    def __init__(self, name):
        super().__init__()
        self._name = name

    def render(self, request):
        if self._name == "Connect":
            message = "Connect is a bidirectional stream: use WebSocket /ws or gRPC on GRPC_PORT"
        else:
            message = f"{SERVICE}/{self._name} is not a method of this service"
        request.setResponseCode(ERROR_HTTP_STATUS[grpc.StatusCode.UNIMPLEMENTED])
        request.setHeader(b"content-type", b"application/json")
        return json.dumps(error_body(grpc.StatusCode.UNIMPLEMENTED, message)).encode("utf-8")


class ConnectMethod(resource.Resource):
    isLeaf = True
    log = Logger()

    def __init__(self, gateway, method, origins, spec=None, call=None):
        super().__init__()
        self._gateway = gateway
        self._method = method
        self._request_cls, self._response_cls, self._streaming = spec or METHODS[method]
        # call(gateway, request, token, **options): the answer, or a CoreError.
        self._call = call if call is not None else functools.partial(forwarding.forward, method=method)
        self._origins = origins
        self._max_bytes = gateway.config.max_message_bytes

    # ------------------------------------------------------------ CORS

    def _cors(self, request):
        """False when the request's Origin is not allowed (answered 403)."""
        origin = _header(request, b"origin")
        if origin is None:
            return True
        if not self._origins.allows(origin):
            return False
        request.setHeader(b"access-control-allow-origin", origin.encode("latin-1"))
        request.setHeader(b"vary", b"Origin")
        request.setHeader(b"access-control-expose-headers", b"content-type, connect-protocol-version")
        return True

    def render_OPTIONS(self, request):
        if not self._cors(request):
            request.setResponseCode(403)
            return b""
        request.setResponseCode(204)
        request.setHeader(b"access-control-allow-methods", b"POST")
        request.setHeader(b"access-control-allow-headers", CORS_HEADERS.encode("ascii"))
        request.setHeader(b"access-control-max-age", b"7200")
        return b""

    def render_GET(self, request):
        request.setResponseCode(405)
        request.setHeader(b"allow", b"POST")
        request.setHeader(b"content-type", b"application/json")
        return json.dumps(error_body(grpc.StatusCode.UNIMPLEMENTED, "use POST")).encode("utf-8")

    # ------------------------------------------------------------ POST

    def render_POST(self, request):
        if not self._cors(request):
            request.setResponseCode(403)
            request.setHeader(b"content-type", b"application/json")
            message = "origin not allowed"
            return json.dumps(error_body(grpc.StatusCode.PERMISSION_DENIED, message)).encode("utf-8")
        content_type = (_header(request, b"content-type") or "").split(";", 1)[0].strip().lower()
        if content_type in UNARY_TYPES:
            codec, enveloped = UNARY_TYPES[content_type], False
        elif content_type in STREAM_TYPES and self._streaming:
            codec, enveloped = STREAM_TYPES[content_type], True
        else:
            accepted = ", ".join([*UNARY_TYPES, *(STREAM_TYPES if self._streaming else ())])
            request.setResponseCode(415)
            request.setHeader(b"accept-post", accepted.encode("ascii"))
            return b""
        try:
            message, timeout = self._parse(request, codec, enveloped)
        except ConnectError as e:
            return self._fail(request, e.code, e.message, codec, enveloped)
        gone = []  # the client went away before the answer
        request.notifyFinish().addErrback(gone.append)
        d = defer.Deferred.fromCoroutine(
            self._call(
                self._gateway,
                request=message,
                token=bearer_token(_header(request, b"authorization")),
                device_id=_header(request, b"x-device-id") or "",
                traceparent=_header(request, b"traceparent"),
                tracestate=_header(request, b"tracestate"),
                timeout=timeout,
            )
        )
        args = (request, codec, enveloped, gone)
        d.addCallbacks(self._answer, self._failed, callbackArgs=args, errbackArgs=args)
        d.addErrback(lambda f: self.log.failure("answering {method} failed", f, method=self._method))
        return server.NOT_DONE_YET

    def _parse(self, request, codec, enveloped):
        version = _header(request, b"connect-protocol-version")
        if version is not None and version != "1":
            raise ConnectError(grpc.StatusCode.INVALID_ARGUMENT, f"unsupported Connect-Protocol-Version {version!r}")
        encoding_header = b"connect-content-encoding" if enveloped else b"content-encoding"
        encoding = (_header(request, encoding_header) or "identity").lower()
        if encoding != "identity":
            raise ConnectError(grpc.StatusCode.UNIMPLEMENTED, f"unsupported encoding {encoding!r}; supported: identity")
        timeout = None
        timeout_ms = _header(request, b"connect-timeout-ms")
        if timeout_ms is not None:
            if not timeout_ms.isdigit() or len(timeout_ms) > MAX_TIMEOUT_DIGITS:
                raise ConnectError(grpc.StatusCode.INVALID_ARGUMENT, "Connect-Timeout-Ms must be a positive integer")
            timeout = int(timeout_ms) / 1000.0
        request.content.seek(0)
        body = request.content.read(self._max_bytes + ENVELOPE.size + 1)
        if len(body) > self._max_bytes + (ENVELOPE.size if enveloped else 0):
            raise ConnectError(grpc.StatusCode.RESOURCE_EXHAUSTED, f"request larger than {self._max_bytes} bytes")
        if enveloped:
            body = _unenvelope(body)
        return _decode(body, self._request_cls, codec), timeout

    # ------------------------------------------------------------ answers

    def _answer(self, response, request, codec, enveloped, gone):
        if gone:
            return
        request.setResponseCode(200)
        if enveloped:
            body = b"".join(_envelope(0, _encode(page, codec)) for page in response)
            body += _envelope(END_STREAM, b"{}")
            request.setHeader(b"content-type", f"application/connect+{codec}".encode("ascii"))
        else:
            if self._streaming:
                response = self._merged(response)
            body = _encode(response, codec)
            request.setHeader(b"content-type", f"application/{codec}".encode("ascii"))
        request.write(body)
        request.finish()

    def _merged(self, pages):
        """The unary fallback of a server-streaming method: one response with every page's items."""
        merged = self._response_cls()
        for page in pages:
            merged.data.extend(page.data)
            merged.next_cursor = page.next_cursor
        return merged

    def _failed(self, failure, request, codec, enveloped, gone):
        if failure.check(CoreError):
            code, message = failure.value.code, failure.value.message
        else:
            self.log.failure("forwarding {method} failed", failure, method=self._method)
            code, message = grpc.StatusCode.INTERNAL, "internal error"
        if gone:
            return
        request.write(self._fail(request, code, message, codec, enveloped))
        request.finish()

    def _fail(self, request, code, message, codec, enveloped):
        """The body (and status and headers) of an error answer."""
        if enveloped:
            request.setResponseCode(200)
            request.setHeader(b"content-type", f"application/connect+{codec}".encode("ascii"))
            end = json.dumps({"error": error_body(code, message)}).encode("utf-8")
            return _envelope(END_STREAM, end)
        request.setResponseCode(ERROR_HTTP_STATUS.get(code, 500))
        request.setHeader(b"content-type", b"application/json")
        return json.dumps(error_body(code, message)).encode("utf-8")
