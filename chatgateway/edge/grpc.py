"""The gRPC edge on GRPC_PORT: chat.v1.ChatService over HTTP/2 (docs/protocol.md#calling-the-api).

``Connect`` is a bidirectional stream with the WebSocket session's semantics:
the same Session (chatgateway.sessions.session) decides everything, GrpcDevice
(chatgateway.edge.grpcstream) is its transport, as DeviceProtocol is for
WebSocket. The ten forwarded methods are plain unary (SearchRooms:
server-streaming) RPCs proxied to the core through the gateway's CoreClient.
grpc.health.v1 and server reflection are served too.

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
  event once for all gRPC recipients - and puts it through its Outbox, under
  the WebSocket edge's per-kind slow-consumer policy; what the Outbox releases
  goes into the edge's hand-off, and one ``loop.call_soon_threadsafe`` per
  batch moves every queued item to its stream's writer coroutine, which writes
  them in order.
- unary calls: the handler coroutine asks the reactor to run the call
  (``callFromThread``) and awaits a ``concurrent.futures.Future`` the reactor's
  Deferred fills, through ``asyncio.wrap_future``.

Outbox bound: at most SEND_BUFFER_BYTES of serialized events per stream, those
handed to the writer and not yet written included, beyond what HTTP/2 flow
control already holds in grpc's buffers (about 4 MB); more is a slow consumer,
ended with RESOURCE_EXHAUSTED (close code 4429).

Close codes become gRPC statuses of the same meaning (CLOSE_STATUS); the exact
code also travels in the trailing metadata ``chat-close-code``. Heartbeats: the
gateway's sweep calls ``ping``, a no-op here (HTTP/2 keepalive pings detect dead
peers); a device must still send a StreamRequest (an empty one will do) at
least every CONNECTION_TIMEOUT_SEC, or its stream ends as 4408 does.
"""

import asyncio
import concurrent.futures
import threading

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from twisted.application import service
from twisted.internet import defer, task
from twisted.logger import Logger

from chatgateway.api import codec
from chatgateway.core.client import METHODS, SERVICE, STATUS_DETAILS_KEY, CoreError
from chatgateway.edge.grpcstream import CLOSE_CODE_KEY, CLOSE_STATUS, GrpcDevice, Handoff, StreamWriter
from chatgateway.sessions import forwarding
from chatgateway.sessions.opening import bearer_token
from chatgateway.sessions.ratelimit import InboundBudget
from chatgateway.sessions.session import CloseCode
from chatgateway.telemetry import readiness

# How often grpc.health.v1 is brought in line with the dependencies of /readyz.
HEALTH_INTERVAL_SEC = 2.0
# The longest startService waits for the port to be bound.
STARTUP_TIMEOUT_SEC = 15.0


def _metadata(context):
    """Invocation metadata as {key: first value}."""
    values = {}
    for key, value in context.invocation_metadata() or ():
        values.setdefault(key.lower(), value)
    return values


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
                device.close(CloseCode.GOING_AWAY, self.gateway.reconnect_hint())
        asyncio.run_coroutine_threadsafe(self._shutdown(self.config.drain_timeout_sec), self._loop)
        return self._thread_ended

    def _update_health(self):
        d = defer.Deferred.fromCoroutine(readiness.dependency_states(self._checks))

        def update(states):
            serving = readiness.is_ready(states) and not self.stopping
            if serving != self._serving and self._loop is not None and not self.stopping:
                self._serving = serving
                status = (
                    health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
                )
                asyncio.run_coroutine_threadsafe(self._set_health(status), self._loop)

        d.addCallback(update)
        d.addErrback(lambda f: self.log.failure("gRPC health update failed", f))
        return d

    # ------------------------------------------------------------ the loop thread

    def _run(self, started):
        loop = asyncio.new_event_loop()
        asyncio.set_event_loop(loop)
        self._loop = loop
        self.handoff = Handoff(loop)  # before the server starts: a stream's device takes it at once
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
        stream = StreamWriter()
        device = GrpcDevice(self, stream, metadata.get("x-device-id", ""), metadata.get("x-resume-token", ""))
        self.reactor.callFromThread(device.start, bearer_token(metadata.get("authorization")))
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
                bearer_token(metadata.get("authorization")),
                device_id=metadata.get("x-device-id", ""),
                traceparent=metadata.get("traceparent"),
                tracestate=metadata.get("tracestate"),
                timeout=remaining,
                arrived=arrived,
            )
        )
        d.addCallbacks(future.set_result, lambda failure: future.set_exception(failure.value))
