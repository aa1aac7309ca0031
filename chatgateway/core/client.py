"""Client of the core chat service: the one module that speaks gRPC to the core.

grpcio stubs block, so every call runs on a bounded set of threads of this
client's own (chatgateway.core.blockingcalls), with a deadline (CORE_TIMEOUT_SEC,
or the caller's own deadline when it is shorter). Up to CORE_THREADS x (1 + QUEUE_PER_THREAD) calls are
handed to the pool; the next ones wait here, oldest first, for a place - at
most CORE_THREADS x WAITING_PER_THREAD of them - and their deadline counts
from the call: one that runs out while waiting fails with DEADLINE_EXCEEDED
(the core never asked, the breaker not told), one that gets a place goes to
the core with what is left of it. Beyond that bound a call fails at once with
RESOURCE_EXHAUSTED rather than queueing without bound.

Why wait rather than refuse at once: in a connect storm the calls are the
devices' memberships (SearchRooms). A device refused is closed with 1013 and
comes back, paying its handshake and token check again, when all it needed
was to wait a moment for a thread; the wait is bounded in count and by the
deadline, so a core that really cannot keep up still gets the storm's
excess answered within CORE_TIMEOUT_SEC.

Every call carries the device's token as ``authorization``, ``x-gateway-id``,
``x-device-id`` when known, the caller's W3C ``traceparent``/``tracestate`` when
given, and the gateway's own client-credentials token as
``x-service-authorization`` when configured (chatgateway.auth.clientcredentials).

A circuit breaker (chatgateway.core.breaker) watches the answers: after
CORE_BREAKER_FAILURES consecutive UNAVAILABLE/DEADLINE_EXCEEDED it fails calls
at once with UNAVAILABLE for CORE_BREAKER_COOLDOWN_SEC, then lets one probe
through. The core's status code, message and rich details
(``grpc-status-details-bin``) come back unchanged in CoreError.
"""

import collections
import re

import grpc
import grpc.experimental
from twisted.internet import defer
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger

from chatgateway.core import breaker as circuit
from chatgateway.api import chat_pb2 as pb
from chatgateway.core.blockingcalls import BlockingCalls

SERVICE = "chat.v1.ChatService"

# method name -> (request class, response class, server-streaming)
METHODS = {
    "SendEvent": (pb.SendEventRequest, pb.SendEventResponse, False),
    "GetHistory": (pb.GetHistoryRequest, pb.GetHistoryResponse, False),
    "CreateRoom": (pb.CreateRoomRequest, pb.CreateRoomResponse, False),
    "SearchRooms": (pb.SearchRoomsRequest, pb.SearchRoomsResponse, True),
    "UpdateRoom": (pb.UpdateRoomRequest, pb.UpdateRoomResponse, False),
    "DeleteRoom": (pb.DeleteRoomRequest, pb.DeleteRoomResponse, False),
    "AddRoomSubscriptions": (pb.AddRoomSubscriptionsRequest, pb.AddRoomSubscriptionsResponse, False),
    "RemoveRoomSubscriptions": (pb.RemoveRoomSubscriptionsRequest, pb.RemoveRoomSubscriptionsResponse, False),
    "UpdateSubscriptionRole": (pb.UpdateSubscriptionRoleRequest, pb.UpdateSubscriptionRoleResponse, False),
    "SearchRoomSubscriptions": (pb.SearchRoomSubscriptionsRequest, pb.SearchRoomSubscriptionsResponse, False),
}

# Calls handed to the pool to wait for a thread there, per thread.
QUEUE_PER_THREAD = 4
# Calls waiting here for a place in the pool, per thread, before new calls are refused.
WAITING_PER_THREAD = 50

# Answers that say the core is not there (they count towards opening the circuit).
TRANSPORT_FAILURES = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED})

CHANNEL_OPTIONS = [
    # Reconnect quickly once the core is back (grpcio's default backoff grows to 120 s).
    ("grpc.initial_reconnect_backoff_ms", 250),
    ("grpc.min_reconnect_backoff_ms", 250),
    ("grpc.max_reconnect_backoff_ms", 2000),
    # A streaming call (SearchRooms, on every connect) is driven by the pool thread that
    # waits for it, not by a channel thread per call handing it each message: fewer
    # threads contending for the GIL with the reactor.
    (grpc.experimental.ChannelOptions.SingleThreadedUnaryStream, 1),
]

STATUS_DETAILS_KEY = "grpc-status-details-bin"

# W3C Trace Context, version 00 (and forward-compatible later versions).
_TRACEPARENT = re.compile(r"\A[0-9a-f]{2}-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}(-.*)?\Z")
_TRACESTATE_MAX = 512


