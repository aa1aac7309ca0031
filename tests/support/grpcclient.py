"""Clients of the gateway's gRPC and Connect surfaces, for integration tests.

- StreamDevice: one ``Connect`` stream with grpcio's blocking API (a reader thread
  per stream), for a handful of devices. ``a*`` methods wait off the reactor thread
  (deferToThread), for pytest-twisted tests that also drive WebSocket clients.
- AioLoop: a grpc.aio client loop in a thread of its own, for thousands of streams.
- unary() and connect_call(): one forwarded call over gRPC or Connect (HTTP JSON).
"""

import asyncio
import json
import queue
import threading
import time
import urllib.error
import urllib.request

import grpc
from google.protobuf import json_format
from twisted.internet import threads

from chatgateway.api import chat_pb2 as pb
from chatgateway.core.client import METHODS, SERVICE

_STOP = object()


def connect_method(channel):
    return channel.stream_stream(
        f"/{SERVICE}/Connect",
        request_serializer=pb.StreamRequest.SerializeToString,
        response_deserializer=pb.ServerEvent.FromString,
    )


def stream_metadata(token=None, device_id=None):
    metadata = []
    if token:
        metadata.append(("authorization", f"Bearer {token}"))
    if device_id:
        metadata.append(("x-device-id", device_id))
    return metadata


class StreamEnded(Exception):
    def __init__(self, code, details, trailing):
        super().__init__(f"stream ended: {code} {details}")
        self.code, self.details, self.trailing = code, details, trailing


class StreamDevice:
    """A device on a gRPC Connect stream."""

    def __init__(self, target, token=None, device_id=None, channel=None, metadata=None):
        self.channel = channel or grpc.insecure_channel(target)
        self._own_channel = channel is None
        self._requests = queue.Queue()
        self._events = queue.Queue()
        self.pending = []  # events received and not taken by next_event
        self.end = None  # (code, details, {trailing metadata}) once the stream ended
        self._ended = threading.Event()
        requests = iter(self._requests.get, _STOP)
        self.call = connect_method(self.channel)(requests, metadata=metadata or stream_metadata(token, device_id))
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self):
        try:
            for event in self.call:
                self._events.put(event)
            self.end = (self.call.code(), self.call.details(), dict(self.call.trailing_metadata() or ()))
        except grpc.RpcError as e:
            self.end = (e.code(), e.details(), dict(e.trailing_metadata() or ()))
        self._ended.set()
        self._events.put(None)

    def send(self, request):
        self._requests.put(request)

    def heartbeat(self):
        self.send(pb.StreamRequest())

    def keepalive(self, interval):
        """Send an empty StreamRequest every ``interval`` seconds until the stream ends."""

        def beat():
            while not self._ended.wait(interval):
                self.heartbeat()

        threading.Thread(target=beat, daemon=True).start()
        return self

    def command(self, **fields):
        self.send(pb.StreamRequest(command=pb.ClientCommand(**fields)))

    def next_event(self, kind=None, predicate=None, timeout=10):
        """The next event of ``kind`` matching predicate; StreamEnded when the stream ends first."""

        def matches(event):
            return (kind is None or event.WhichOneof("payload") == kind) and (predicate is None or predicate(event))

        for i, event in enumerate(self.pending):
            if matches(event):
                return self.pending.pop(i)
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"no {kind or 'event'} within {timeout}s")
            try:
                event = self._events.get(timeout=remaining)
            except queue.Empty:
                continue
            if event is None:
                self._events.put(None)
                raise StreamEnded(*self.end)
            if matches(event):
                return event
            self.pending.append(event)

    def wait_end(self, timeout=10):
        if not self._ended.wait(timeout):
            raise TimeoutError(f"the stream did not end within {timeout}s")
        return self.end

    def result(self, request_id, timeout=10):
        return self.next_event("command_result", lambda e: e.command_result.request_id == request_id, timeout)

    def close(self):
        self._requests.put(_STOP)
        self.call.cancel()
        if self._own_channel:
            self.channel.close()

    # for pytest-twisted tests: wait off the reactor thread
    def anext_event(self, *args, **kwargs):
        return threads.deferToThread(self.next_event, *args, **kwargs)

    def aresult(self, *args, **kwargs):
        return threads.deferToThread(self.result, *args, **kwargs)

    def await_end(self, timeout=10):
        return threads.deferToThread(self.wait_end, timeout)


def unary(channel, method, request, token=None, timeout=10, metadata=()):
    """The response of one forwarded RPC (a list for SearchRooms); raises grpc.RpcError."""
    request_cls, response_cls, streaming = METHODS[method]
    make = channel.unary_stream if streaming else channel.unary_unary
    stub = make(
        f"/{SERVICE}/{method}",
        request_serializer=request_cls.SerializeToString,
        response_deserializer=response_cls.FromString,
    )
    md = list(metadata) + stream_metadata(token)
    if streaming:
        return list(stub(request, metadata=md, timeout=timeout))
    return stub(request, metadata=md, timeout=timeout)


class ConnectError(Exception):
    def __init__(self, status, code, message):
        super().__init__(f"HTTP {status} {code}: {message}")
        self.status, self.code, self.message = status, code, message


def connect_call(base_url, method, request, token=None, headers=None, timeout=10):
    """POST /chat.v1.ChatService/<method> with Connect JSON; the response message, or ConnectError."""
    response_cls = METHODS[method][1]
    all_headers = {"Content-Type": "application/json", "Connect-Protocol-Version": "1", **(headers or {})}
    if token:
        all_headers["Authorization"] = f"Bearer {token}"
    body = json_format.MessageToJson(request, indent=None).encode()
    http_request = urllib.request.Request(
        f"{base_url}/{SERVICE}/{method}", data=body, headers=all_headers, method="POST"
    )
    try:
        with urllib.request.urlopen(http_request, timeout=timeout) as answer:
            return json_format.Parse(answer.read(), response_cls(), ignore_unknown_fields=True)
    except urllib.error.HTTPError as e:
        raw = e.read()
        try:
            error = json.loads(raw)
        except ValueError:
            error = {"code": "unknown", "message": raw.decode(errors="replace")}
        raise ConnectError(e.code, error.get("code"), error.get("message", "")) from None


class AioLoop:
    """An asyncio loop in a thread, for grpc.aio clients; ``run`` blocks for a coroutine's result."""

    def __init__(self):
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True, name="test-grpc-aio")
        self._thread.start()

    def run(self, coroutine, timeout=60):
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout)

    def close(self):
        async def cancel_all():
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        try:
            self.run(cancel_all(), timeout=30)
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(10)
