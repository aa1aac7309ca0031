"""The gRPC edge on GRPC_PORT: chat.v1.ChatService over HTTP/2 (docs/protocol.md#calling-the-api).

``Connect`` is a bidirectional stream with the WebSocket session's semantics:
the same Session (chatgateway.sessions.session) decides everything, GrpcDevice is its
transport, as DeviceProtocol is for WebSocket. The ten forwarded methods are
plain unary (SearchRooms: server-streaming) RPCs proxied to the core through
the gateway's CoreClient. grpc.health.v1 and server reflection are served too.

Threads. grpc.aio serves every RPC as a coroutine on one asyncio loop, run by
one thread of its own ("grpc-edge"): a stream costs memory, never a thread.
Sessions live on the reactor thread:

- device → gateway: a stream's reader coroutine parses each StreamRequest on
  the loop and hands it to the reactor with ``reactor.callFromThread`` (FIFO,
  so in order); with MAX_UNHANDLED messages not yet handled there, it stops
  reading, and HTTP/2 flow control holds the device back. It stops reading as
  well while the device is over its inbound budget (MAX_FRAMES_PER_SECOND
  messages, MAX_BYTES_PER_SECOND), as the WebSocket edge does; a device over it
  for OVER_BUDGET_CLOSE_SEC is ended as 1008 (RESOURCE_EXHAUSTED).
- gateway → device: GrpcDevice (reactor) serializes each event once - a fan-out
  event once for all gRPC recipients - and puts the bytes in the edge's
  hand-off; one ``loop.call_soon_threadsafe`` per batch moves every queued item
  to its stream's outbox; the stream's writer coroutine writes them in order.
- unary calls: the handler coroutine asks the reactor to run the call
  (``callFromThread``) and awaits a ``concurrent.futures.Future`` the reactor's
  Deferred fills, through ``asyncio.wrap_future``.

Outbox bound: at most SEND_BUFFER_BYTES of serialized events wait per stream,
beyond what HTTP/2 flow control already holds in grpc's buffers (about 4 MB);
more is a slow consumer, ended with RESOURCE_EXHAUSTED (close code 4429).

Close codes become gRPC statuses of the same meaning (CLOSE_STATUS); the exact
code also travels in the trailing metadata ``chat-close-code``. Heartbeats: the
gateway's sweep calls ``ping``, a no-op here (HTTP/2 keepalive pings detect dead
peers); a device must still send a StreamRequest (an empty one will do) at
least every CONNECTION_TIMEOUT_SEC, or its stream ends as 4408 does.
"""

import asyncio
import collections
import concurrent.futures
import threading

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from twisted.application import service
from twisted.internet import defer, task
from twisted.logger import Logger
from zope.interface import implementer

from chatgateway.api import codec

from chatgateway.sessions import forwarding

from chatgateway.telemetry import readiness
from chatgateway.auth.tokens import AuthError
from chatgateway.core.client import METHODS, SERVICE, STATUS_DETAILS_KEY, CoreError
from chatgateway.edge.websocket import MAX_PENDING_FRAMES
from chatgateway.sessions.ratelimit import InboundBudget
from chatgateway.sessions.session import CloseCode, ISessionTransport, close_after_failed_open, replay

# A WebSocket close code (docs/protocol.md#heartbeats-and-close-codes) -> the gRPC status a stream ends with.
CLOSE_STATUS = {
    CloseCode.NORMAL: grpc.StatusCode.OK,
    CloseCode.GOING_AWAY: grpc.StatusCode.UNAVAILABLE,
    CloseCode.POLICY: grpc.StatusCode.RESOURCE_EXHAUSTED,
    CloseCode.TOO_BIG: grpc.StatusCode.RESOURCE_EXHAUSTED,
    CloseCode.TRY_AGAIN_LATER: grpc.StatusCode.UNAVAILABLE,
    CloseCode.REPLACED: grpc.StatusCode.ABORTED,
    CloseCode.UNAUTHENTICATED: grpc.StatusCode.UNAUTHENTICATED,
    CloseCode.HEARTBEAT_TIMEOUT: grpc.StatusCode.UNAVAILABLE,
    CloseCode.SLOW_CONSUMER: grpc.StatusCode.RESOURCE_EXHAUSTED,
}
CLOSE_CODE_KEY = "chat-close-code"

