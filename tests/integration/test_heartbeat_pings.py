"""The heartbeat's pings on a real connection: a real `twistd chatgateway`, a scripted
core, and a device on a plain socket that reads the bytes the gateway sends.

The sweep writes its ping frame to the socket itself (chatgateway.edge.websocket.PING_FRAME),
not through Autobahn: here we check that what arrives is a well-formed ping, every
interval, and that a device answering with pongs stays connected past the timeout.
"""

import itertools
import socket
import time

from chatgateway.api import chat_pb2 as pb
from chatgateway.auth.devtokens import mint_token
from support.fakecore import FakeCore
from support.processes import one_gateway
from support.rawwebsocket import upgrade_request

SECRET = "heartbeat-test-secret-0123456789abcdef0123"


def read_frame(sock, buffer):
    """(opcode, payload, rest of buffer) of the next server frame (unmasked, short)."""
    while True:
        if len(buffer) >= 2:
            length = buffer[1] & 0x7F
            head = 2
            if length == 126 and len(buffer) >= 4:
                length, head = int.from_bytes(buffer[2:4], "big"), 4
            if length < 126 or head == 4:
                if len(buffer) >= head + length:
                    return buffer[0] & 0x0F, buffer[head : head + length], buffer[head + length :]
        data = sock.recv(65536)
        assert data, "the gateway closed the connection"
        buffer += data


def test_the_heartbeat_pings_each_interval_and_a_device_that_answers_stays(tmp_path):
    core = FakeCore()
    core.answers["SearchRooms"] = lambda request, context: [pb.SearchRoomsResponse(data=[pb.Room(id="r1")])]
    gateway = one_gateway(tmp_path, core, SECRET, HEARTBEAT_INTERVAL_SEC=1, CONNECTION_TIMEOUT_SEC=3)
    gateway.start()
    sock = socket.create_connection(("127.0.0.1", gateway.port), timeout=10)
    try:
        token = mint_token(SECRET, "alice", audience="service_chat_gateway")
        sock.sendall(
            upgrade_request(f"127.0.0.1:{gateway.port}", "/ws", "chat.v1.proto", {"Authorization": f"Bearer {token}"})
        )
        response = b""
        while b"\r\n\r\n" not in response:
            response += sock.recv(65536)
        head, _, buffer = response.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 101"), head
        opcode, payload, buffer = read_frame(sock, buffer)
        assert opcode == 2 and pb.ServerEvent.FromString(payload).WhichOneof("payload") == "connected"

        pings = []
        started = time.monotonic()
        while time.monotonic() - started < 5:  # past CONNECTION_TIMEOUT_SEC: only the pongs keep it
            opcode, payload, buffer = read_frame(sock, buffer)
            assert opcode == 9, f"unexpected frame, opcode {opcode}"
            pings.append(time.monotonic())
            sock.sendall(b"\x8a\x80\x00\x00\x00\x00")  # a masked pong, empty payload
        assert len(pings) >= 3
        assert max(b - a for a, b in itertools.pairwise(pings)) < 2.5  # one per interval, not one per timeout
    finally:
        sock.close()
        gateway.stop()
        core.stop()
