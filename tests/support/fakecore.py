"""A scriptable core in the test process: a grpcio server whose answers the test chooses.

Every call's invocation metadata is recorded. Behaviours per method name:
``answers[method] = callable(request, context) -> response`` (a list of responses
for SearchRooms); ``slow`` seconds of sleep before any answer. Unscripted methods
answer UNIMPLEMENTED.
"""

import threading
import time
from concurrent import futures

import grpc

from chatgateway.core.client import METHODS, SERVICE


class FakeCore:
    def __init__(self, port=0, slow=0.0):
        self.slow = slow
        self.answers = {}
        self.calls = []  # (method, request, {metadata key: value})
        self._lock = threading.Lock()
        self._server = grpc.server(futures.ThreadPoolExecutor(max_workers=32, thread_name_prefix="fakecore"))
        handlers = {}
        for name, (request_cls, response_cls, streaming) in METHODS.items():
            make = grpc.unary_stream_rpc_method_handler if streaming else grpc.unary_unary_rpc_method_handler
            handlers[name] = make(
                self._handler(name, streaming),
                request_deserializer=request_cls.FromString,
                response_serializer=response_cls.SerializeToString,
            )
        self._server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
        self.port = self._server.add_insecure_port(f"127.0.0.1:{port}")
        self._server.start()

    @property
    def target(self):
        return f"127.0.0.1:{self.port}"

    def _handler(self, name, streaming):
        def handle(request, context):
            with self._lock:
                self.calls.append((name, request, dict(context.invocation_metadata())))
            if self.slow:
                time.sleep(self.slow)
            answer = self.answers.get(name)
            if answer is None:
                context.abort(grpc.StatusCode.UNIMPLEMENTED, f"{name} is not scripted")
            result = answer(request, context)
            if streaming:
                return iter(result)
            return result

        return handle

    def metadata(self, method):
        """The metadata of the last call of ``method``."""
        with self._lock:
            for name, _, metadata in reversed(self.calls):
                if name == method:
                    return metadata
        raise AssertionError(f"{method} was not called")

    def stop(self):
        self._server.stop(0).wait()
