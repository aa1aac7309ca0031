"""Behind, not out, with real processes: redis-server, `twistd chatcore`, a `twistd chatgateway`
with a small SEND_BUFFER_BYTES, and a device on a raw socket with a small receive buffer
that stops reading while its room gets megabytes of messages. It is not closed: it falls
behind, and when it reads again it gets every message once, in order, then live ones."""

import socket

import pytest
import pytest_twisted
from twisted.internet.threads import deferToThread

from chatgateway.api import chat_pb2 as pb
from chatgateway.api import codec
from chatgateway.auth.devtokens import mint_token
from chatgateway.client.wsclient import GatewayClient
from support import rawwebsocket
from support.chat import unique, wait_until
from support.processes import Twistd, free_port
from support.redis import RedisServer
from support.scrape import catchup_reads

SECRET = "behind-test-secret-0123456789abcdef01234"
MESSAGES = 400
TEXT = "x" * 8000  # 400 x 8 kB: more than the kernel's buffers and SEND_BUFFER_BYTES hold


def token(profile, device="d"):
    return mint_token(SECRET, profile, device_id=device, audience="service_chat_gateway")


@pytest.fixture
def deployment():
    redis = RedisServer()
    core_port, port = free_port(), free_port()
    env = {"JWT_SECRET": SECRET, "CACHE_URI": redis.uri, "OAUTH2_ISSUER": "", "LOG_LEVEL": "info"}
    core = Twistd("chatcore", ["--port", core_port], env=env, port=core_port)
    gateway = Twistd(
        "chatgateway",
        ["--workers", "1"],
        env={
            **env,
            "CHAT_SERVICE_URI": f"127.0.0.1:{core_port}",
            "HTTP_PORT": str(port),
            "GRPC_PORT": str(free_port()),
            "HTTP_INTERFACE": "127.0.0.1",
            "GATEWAY_ID": "gw-behind",
            "MAX_EVENTS_PER_SECOND": "10000",
            "SEND_BUFFER_BYTES": "65536",
            "BEHIND_DRAIN_SEC": "120",
        },
        port=port,
    )
    core.start()
    gateway.start()
    yield gateway
    gateway.stop()
    core.stop()
    redis.cleanup()


class SlowDevice:
    """A WebSocket device (chat.v1.proto) on a blocking socket that reads only when told to."""

    def __init__(self, port, profile):
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # before connect: a small window
        self.sock.settimeout(10)
        self.sock.connect(("127.0.0.1", port))
        request = rawwebsocket.upgrade_request(
            f"127.0.0.1:{port}", "/ws", codec.PROTO, {"Authorization": f"Bearer {token(profile)}"}
        )
        self.buffer = rawwebsocket.handshake(self.sock, request)
        self.events = []
        self.closed = None
        self.read_until(lambda: any(e.HasField("connected") for e in self.events))

    def read_until(self, done, timeout=30):
        """Read (blocking; call it off the reactor) until ``done()`` or the timeout."""
        self.sock.settimeout(timeout)
        while not done() and self.closed is None:
            chunk = self.sock.recv(262144)
            if not chunk:
                self.closed = "eof"
                break
            frames, self.buffer = rawwebsocket.split_frames(self.buffer + chunk)
            for opcode, payload in frames:
                if opcode == 2:
                    self.events.append(codec.decode_event(payload, True))
                elif opcode == 8:
                    self.closed = int.from_bytes(payload[:2], "big")

    def messages(self, room_id):
        return [
            (e.id, e.epoch, e.offset) for e in self.events if e.HasField("message") and e.message.room_id == room_id
        ]

    def close(self):
        self.sock.close()


@pytest_twisted.ensureDeferred
async def test_a_device_that_stops_reading_falls_behind_and_gets_every_message_once_when_it_reads_again(
    deployment,
):
    gateway = deployment
    owner_id, slow_id = unique("owner"), unique("slow")
    owner = await GatewayClient.connect(f"ws://127.0.0.1:{gateway.port}/ws", token(owner_id))
    await owner.next_event("connected")
    room = (await owner.call("CreateRoom", pb.CreateRoomRequest(name="behind", member_ids=[slow_id]))).room
    slow = await deferToThread(SlowDevice, gateway.port, slow_id)  # then reads nothing

    sent = []
    for i in range(MESSAGES):
        sent.append((await owner.send_message(room.id, f"{i} {TEXT}")).id)
    await wait_until(lambda: catchup_reads(gateway.port)["behind"] >= 1, 20)

    last = await owner.send_message(room.id, "live again")
    await deferToThread(slow.read_until, lambda: last.id in [m[0] for m in slow.messages(room.id)], 60)
    assert slow.closed is None  # behind, not out
    ids = [m[0] for m in slow.messages(room.id)]
    ours = [i for i in ids if i in set(sent) | {last.id}]
    assert ours == sent + [last.id]  # every message once, in order
    offsets = [m[2] for m in slow.messages(room.id)]
    assert offsets == list(range(offsets[0], offsets[0] + len(offsets)))
    assert not [e for e in slow.events if e.HasField("error") or e.HasField("gap")]
    assert catchup_reads(gateway.port)["stream"] >= 1  # it caught up from the room's stream
    slow.close()
    await owner.close()
