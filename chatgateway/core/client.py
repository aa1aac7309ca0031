"""Client of the core chat service: the one module that speaks gRPC to the core.

grpcio stubs block, so every call runs on a bounded set of threads of this
client's own (chatgateway.core.blockingcalls). Up to CORE_THREADS x (1 +
QUEUE_PER_THREAD) calls are handed to the threads; the next ones wait here,
oldest first, for a place - at most CORE_THREADS x WAITING_PER_THREAD of them.
Beyond that bound a call fails at once with RESOURCE_EXHAUSTED rather than
queueing without bound.

Deadlines. Every call has one absolute deadline, fixed when the device's
request arrived: CORE_TIMEOUT_SEC from then, or the caller's own when it is
sooner. Whatever the call is doing at its deadline, it is answered then:

- waiting here, or handed to the threads but not yet taken by one: failed with
  DEADLINE_EXCEEDED by one timer (chatgateway.core.calls.Deadlines) set for the earliest deadline of
  them all, on the reactor; the core is never asked, the breaker not told;
- taken by a thread: the thread gives grpc what is left of the deadline (and
  skips a call whose deadline has passed), so grpc ends it then.

A thread and the timer may reach a call at the same moment: a lock decides
which (a call is either started or answered DEADLINE_EXCEEDED, never both).

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
through; a DEADLINE_EXCEEDED counts only when the call had at least half of
CORE_TIMEOUT_SEC at the core (JUDGED_SHARE). The core's status code, message
and rich details (``grpc-status-details-bin``) come back unchanged in CoreError.
"""

import collections
import re
import threading
import time
from typing import Any

import grpc
import grpc.experimental
from google.protobuf.message import Message
from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from chatgateway.api import chat_pb2 as pb
from chatgateway.core import ICoreClient
from chatgateway.core import breaker as circuit
from chatgateway.core.blockingcalls import BlockingCalls
from chatgateway.core.calls import ENDED, RUNNING, SKIPPED, STARTING, WAITING, Call, Deadlines

SERVICE = "chat.v1.ChatService"