# Messages a device may send while its session is being opened; more is abuse (1008).
MAX_PENDING_MESSAGES = MAX_PENDING_FRAMES
# Messages of one stream handed to the reactor and not yet handled there; the reader
# waits beyond it, so HTTP/2 flow control holds back a device that floods.
MAX_UNHANDLED = 64
# The key of a fan-out event's gRPC frame (serialized ServerEvent) in EncodedEvent.
FRAME_KEY = "grpc"
# How often grpc.health.v1 is brought in line with the dependencies of /readyz.
HEALTH_INTERVAL_SEC = 2.0
# The longest startService waits for the port to be bound.
STARTUP_TIMEOUT_SEC = 15.0


def _serialized(encoded):
    return encoded.payload if encoded.payload is not None else encoded.event.SerializeToString()


def _metadata(context):
    """Invocation metadata as {key: first value}."""
    values = {}
    for key, value in context.invocation_metadata() or ():
        values.setdefault(key.lower(), value)
    return values


class _End:
    """The end of a stream: a WebSocket close code and its reason.

    ``now``: end at once, dropping what waits in the outbox (an abort).
    """

    __slots__ = ("code", "reason", "now")

    def __init__(self, code, reason, now=False):
        self.code = code
        self.reason = reason
        self.now = now


class _Handled:
    """Reactor → loop: the reactor has handled one message of the stream."""


HANDLED = _Handled()


class _Stream:
    """The loop side of one Connect stream: the outbox and its writer. Loop thread only."""

    __slots__ = ("outbox", "queued", "limit", "counts", "wake", "end", "abort", "task", "unhandled", "credit")

    def __init__(self, limit, counts):
        self.outbox = collections.deque()
        self.queued = 0  # bytes in the outbox
        self.limit = limit
        self.counts = counts  # the gateway's GatewayCounts
        self.wake = asyncio.Event()
        self.end = None  # _End once the gateway closed the stream (after the outbox drains)
        self.abort = None  # _End that ends it at once (slow consumer)
        self.task = asyncio.current_task()
        self.unhandled = 0  # messages handed to the reactor, not handled yet
        self.credit = asyncio.Event()

    async def received(self):
        """After handing one message to the reactor: wait while too many are unhandled."""
        self.unhandled += 1
        if self.unhandled >= MAX_UNHANDLED:
            self.credit.clear()
            await self.credit.wait()

    def push(self, item):
        if item is HANDLED:
            self.unhandled -= 1
            if self.unhandled < MAX_UNHANDLED:
                self.credit.set()
            return
        if self.abort is not None or (self.end is not None and not getattr(item, "now", False)):
            return
        if isinstance(item, _End) and item.now:
            self._abort(item)
            return
        if isinstance(item, _End):
            self.end = item
        elif self.outbox and self.queued + len(item) > self.limit:
            self._abort(_End(CloseCode.SLOW_CONSUMER, "slow consumer: more than SEND_BUFFER_BYTES waiting"))
            self.counts.connection_closing(GrpcDevice, CloseCode.SLOW_CONSUMER)  # loop thread: only it counts 4429s of gRPC
            return
        else:
            self.outbox.append(item)
            self.queued += len(item)
        self.wake.set()

    def _abort(self, end):
        self.outbox.clear()
        self.queued = 0
        self.abort = end
        self.task.cancel()  # the writer may be stuck in a write the device does not read

    async def write_all(self, context):
        """Write the outbox until the stream ends; returns the _End."""
        try:
            while True:
                if self.outbox:
                    item = self.outbox.popleft()
                    self.queued -= len(item)
                    await context.write(item)
                elif self.end is not None:
                    return self.end
                else:
                    self.wake.clear()
                    await self.wake.wait()
        except asyncio.CancelledError:
            if self.abort is not None:
                return self.abort
            raise


