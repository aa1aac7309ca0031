"""Load generator: WebSocket devices on raw sockets that stop reading (slow consumers).

Runs in its own process. Each device opens a TCP connection with a small receive
buffer, completes the handshake (token in the Authorization header), reads its
``connected`` frame, then reads nothing more. Talks to the driver over
stdin/stdout, one line each:

    -> READY <n>            every device has its `connected` frame
    <- COLLECT              read every socket until its close frame (or EOF, or --collect-timeout)
    -> RESULT {"codes": {"4429": n, ...}, "frames": n, "bytes": n}

    python tests/support/slowclients.py --host 127.0.0.1 --port 8080 --secret S --count 200
"""

import argparse
import json
import selectors
import socket
import struct
import sys
import time

from chatgateway.auth.devtokens import mint_token
from support import rawwebsocket
from support.rawwebsocket import frame_header, upgrade_request


def handshake(host, port, token, rcvbuf, timeout):
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)  # before connect: a small window
    sock.settimeout(timeout)
    sock.connect((host, port))
    request = upgrade_request(f"{host}:{port}", "/ws", "chat.v1.proto", {"Authorization": f"Bearer {token}"})
    rest = rawwebsocket.handshake(sock, request)
    reader = FrameReader()
    reader.feed(rest)
    while not reader.frames:
        chunk = sock.recv(4096)
        if not chunk:
            raise RuntimeError("closed before connected")
        reader.feed(chunk)
    return sock, reader


class FrameReader:
    """Parses server frames (unmasked), keeping only counts and the close code."""

    def __init__(self):
        self.buffer = b""
        self.skip = 0  # payload bytes of the current frame still to discard
        self.frames = 0
        self.bytes = 0
        self.close_code = None

    def feed(self, data):
        self.bytes += len(data)
        if self.skip:
            taken = min(self.skip, len(data))
            self.skip -= taken
            data = data[taken:]
        self.buffer += data
        while not self.skip and self.close_code is None:
            b = self.buffer
            header = frame_header(b)
            if header is None:
                return
            opcode, at, length = header
            if opcode == 8:
                if len(b) < at + length:
                    return
                payload = b[at : at + length]
                self.close_code = struct.unpack("!H", payload[:2])[0] if length >= 2 else 1005
                self.buffer = b""
                return
            self.frames += 1
            available = len(b) - at
            if available >= length:
                self.buffer = b[at + length :]
            else:
                self.skip = length - available
                self.buffer = b""


def collect(devices, timeout):
    selector = selectors.DefaultSelector()
    for sock, reader in devices:
        sock.setblocking(False)
        selector.register(sock, selectors.EVENT_READ, reader)
    deadline = time.monotonic() + timeout
    open_count = len(devices)
    while open_count and time.monotonic() < deadline:
        for key, _ in selector.select(timeout=0.5):
            reader = key.data
            try:
                chunk = key.fileobj.recv(262144)
            except (BlockingIOError, InterruptedError):
                continue
            except OSError:
                chunk = b""
            if chunk:
                reader.feed(chunk)
            if not chunk or reader.close_code is not None:
                if reader.close_code is None:
                    reader.close_code = "eof"
                selector.unregister(key.fileobj)
                open_count -= 1
    codes = {}
    for _, reader in devices:
        code = str(reader.close_code) if reader.close_code is not None else "open"
        codes[code] = codes.get(code, 0) + 1
    return {
        "codes": codes,
        "frames": sum(r.frames for _, r in devices),
        "bytes": sum(r.bytes for _, r in devices),
    }


def main(argv):
    parser = argparse.ArgumentParser()
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--secret", required=True)
    parser.add_argument("--audience", default="service_chat_gateway")
    parser.add_argument("--count", type=int, default=200)
    parser.add_argument("--prefix", default="slow")
    parser.add_argument("--rcvbuf", type=int, default=4096)
    parser.add_argument("--collect-timeout", type=float, default=60)
    args = parser.parse_args(argv)
    devices = []
    for i in range(args.count):
        token = mint_token(args.secret, f"{args.prefix}{i}", device_id="d", audience=args.audience, ttl=3600)
        devices.append(handshake(args.host, args.port, token, args.rcvbuf, timeout=30))
    print(f"READY {len(devices)}", flush=True)
    for line in sys.stdin:
        if line.strip() == "COLLECT":
            print("RESULT " + json.dumps(collect(devices, args.collect_timeout)), flush=True)
            break
    for sock, _ in devices:
        sock.close()


if __name__ == "__main__":
    main(sys.argv[1:])