# method name -> (request class, response class, server-streaming)
# name: (request class, response class, server-streaming)
METHODS: dict[str, tuple[type[Message], type[Message], bool]] = {
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
# A DEADLINE_EXCEEDED counts against the core (its breaker) only when the call had at
# least this share of CORE_TIMEOUT_SEC there: one that spent its deadline waiting for a
# thread, or that had a caller's short deadline, says nothing about the core.
JUDGED_SHARE = 0.5

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
# grpc's connectivity poller (behind channel_ready_future) notices that nobody watches any
# more within its 0.2 s watch deadline; a channel closed before then makes it die with
# "Cannot invoke RPC: Channel closed!" on its thread. stop() lets it end first.
POLLER_LINGER_SEC = 0.25

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
        return pb.ErrorDetail(code=self.code.value[0], status=self.code.name, message=self.message, meta=self.meta)


def _core_error(rpc_error):
    code = rpc_error.code() or grpc.StatusCode.UNKNOWN
    details = None
    trailing = getattr(rpc_error, "trailing_metadata", None)
    for key, value in (trailing() if trailing else None) or ():
        if key == STATUS_DETAILS_KEY:
            details = value
    return CoreError(code, rpc_error.details() or code.name, status_details=details)


@implementer(ICoreClient)
class CoreClient:
    """Calls the core's ChatService methods with a device's token."""

    log = Logger()

    def __init__(
        self,
        target,
        reactor,
        timeout,
        threads,
        gateway_id,
        breaker=None,
        service_token=None,
        clock=None,
        pool=None,
        channel=None,
    ):
        self._target = target
        # Tests may give the threads (BlockingCalls' start/call/stop) and the channel (its
        # unary_unary/unary_stream/close) to drive the client on a task.Clock.
        self._given_channel = channel
        self._reactor = reactor
        self._timeout = timeout
        self._gateway_id = gateway_id
        self._clock = clock if clock is not None else reactor
        self._pool = pool if pool is not None else BlockingCalls(reactor, threads, "core-client")
        self._threads = threads
        self._limit = threads * (1 + QUEUE_PER_THREAD)
        self._in_flight = 0  # calls with a place in the pool, until the pool hands them back
        self._max_waiting = threads * WAITING_PER_THREAD
        self._queue = collections.deque()  # of _Call waiting for a place, oldest first (and ended ones)
        self._waiting = 0  # calls in _queue still waiting
        self._starting = False
        self._claim = threading.Lock()  # a call's move out of STARTING: by a thread, or at its deadline
        self._deadlines = Deadlines(self._clock, self._expire)
        self._channel = None
        self._callables = {}
        self.breaker = breaker if breaker is not None else circuit.CircuitBreaker(self._clock)
        self._service_token = service_token  # ClientCredentials, or None
        self._pings = threading.Condition()  # guards the two below (ping threads, the stop's thread)
        self._pings_running = 0
        self._pinged_at = None  # time.monotonic() when the last readiness ping ended

    def start(self) -> None:
        if self._given_channel is not None:
            self._channel = self._given_channel
        else:
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

    def stop(self) -> Deferred[None]:
        """Wait for calls in flight (each bounded by its deadline), then close."""
        channel, self._channel = self._channel, None
        if self._service_token is not None:
            self._service_token.stop()
        queue, self._queue = self._queue, collections.deque()
        self._waiting = 0
        for call in queue:
            if call.state is WAITING:
                call.state = ENDED
                self._answer(call, Failure(CoreError(grpc.StatusCode.UNAVAILABLE, "core client is stopped")))

        def shutdown():
            self._pool.stop()
            if channel is not None:
                self._await_pings()
                channel.close()

        return deferToThreadPool(self._reactor, self._reactor.getThreadPool(), shutdown)

    @property
    def in_flight(self):
        return self._in_flight

    @property
    def waiting(self):
        return self._waiting

    def call(
        self,
        method: str,
        request: Any,
        token: str,
        device_id: str = "",
        traceparent: str | None = None,
        tracestate: str | None = None,
        timeout: float | None = None,
    ) -> Deferred[Any]:
        """Deferred firing with the response (a list of responses when streaming).

        ``timeout`` (seconds) is what is left of the caller's own deadline, e.g. one
        fixed when its request arrived (chatgateway.sessions.forwarding); the call's deadline is
        that or CORE_TIMEOUT_SEC from now, whichever is sooner. Fails with CoreError
        carrying the core's status code.
        """
        if method not in METHODS:
            return defer.fail(CoreError(grpc.StatusCode.UNIMPLEMENTED, f"unknown method {method!r}"))
        if self._channel is None:
            return defer.fail(CoreError(grpc.StatusCode.UNAVAILABLE, "core client is stopped"))
        full = self._in_flight >= self._limit or self._waiting
        if full and self._waiting >= self._max_waiting:
            return defer.fail(CoreError(grpc.StatusCode.RESOURCE_EXHAUSTED, "too many calls to the core in flight"))
        if timeout is not None and timeout <= 0:
            return defer.fail(CoreError(grpc.StatusCode.DEADLINE_EXCEEDED, "deadline exceeded before the call"))
        expires = self._clock.seconds() + (self._timeout if timeout is None else min(self._timeout, timeout))
        metadata = [("authorization", f"Bearer {token}"), ("x-gateway-id", self._gateway_id)]
        if device_id:
            metadata.append(("x-device-id", device_id))
        metadata.extend(trace_metadata(traceparent, tracestate))
        call = Call(method, request, metadata, expires)
        if full and self.breaker.state != circuit.OPEN:  # an open circuit refuses at once, waiting or not
            call.state = WAITING
            self._queue.append(call)
            self._waiting += 1
            self._watch(call)
        else:
            self._start(call)
        return call.d

    def _watch(self, call):
        self._deadlines.add(call, self._waiting + self._in_flight)

    def _start(self, call):
        """Give the call a place in the pool (the breaker permitting)."""
        if not self.breaker.allow():
            call.state = ENDED
            message = f"core unavailable (circuit open; retry in {self.breaker.retry_after():.1f}s)"
            self._answer(call, Failure(CoreError(grpc.StatusCode.UNAVAILABLE, message)))
            return
        self._in_flight += 1
        call.state = STARTING
        if self._in_flight > self._threads:
            self._watch(call)  # it queues behind busy threads
        d = defer.Deferred.fromCoroutine(self._run(call))
        d.addBoth(self._ran, call)

    async def _run(self, call):
        """The pool's result for the call: a response, a Failure, or SKIPPED."""
        if self._service_token is not None:
            pending = self._service_token.token()
            if not pending.called:
                self._watch(call)
            try:
                service_token = await pending
            except Exception as e:
                return Failure(CoreError(grpc.StatusCode.UNAVAILABLE, f"the gateway has no service token: {e}"))
            if call.state is not STARTING:
                return SKIPPED  # its deadline came while the token was fetched
            call.metadata.append(("x-service-authorization", f"Bearer {service_token}"))
        try:
            return await self._pool.call(self._blocking, call)
        except BaseException:
            return Failure()

    def _blocking(self, call):
        """On a pool thread: the core's answer, with what is left of the deadline."""
        with self._claim:
            if call.state is not STARTING:
                return SKIPPED
            timeout = call.expires - self._clock.seconds()
            if timeout <= 0:
                return SKIPPED
            call.state = RUNNING
        call.timeout = timeout
        stub = self._callables[call.method]
        try:
            if METHODS[call.method][2]:
                return list(stub(call.request, timeout=timeout, metadata=call.metadata))
            return stub(call.request, timeout=timeout, metadata=call.metadata)
        except grpc.RpcError as e:
            raise _core_error(e) from None
        except ValueError as e:  # e.g. the channel was closed while the call waited for a thread
            raise CoreError(grpc.StatusCode.UNAVAILABLE, f"core client: {e}") from None

    def _ran(self, result, call):
        """The pool handed the call back: answer it (unless answered at its deadline), free its place."""
        self._in_flight -= 1
        if result is SKIPPED:
            self._expire(call)
        elif call.state is RUNNING:
            call.state = ENDED
            self._judge(call, result)
            self._answer(call, result)
        elif call.state is STARTING:  # no service token, or no pool: it never got to a thread
            call.state = ENDED
            self.breaker.released()
            self._answer(call, result)
        self._start_waiting()

    def _judge(self, call, result):
        """Tell the breaker what the answer says about the core."""
        if not isinstance(result, Failure):
            self.breaker.succeeded()
        elif not result.check(CoreError):
            self.breaker.released()
        elif result.value.code == grpc.StatusCode.DEADLINE_EXCEEDED and call.timeout < JUDGED_SHARE * self._timeout:
            self.breaker.released()  # too little time at the core to tell anything about it
        elif result.value.code in TRANSPORT_FAILURES:
            self.breaker.failed()
        else:
            self.breaker.succeeded()

    def _expire(self, call):
        """The call's deadline came before a thread took it: DEADLINE_EXCEEDED, the core never asked."""
        if call.state is WAITING:
            call.state = ENDED
            self._waiting -= 1
            # Ended calls stay in the queue until they reach its front; drop them when most are.
            if len(self._queue) > 2 * self._waiting + Deadlines.COMPACT_ABOVE:
                self._queue = collections.deque(c for c in self._queue if c.state is WAITING)
        elif call.state is STARTING:
            with self._claim:
                if call.state is not STARTING:
                    return  # a thread took it just now: grpc's deadline ends it
                call.state = ENDED
            self.breaker.released()  # allow() was asked when it got its place
        else:
            return
        call.state = ENDED
        self._answer(
            call, Failure(CoreError(grpc.StatusCode.DEADLINE_EXCEEDED, "deadline exceeded waiting to call the core"))
        )

    def _answer(self, call, result):
        if call.d.called:
            return  # the caller gave up on it (cancelled)
        if isinstance(result, Failure):
            call.d.errback(result)
        else:
            call.d.callback(result)

    def _start_waiting(self):
        if self._starting:
            return  # a call that ended at once, inside the loop below: the loop goes on
        self._starting = True
        try:
            while self._queue and self._in_flight < self._limit:
                call = self._queue.popleft()
                if call.state is not WAITING:
                    continue  # answered at its deadline
                if call.expires <= self._clock.seconds():
                    self._expire(call)  # its timer is a moment late
                    continue
                self._waiting -= 1
                self._start(call)
        finally:
            self._starting = False

    def ping(self, timeout=1.0):
        """Deferred firing True when the core's channel connects within timeout."""
        if self._channel is None:
            return defer.succeed(False)
        channel = self._channel

        def blocking():
            with self._pings:
                self._pings_running += 1
            ready = grpc.channel_ready_future(channel)
            try:
                ready.result(timeout=timeout)
                return True
            except grpc.FutureTimeoutError:
                return False
            finally:
                ready.cancel()  # unsubscribes: a timed-out one would keep grpc's poller watching
                with self._pings:
                    self._pings_running -= 1
                    self._pinged_at = time.monotonic()
                    self._pings.notify_all()

        return deferToThreadPool(self._reactor, self._reactor.getThreadPool(), blocking)

    def _await_pings(self, timeout=2.0):
        """In stop's thread: the readiness pings ended and grpc's poller had time to see it."""
        with self._pings:
            self._pings.wait_for(lambda: self._pings_running == 0, timeout)
            pinged_at = self._pinged_at
        if pinged_at is not None:
            linger = pinged_at + POLLER_LINGER_SEC - time.monotonic()
            if linger > 0:
                time.sleep(linger)

    def readiness(self) -> Deferred[str]:
        """Deferred of the core's state for /readyz: "up", "down", or the open circuit."""
        state = self.breaker.state
        if state != circuit.CLOSED:
            return defer.succeed(f"circuit {state}")
        return self.ping().addCallback(lambda up: "up" if up else "down")