class _Handoff:
    """Reactor → loop: (stream, item) pairs in order, one loop wake-up per batch."""

    def __init__(self, loop):
        self._loop = loop
        self._lock = threading.Lock()
        self._items = []
        self._scheduled = False

    def put(self, stream, item):
        with self._lock:
            self._items.append((stream, item))
            if self._scheduled:
                return
            self._scheduled = True
        try:
            self._loop.call_soon_threadsafe(self._drain)
        except RuntimeError:  # the loop is closed: the edge has stopped
            pass

    def _drain(self):
        with self._lock:
            items, self._items = self._items, []
            self._scheduled = False
        for stream, item in items:
            stream.push(item)


@implementer(ISessionTransport)
class GrpcDevice:
    """The reactor side of one Connect stream: authentication, then a Session's transport."""

    log = Logger()
    transport_name = "grpc"

    session = None

    def __init__(self, edge, stream, fallback_device):
        self.edge = edge
        self.gateway = edge.gateway
        self._stream = stream
        self._fallback_device = fallback_device
        self._claims = None
        self._token = None
        self._pending = []
        self._opening = False
        self._closing = False
        self._gone = False
        self._auth_timer = None

    # ------------------------------------------------------------ stream events (reactor thread)

    def start(self, token):
        self.edge.devices.add(self)
        if self.edge.stopping or getattr(self.gateway, "draining", False):
            self.close(CloseCode.GOING_AWAY, "gateway shutting down")
        elif token:
            self._opening = True
            self._verify(token).addCallbacks(lambda _: self._open_session(self._fallback_device), self._refused)
        else:
            self._auth_timer = self.gateway.clock.callLater(
                self.gateway.config.auth_timeout_sec,
                self.close,
                CloseCode.UNAUTHENTICATED,
                "authentication timeout: send authorization metadata or auth_token in the first message",
            )

    def received(self, item):
        """One parsed StreamRequest, or the codec.FrameError of one that did not parse."""
        self.edge.handoff.put(self._stream, HANDLED)  # the reader may hand over the next one
        if self._closing or self._gone:
            return
        if self.session is not None:
            self.session.activity()
        if isinstance(item, codec.FrameError):
            self._bad_message(item)
        elif self.session is not None:
            self.session.handle(item)
        elif self._opening:
            if len(self._pending) >= MAX_PENDING_MESSAGES:
                self.close(CloseCode.POLICY, "too many messages before connected")
            else:
                self._pending.append(item)
        else:
            self._authenticate_message(item)

    def over_budget(self, reason):
        """The reader found the device over its inbound budget for OVER_BUDGET_CLOSE_SEC."""
        if not self._closing and not self._gone:
            self.log.info("closing a gRPC stream: {reason}", reason=reason)
            self.close(CloseCode.POLICY, reason)

    def half_closed(self):
        """The device ended its side of the stream: the connection closes normally."""
        self.close(CloseCode.NORMAL, "the device closed its stream")

    def gone(self):
        """The RPC ended, for whatever reason: forget the session everywhere."""
        self._gone = True
        self.edge.devices.discard(self)
        self._cancel_auth_timer()
        if self.session is not None:
            self.session.closed_by_transport()

    # ------------------------------------------------------------ authentication

    def _verify(self, token):
        def verified(claims):
            self._claims, self._token = claims, token
            return claims

        return self.gateway.verifier.verify(token).addCallback(verified)

    def _refused(self, failure):
        failure.trap(AuthError)
        self._opening = False
        self.close(CloseCode.UNAUTHENTICATED, f"invalid token: {failure.value}")

    def _authenticate_message(self, request):
        if not request.auth_token:
            self.close(CloseCode.UNAUTHENTICATED, "the first message must carry auth_token (or send authorization metadata)")
            return
        self._cancel_auth_timer()
        self._opening = True
        self._pending.append(request)
        device_id = request.device_id or self._fallback_device
        self._verify(request.auth_token).addCallbacks(lambda _: self._open_session(device_id), self._refused)

    def _open_session(self, device_id):
        self._cancel_auth_timer()
        if self._closing or self._gone:
            return
        device_id = self._claims.device_id or device_id or "default"
        d = defer.Deferred.fromCoroutine(self.gateway.open_session(self, self._claims, self._token, device_id))
        d.addCallbacks(self._session_opened, self._session_failed)

    def _session_opened(self, session):
        self.session = session
        self._opening = False
        if self._gone:
            session.closed_by_transport()
            return
        pending, self._pending = self._pending, []
        replay(session, pending)

    def _session_failed(self, failure):
        self._opening = False
        close_after_failed_open(self, failure, self.log)

    def _bad_message(self, error):
        if self.session is None:
            if not self._opening:
                self.close(CloseCode.UNAUTHENTICATED, f"the first message must carry auth_token ({error})")
            return
        self.session.send_error(grpc.StatusCode.INVALID_ARGUMENT, str(error))

    def _cancel_auth_timer(self):
        if self._auth_timer is not None and self._auth_timer.active():
            self._auth_timer.cancel()
        self._auth_timer = None

    # ------------------------------------------------------------ ISessionTransport

    def send_event(self, event):
        if not self._closing:
            self.edge.handoff.put(self._stream, event.SerializeToString())

    def send_encoded(self, encoded):
        if not self._closing:
            self.edge.handoff.put(self._stream, encoded.frame(FRAME_KEY, _serialized))

    def ping(self):
        """HTTP/2 keepalive (grpc.keepalive_time_ms) probes the connection; nothing to send."""

    def close(self, code, reason):
        if not self._closing and not self._gone:
            self._closing = True
            self.gateway.counts.connection_closing(self, code)
            self._cancel_auth_timer()
            self.edge.handoff.put(self._stream, _End(code, reason))

    def abort(self):
        """End the stream now, whatever waits to be written (a drain past its deadline)."""
        if not self._gone:
            self._closing = True
            self.edge.handoff.put(self._stream, _End(CloseCode.GOING_AWAY, "gateway stopped", now=True))


