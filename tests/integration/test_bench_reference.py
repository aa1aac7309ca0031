"""The bench's bare reference server and the gateway deliver the same messages to the same clients."""

import subprocess
import sys

import grpc
import pytest_twisted
from autobahn.twisted.websocket import WebSocketClientFactory, WebSocketClientProtocol
from twisted.internet import defer, endpoints, reactor

from chatgateway.api import chat_pb2 as pb
from chatgateway.api import chat_pb2_grpc, codec
from chatgateway.auth.devtokens import mint_token
from chatgateway.client.wsclient import GatewayClient
from support.chat import wait_until
from support.processes import REPO_ROOT, Twistd, free_port

SECRET = "bench-reference-test-secret-0123456789abc"


class Recorder(WebSocketClientProtocol):
    def onOpen(self):
        self.factory.opened.callback(self)

    def onMessage(self, payload, isBinary):
        self.factory.received.append(payload)


async def reference_client(port, room):
    factory = WebSocketClientFactory(f"ws://127.0.0.1:{port}/?room={room}")
    factory.protocol = Recorder
    factory.opened, factory.received = defer.Deferred(), []
    await endpoints.TCP4ClientEndpoint(reactor, "127.0.0.1", port).connect(factory)
    return await factory.opened


def event(room, i):
    message = pb.RoomEvent(id=f"e{i}", room_id=room, sender_id="core", type=pb.RoomEvent.TEXT)
    message.payload.update({"text": f"message {i}"})
    return pb.ServerEvent(id=f"e{i}", message=message).SerializeToString()


@pytest_twisted.ensureDeferred
async def test_reference_and_gateway_deliver_the_same_messages(redis_server, tmp_path):
    room = "bench-room"
    env = {"JWT_SECRET": SECRET, "CACHE_URI": redis_server.uri}
    core_port, gateway_port, reference_port = free_port(), free_port(), free_port()
    core = Twistd("chatcore", ["--port", core_port], env=env, port=core_port, log_dir=tmp_path).start()
    gateway = Twistd(
        "chatgateway",
        ["--workers", "1"],
        port=gateway_port,
        log_dir=tmp_path,
        env={
            **env,
            "HTTP_PORT": str(gateway_port),
            "HTTP_INTERFACE": "127.0.0.1",
            "GRPC_PORT": str(free_port()),
            "CHAT_SERVICE_URI": f"127.0.0.1:{core_port}",
            # presenceEvents on the room's channel would reach the reference's clients too
            "PRESENCE_MAX_ROOM_SIZE": "0",
        },
    ).start()
    reference = subprocess.Popen(
        [
            sys.executable,
            str(REPO_ROOT / "bench" / "reference_server.py"),
            "--port",
            str(reference_port),
            "--redis",
            redis_server.uri,
        ],
        cwd=REPO_ROOT,
        stdout=subprocess.PIPE,
    )
    try:
        assert reference.stdout.readline().strip() == b"listening"
        members = [f"member{i}" for i in range(3)]
        with grpc.insecure_channel(f"127.0.0.1:{core_port}") as channel:
            owner = mint_token(SECRET, "owner", audience="service_chat_gateway")
            chat_pb2_grpc.ChatServiceStub(channel).CreateRoom(
                pb.CreateRoomRequest(id=room, name=room, member_ids=members),
                metadata=[("authorization", f"Bearer {owner}")],
                timeout=10,
            )
        devices = [
            await GatewayClient.connect(
                f"ws://127.0.0.1:{gateway_port}/ws",
                mint_token(SECRET, m, audience="service_chat_gateway"),
                subprotocol=codec.PROTO,
            )
            for m in members
        ]
        for device in devices:
            await device.next_event("connected")
        bare = [await reference_client(reference_port, room) for _ in members]
        await wait_until(lambda: redis_server.client().execute_command("PUBSUB", "NUMPAT") >= 1, timeout=15)

        r = redis_server.client(decode_responses=False)
        published = [event(room, i) for i in range(10)]
        for payload in published:
            r.publish(f"chat:room:{room}", payload)

        for device in devices:
            got = [await device.next_event("message", lambda e: e.message.type == pb.RoomEvent.TEXT) for _ in published]
            assert [e.SerializeToString() for e in got] == published
        await wait_until(lambda: all(len(b.factory.received) == len(published) for b in bare), timeout=15)
        for b in bare:
            assert b.factory.received == published
        for device in devices:
            await device.close()
    finally:
        reference.terminate()
        reference.wait(10)
        gateway.stop()
        core.stop()
