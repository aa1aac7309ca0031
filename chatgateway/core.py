"""Client of the core chat service: the one module that speaks gRPC to the core.

grpcio stubs block, so every call runs on a bounded thread pool of this
client's own, with a deadline (CORE_TIMEOUT_SEC). When every thread is busy and
the queue is full, a call fails at once with RESOURCE_EXHAUSTED rather than
queueing without bound.
"""

import grpc
from twisted.internet import defer
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.threadpool import ThreadPool

from chatgateway.api import chat_pb2 as pb

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

# How many calls may wait for a thread, per thread, before new calls are refused.
QUEUE_PER_THREAD = 4


class CoreError(Exception):
    """A failed call, with the gRPC status the core (or the transport) gave."""

    def __init__(self, code, message, meta=None):
        super().__init__(message)
        self.code = code  # grpc.StatusCode
        self.message = message
        self.meta = dict(meta or {})

    def detail(self):
        return pb.ErrorDetail(
            code=self.code.value[0], status=self.code.name, message=self.message, meta=self.meta
        )


class CoreClient:
    """Calls the core's ChatService methods with a device's token."""

    log = Logger()

    def __init__(self, target, reactor, timeout, threads, gateway_id):
        self._target = target
        self._reactor = reactor
        self._timeout = timeout
        self._gateway_id = gateway_id
        self._pool = ThreadPool(minthreads=0, maxthreads=threads, name="core-client")
        self._limit = threads * (1 + QUEUE_PER_THREAD)
        self._in_flight = 0
        self._channel = None
        self._callables = {}

    def start(self):
        # The target may be known only at start (the in-process core's port).
        target = self._target() if callable(self._target) else self._target
        self._channel = grpc.insecure_channel(target)
        for name, (request_cls, response_cls, streaming) in METHODS.items():
            make = self._channel.unary_stream if streaming else self._channel.unary_unary
            self._callables[name] = make(
                f"/{SERVICE}/{name}",
                request_serializer=request_cls.SerializeToString,
                response_deserializer=response_cls.FromString,
            )
        self._pool.start()

    def stop(self):
        """Wait for calls in flight (each bounded by its deadline), then close."""
        channel, self._channel = self._channel, None

        def shutdown():
            self._pool.stop()
            if channel is not None:
                channel.close()

        return deferToThreadPool(self._reactor, self._reactor.getThreadPool(), shutdown)

    @property
    def in_flight(self):
        return self._in_flight

    def call(self, method, request, token, device_id=""):
        """Deferred firing with the response (a list of responses when streaming).

        Fails with CoreError carrying the core's status code.
        """
        if method not in METHODS:
            return defer.fail(CoreError(grpc.StatusCode.UNIMPLEMENTED, f"unknown method {method!r}"))
        if self._channel is None:
            return defer.fail(CoreError(grpc.StatusCode.UNAVAILABLE, "core client is stopped"))
        if self._in_flight >= self._limit:
            return defer.fail(
                CoreError(grpc.StatusCode.RESOURCE_EXHAUSTED, "too many calls to the core in flight")
            )
        metadata = [("authorization", f"Bearer {token}"), ("x-gateway-id", self._gateway_id)]
        if device_id:
            metadata.append(("x-device-id", device_id))
        streaming = METHODS[method][2]
        stub = self._callables[method]
        timeout = self._timeout

        def blocking():
            try:
                if streaming:
                    return list(stub(request, timeout=timeout, metadata=metadata))
                return stub(request, timeout=timeout, metadata=metadata)
            except grpc.RpcError as e:
                raise CoreError(e.code(), e.details() or e.code().name) from None

        self._in_flight += 1
        d = deferToThreadPool(self._reactor, self._pool, blocking)

        def done(result):
            self._in_flight -= 1
            return result

        return d.addBoth(done)

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