class GrpcEdge(service.Service):
    """The grpc.aio server on GRPC_PORT, in a thread with its own asyncio loop."""

    log = Logger()
    sleep = staticmethod(asyncio.sleep)  # how a reader waits for its budget (tests: their clock)

    def __init__(self, gateway, reactor, port, interface="", checks=None):
        self.setName("grpc")
        self.gateway = gateway
        self.reactor = reactor
        self.config = gateway.config
        self.requested_port = port
        self.interface = interface
        self.port = None  # the bound port, once started
        self.devices = set()  # GrpcDevice of every live stream (reactor thread)
        self.stopping = False
        self.handoff = None
        self._checks = dict(checks or {})
        self._loop = None
        self._server = None
        self._health = None
        self._serving = None
        self._thread = None
        self._thread_ended = defer.Deferred()  # fires once the loop thread is done (after a stop)
        self._finished = None  # asyncio.Event set when the server has stopped
        self._health_loop = task.LoopingCall(self._update_health)
        self._health_loop.clock = gateway.clock

    # ------------------------------------------------------------ service (reactor thread)

    def startService(self):
        super().startService()
        started = concurrent.futures.Future()
        self._thread = threading.Thread(target=self._run, args=(started,), name="grpc-edge", daemon=True)
        self._thread.start()
        # The only wait on the reactor thread: binding the port, at startup, so a
        # port that cannot be bound fails the start like the HTTP listener does.
        self.port = started.result(timeout=STARTUP_TIMEOUT_SEC)
        self.handoff = _Handoff(self._loop)
        host = self.interface or "0.0.0.0"
        self.log.info("grpc listening on {host}:{port}", host=host, port=self.port)
        self.gateway.addresses.append(f"grpc://{host}:{self.port}")
        self._health_loop.start(HEALTH_INTERVAL_SEC, now=True)

    def stopService(self):
        super().stopService()
        self.stopping = True
        if self._health_loop.running:
            self._health_loop.stop()
        if self._loop is None or self._server is None or self._thread_ended.called:
            return defer.succeed(None)
        # The Gateway, stopping beside this service (MultiService stops its children
        # together), drains the streams that have a session like every other: 1001
        # once their commands in flight are answered. Streams still authenticating
        # end now. The server takes no new RPC and waits (up to DRAIN_TIMEOUT_SEC)
        # for the others; the closes reach the loop first (both call_soon_threadsafe).
        for device in list(self.devices):
            if device.session is None:
                device.close(CloseCode.GOING_AWAY, "gateway shutting down")
        asyncio.run_coroutine_threadsafe(self._shutdown(self.config.drain_timeout_sec), self._loop)
        return self._thread_ended

    def _update_health(self):
        d = defer.Deferred.fromCoroutine(readiness.dependency_states(self._checks))

        def update(states):
            serving = readiness.is_ready(states) and not self.stopping
            if serving != self._serving and self._loop is not None and not self.stopping:
                self._serving = serving
                status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
                asyncio.run_coroutine_threadsafe(self._set_health(status), self._loop)

        d.addCallback(update)
        d.addErrback(lambda f: self.log.failure("gRPC health update failed", f))
        return d

    # ------------------------------------------------------------ the loop thread

    def _run(self, started):
        loop = asyncio.new_event_loop()
        asyncio.set_event_loop(loop)
        self._loop = loop
        try:
            loop.run_until_complete(self._serve(started))
        except BaseException as e:  # noqa: BLE001 - reported to startService when it is still waiting
            if not started.done():
                started.set_exception(e)
            else:
                self.reactor.callFromThread(self.log.error, "gRPC edge loop ended: {error!r}", error=e)
        finally:
            loop.close()
            if started.done() and started.exception() is None:
                self.reactor.callFromThread(self._thread_ended.callback, None)

    async def _serve(self, started):
        config = self.config
        keepalive_ms = int(max(config.heartbeat_interval_sec, 10.0) * 1000)
        server = grpc.aio.server(
            options=[
                ("grpc.max_receive_message_length", config.max_message_bytes),
                ("grpc.keepalive_time_ms", keepalive_ms),
                ("grpc.keepalive_timeout_ms", 20000),
                ("grpc.keepalive_permit_without_calls", 1),
                ("grpc.http2.min_recv_ping_interval_without_data_ms", 5000),
                # grpcio's default, stated: worker processes (--workers) share GRPC_PORT.
                ("grpc.so_reuseport", 1),
            ]
        )
        handlers = {"Connect": grpc.stream_stream_rpc_method_handler(self._connect)}  # bytes in, bytes out
        for name, (request_cls, response_cls, streaming) in METHODS.items():
            make = grpc.unary_stream_rpc_method_handler if streaming else grpc.unary_unary_rpc_method_handler
            handlers[name] = make(
                self._streaming(name) if streaming else self._unary(name),
                request_deserializer=request_cls.FromString,
                response_serializer=response_cls.SerializeToString,
            )
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
        self._health = health.aio.HealthServicer()
        for name in ("", SERVICE):
            await self._health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
        health_pb2_grpc.add_HealthServicer_to_server(self._health, server)
        reflection.enable_server_reflection((SERVICE, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
        host = f"[{self.interface}]" if ":" in self.interface else (self.interface or "0.0.0.0")
        address = f"{host}:{self.requested_port}"
        try:
            port = server.add_insecure_port(address)
        except RuntimeError as e:
            raise OSError(f"cannot listen on {address} (gRPC): {e}") from None
        if not port:
            raise OSError(f"cannot listen on {address} (gRPC)")
        await server.start()
        self._server = server
        self._finished = asyncio.Event()
        started.set_result(port)
        await self._finished.wait()

    async def _set_health(self, status):
        for name in ("", SERVICE):
            await self._health.set(name, status)

    async def _shutdown(self, grace):
        try:
            await self._health.enter_graceful_shutdown()
            await self._server.stop(grace)
        finally:
            self._finished.set()  # _serve returns: the loop and its thread end

    # ------------------------------------------------------------ Connect (loop thread)

    async def _connect(self, request_iterator, context):
        metadata = _metadata(context)
        stream = _Stream(self.config.send_buffer_bytes, self.gateway.counts)
        device = GrpcDevice(self, stream, metadata.get("x-device-id", ""))
        self.reactor.callFromThread(device.start, forwarding.bearer_token(metadata.get("authorization")))
        config = self.config
        # The reactor's clock: its seconds() is safe to read from this thread.
        budget = InboundBudget(
            config.max_frames_per_second, config.max_bytes_per_second, self.gateway.clock, config.over_budget_close_sec
        )
        reader = asyncio.ensure_future(self._read(request_iterator, device, stream, budget))
        try:
            end = await stream.write_all(context)
        finally:
            reader.cancel()
            self.reactor.callFromThread(device.gone)
        context.set_trailing_metadata(((CLOSE_CODE_KEY, str(end.code)),))
        code = CLOSE_STATUS.get(end.code, grpc.StatusCode.UNKNOWN)
        if code != grpc.StatusCode.OK:
            context.set_code(code)
            context.set_details(end.reason)

    async def _read(self, request_iterator, device, stream, budget):
        try:
            async for raw in request_iterator:
                budget.frames -= 1
                budget.spend_bytes(len(raw))
                try:
                    item = codec.decode_request(raw, True, codec.PROTO)
                except codec.FrameError as e:
                    item = e
                self.reactor.callFromThread(device.received, item)
                await stream.received()
                if budget.over:
                    delay = budget.pause()
                    if budget.persistent:
                        self.reactor.callFromThread(device.over_budget, budget.reason())
                    await self.sleep(delay)  # not read meanwhile: HTTP/2 flow control holds the device back
                    budget.resume()
        except asyncio.CancelledError:
            raise
        except Exception as e:  # noqa: BLE001 - the RPC broke (grpc ends it with its own status)
            self.reactor.callFromThread(self.log.debug, "gRPC stream read ended: {error!r}", error=e)
            return
        self.reactor.callFromThread(device.half_closed)

    # ------------------------------------------------------------ forwarded methods (loop thread)

    def _unary(self, method):
        async def handle(request, context):
            return await self._forward(method, request, context)

        handle.__name__ = method
        return handle

    def _streaming(self, method):
        async def handle(request, context):
            for page in await self._forward(method, request, context):
                await context.write(page)

        handle.__name__ = method
        return handle

    async def _forward(self, method, request, context):
        metadata = _metadata(context)
        future = concurrent.futures.Future()
        # The deadline counts from here, not from when the reactor gets to the call.
        arrived, remaining = self.gateway.clock.seconds(), context.time_remaining()
        self.reactor.callFromThread(self._forward_on_reactor, future, method, request, metadata, arrived, remaining)
        try:
            return await asyncio.wrap_future(future)
        except CoreError as e:
            error = e
        except Exception as e:  # noqa: BLE001 - never a stack trace to the caller
            self.reactor.callFromThread(self.log.error, "forwarding {method} failed: {error!r}", method=method, error=e)
            error = CoreError(grpc.StatusCode.INTERNAL, "internal error")
        trailing = ((STATUS_DETAILS_KEY, error.status_details),) if error.status_details else ()
        await context.abort(error.code, error.message, trailing_metadata=trailing)

    def _forward_on_reactor(self, future, method, request, metadata, arrived, remaining):
        if not future.set_running_or_notify_cancel():
            return  # the caller went away before the call started
        d = defer.Deferred.fromCoroutine(
            forwarding.forward(
                self.gateway,
                method,
                request,
                forwarding.bearer_token(metadata.get("authorization")),
                device_id=metadata.get("x-device-id", ""),
                traceparent=metadata.get("traceparent"),
                tracestate=metadata.get("tracestate"),
                timeout=remaining,
                arrived=arrived,
            )
        )
        d.addCallbacks(future.set_result, lambda failure: future.set_exception(failure.value))
