"""The gRPC reference for bench/grpc_vs_ws.py: a bare grpc.aio room fan-out.

The gRPC counterpart of bench/reference_server.py: no auth, no sessions, no limits, no
reactor and no thread hop. A grpc.aio server on the main thread's asyncio loop serves
``chat.v1.ChatService/Connect`` (bytes in, bytes out): every stream gets one small
first message (standing in for ``connected``), then every message PUBLISHed on
chat:room:* (redis.asyncio on the same loop), forwarded as it came. Each stream writes
what waits for it in order with ``context.write``, the one way grpc.aio sends a
message; a stream wakes on a bare future when something arrives. What grpc.aio costs
per message here is the floor of any gRPC edge built on it.

    python bench/grpc_reference_server.py --port 50051 --redis redis://127.0.0.1:6379/0
"""

import argparse
import asyncio
import collections
import sys

import grpc
import redis.asyncio as aioredis

HELLO = b"\x0a\x09connected"  # a ServerEvent with id "connected"


def _identity(data):
    return data


class Stream:
    __slots__ = ("frames", "waiter")

    def __init__(self):
        self.frames = collections.deque()
        self.waiter = None

    def push(self, frame):
        self.frames.append(frame)
        waiter = self.waiter
        if waiter is not None:
            self.waiter = None
            if not waiter.done():
                waiter.set_result(None)


class Reference:
    def __init__(self):
        self.streams = set()

    async def connect(self, request_iterator, context):
        stream = Stream()
        self.streams.add(stream)
        loop = asyncio.get_running_loop()
        try:
            await context.write(HELLO)
            while True:
                if stream.frames:
                    await context.write(stream.frames.popleft())
                else:
                    stream.waiter = loop.create_future()
                    await stream.waiter
        finally:
            self.streams.discard(stream)

    async def subscribe(self, url):
        client = aioredis.Redis.from_url(url)
        pubsub = client.pubsub()
        await pubsub.psubscribe("chat:room:*")
        async for message in pubsub.listen():
            if message["type"] == "pmessage":
                data = message["data"]
                for stream in self.streams:
                    stream.push(data)


async def main(argv):
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--redis", required=True)
    args = parser.parse_args(argv)
    reference = Reference()
    server = grpc.aio.server()
    handler = grpc.stream_stream_rpc_method_handler(
        reference.connect, request_deserializer=_identity, response_serializer=_identity
    )
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler("chat.v1.ChatService", {"Connect": handler}),)
    )
    server.add_insecure_port(f"127.0.0.1:{args.port}")
    await server.start()
    print("listening", flush=True)
    await reference.subscribe(args.redis)


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1:]))