def trace_metadata(traceparent, tracestate=None):
    """The trace-context metadata to pass on; an invalid traceparent is dropped (with its tracestate)."""
    if not traceparent or not isinstance(traceparent, str):
        return []
    traceparent = traceparent.strip().lower()
    if not _TRACEPARENT.match(traceparent) or traceparent.startswith("ff-"):
        return []
    if traceparent[3:35] == "0" * 32 or traceparent[36:52] == "0" * 16:
        return []
    metadata = [("traceparent", traceparent)]
    if tracestate and isinstance(tracestate, str) and len(tracestate) <= _TRACESTATE_MAX and tracestate.isascii():
        metadata.append(("tracestate", tracestate.strip()))
    return metadata


class CoreError(Exception):
    """A failed call, with the gRPC status the core (or the transport) gave."""

    def __init__(self, code, message, meta=None, status_details=None):
        super().__init__(message)
        self.code = code  # grpc.StatusCode
        self.message = message
        self.meta = dict(meta or {})
        self.status_details = status_details  # grpc-status-details-bin (a google.rpc.Status), if any

    def detail(self):
        return pb.ErrorDetail(
            code=self.code.value[0], status=self.code.name, message=self.message, meta=self.meta
        )


class _Waiting:
    """A call waiting for a place in the pool."""

    __slots__ = ("d", "call", "expires", "timer")

    def __init__(self, d, call, expires):
        self.d = d
        self.call = call  # (method, request, metadata)
        self.expires = expires
        self.timer = None


def _core_error(rpc_error):
    code = rpc_error.code() or grpc.StatusCode.UNKNOWN
    details = None
    trailing = getattr(rpc_error, "trailing_metadata", None)
    for key, value in (trailing() if trailing else None) or ():
        if key == STATUS_DETAILS_KEY:
            details = value
    return CoreError(code, rpc_error.details() or code.name, status_details=details)


class CoreClient:
    """Calls the core's ChatService methods with a device's token."""

    log = Logger()

    def __init__(
        self, target, reactor, timeout, threads, gateway_id, breaker=None, service_token=None, clock=None
    ):
        self._target = target
        self._reactor = reactor
        self._timeout = timeout
        self._gateway_id = gateway_id
        self._clock = clock if clock is not None else reactor
        self._pool = BlockingCalls(reactor, threads, "core-client")
        self._limit = threads * (1 + QUEUE_PER_THREAD)
        self._in_flight = 0
        self._max_waiting = threads * WAITING_PER_THREAD
        self._waiting = collections.deque()  # of _Waiting, oldest first
        self._starting = False
        self._channel = None
        self._callables = {}
        self.breaker = breaker if breaker is not None else circuit.CircuitBreaker(self._clock)
        self._service_token = service_token  # ClientCredentials, or None

    def start(self):
        # The target may be known only at start (the in-process core's port).
        target = self._target() if callable(self._target) else self._target
        self._channel = grpc.insecure_channel(target, options=CHANNEL_OPTIONS)
        for name, (request_cls, response_cls, streaming) in METHODS.items():
            make = self._channel.unary_stream if streaming else self._channel.unary_unary
            self._callables[name] = make(
                f"/{SERVICE}/{name}",
                request_serializer=request_cls.SerializeToString,
                response_deserializer=response_cls.FromString,
            )
        self._pool.start()
        if self._service_token is not None:
            self._service_token.start()

    def stop(self):
        """Wait for calls in flight (each bounded by its deadline), then close."""
        channel, self._channel = self._channel, None
        if self._service_token is not None:
            self._service_token.stop()
        waiting, self._waiting = self._waiting, collections.deque()
        for waiter in waiting:
            waiter.timer.cancel()
            waiter.d.errback(CoreError(grpc.StatusCode.UNAVAILABLE, "core client is stopped"))

        def shutdown():
            self._pool.stop()
            if channel is not None:
                channel.close()

        return deferToThreadPool(self._reactor, self._reactor.getThreadPool(), shutdown)

    @property
    def in_flight(self):
        return self._in_flight

    @property
    def waiting(self):
        return len(self._waiting)

    def call(self, method, request, token, device_id="", traceparent=None, tracestate=None, timeout=None):
        """Deferred firing with the response (a list of responses when streaming).

        ``timeout`` (seconds) shortens the deadline below CORE_TIMEOUT_SEC, e.g. to
        the caller's own deadline. Fails with CoreError carrying the core's status code.
        """
        if method not in METHODS:
            return defer.fail(CoreError(grpc.StatusCode.UNIMPLEMENTED, f"unknown method {method!r}"))
        if self._channel is None:
            return defer.fail(CoreError(grpc.StatusCode.UNAVAILABLE, "core client is stopped"))
        full = self._in_flight >= self._limit or self._waiting
        if full and len(self._waiting) >= self._max_waiting:
            return defer.fail(
                CoreError(grpc.StatusCode.RESOURCE_EXHAUSTED, "too many calls to the core in flight")
            )
        if timeout is not None and timeout <= 0:
            return defer.fail(CoreError(grpc.StatusCode.DEADLINE_EXCEEDED, "deadline exceeded before the call"))
        metadata = [("authorization", f"Bearer {token}"), ("x-gateway-id", self._gateway_id)]
        if device_id:
            metadata.append(("x-device-id", device_id))
        metadata.extend(trace_metadata(traceparent, tracestate))
        deadline = self._timeout if timeout is None else min(self._timeout, timeout)
        if full and self.breaker.state != circuit.OPEN:  # an open circuit refuses at once, waiting or not
            return self._wait((method, request, metadata), self._clock.seconds() + deadline)
        return self._start(method, request, metadata, deadline, shortened=deadline < self._timeout)

    def _start(self, method, request, metadata, deadline, shortened):
        """Hand the call to the pool; ``shortened``: its deadline is less than CORE_TIMEOUT_SEC."""
        if not self.breaker.allow():
            return defer.fail(
                CoreError(
                    grpc.StatusCode.UNAVAILABLE,
                    f"core unavailable (circuit open; retry in {self.breaker.retry_after():.1f}s)",
                )
            )
        self._in_flight += 1
        d = defer.Deferred.fromCoroutine(self._call(method, request, metadata, deadline, shortened))
        return d.addBoth(self._done)

    def _done(self, result):
        self._in_flight -= 1
        self._start_waiting()
        return result

    def _start_waiting(self):
        if self._starting:
            return  # a call that ended at once, inside the loop below: the loop goes on
        self._starting = True
        try:
            while self._waiting and self._in_flight < self._limit:
                waiter = self._waiting.popleft()
                waiter.timer.cancel()
                # What is left of its deadline; a DEADLINE_EXCEEDED then says less about the core.
                deadline = max(0.001, waiter.expires - self._clock.seconds())
                self._start(*waiter.call, deadline, shortened=True).chainDeferred(waiter.d)
        finally:
            self._starting = False

    def _wait(self, call, expires):
        waiter = _Waiting(defer.Deferred(), call, expires)
        waiter.timer = self._clock.callLater(max(0.0, expires - self._clock.seconds()), self._expired, waiter)
        self._waiting.append(waiter)
        return waiter.d

    def _expired(self, waiter):
        self._waiting.remove(waiter)
        # Never sent: the breaker learns nothing (allow() was not asked).
        waiter.d.errback(CoreError(grpc.StatusCode.DEADLINE_EXCEEDED, "deadline exceeded waiting to call the core"))

    async def _call(self, method, request, metadata, deadline, shortened):
        if self._service_token is not None:
            try:
                service_token = await self._service_token.token()
            except Exception as e:
                self.breaker.released()
                raise CoreError(grpc.StatusCode.UNAVAILABLE, f"the gateway has no service token: {e}") from None
            metadata.append(("x-service-authorization", f"Bearer {service_token}"))
        streaming = METHODS[method][2]
        stub = self._callables[method]

        def blocking():
            try:
                if streaming:
                    return list(stub(request, timeout=deadline, metadata=metadata))
                return stub(request, timeout=deadline, metadata=metadata)
            except grpc.RpcError as e:
                raise _core_error(e) from None
            except ValueError as e:  # e.g. the channel was closed while the call waited for a thread
                raise CoreError(grpc.StatusCode.UNAVAILABLE, f"core client: {e}") from None

        try:
            response = await self._pool.call(blocking)
        except CoreError as e:
            if e.code == grpc.StatusCode.DEADLINE_EXCEEDED and shortened:
                self.breaker.released()  # a deadline shorter than CORE_TIMEOUT_SEC: nothing learned about the core
            elif e.code in TRANSPORT_FAILURES:
                self.breaker.failed()
            else:
                self.breaker.succeeded()
            raise
        except BaseException:
            self.breaker.released()
            raise
        self.breaker.succeeded()
        return response

    def ping(self, timeout=1.0):
        """Deferred firing True when the core's channel connects within timeout."""
        if self._channel is None:
            return defer.succeed(False)
        channel = self._channel

        def blocking():
            try:
                grpc.channel_ready_future(channel).result(timeout=timeout)
                return True
            except grpc.FutureTimeoutError:
                return False

        return deferToThreadPool(self._reactor, self._reactor.getThreadPool(), blocking)

    def readiness(self):
        """Deferred of the core's state for /readyz: "up", "down", or the open circuit."""
        state = self.breaker.state
        if state != circuit.CLOSED:
            return defer.succeed(f"circuit {state}")
        return self.ping().addCallback(lambda up: "up" if up else "down")
