"""A device on a StringTransport, in unit tests: raw WebSocket frames in, the gateway's
frames out, with nothing read unless the test says so (a device that never reads)."""

import json
import struct

from support.rawwebsocket import split_frames
from support.wsharness import accept

UPGRADE = (
    "GET /ws HTTP/1.1\r\nHost: gw\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
    "Sec-WebSocket-Protocol: chat.v1.json\r\nAuthorization: Bearer {token}\r\n\r\n"
)


def masked(payload, opcode=0x1):
    n = len(payload)
    header = bytes([0x80 | opcode, 0x80 | n]) if n < 126 else bytes([0x80 | opcode, 0x80 | 126]) + struct.pack("!H", n)
    return header + b"\0\0\0\0" + payload


PING = masked(b"", opcode=0x9)
MALFORMED = masked(b'{"ack": ')


class Device:
    """A device on a StringTransport: raw frames in, the gateway's frames out."""

    def __init__(self, h, token="alice/phone"):
        self.h = h
        self.protocol, self.transport = accept(h.factory)
        self.protocol.dataReceived(UPGRADE.format(token=token).encode())
        head, _, self._out = self.transport.value().partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 101")
        self.transport.clear()
        self.frames = []
        self._read()
        assert "connected" in json.loads(self.frames[0][1])
        self.frames.clear()

    def send(self, data):
        self.protocol.dataReceived(data)
        self._read()

    def advance(self, seconds):
        self.h.clock.advance(seconds)
        self._read()

    def run_for(self, seconds, step=0.05):
        """Let time pass in steps, as a reactor would (a resume may schedule the next)."""
        for _ in range(round(seconds / step)):
            self.advance(step)

    def _read(self):
        data = self._out + self.transport.value()
        self.transport.clear()
        received, self._out = split_frames(data)
        self.frames.extend(received)

    def count(self, opcode):
        return sum(1 for op, _ in self.frames if op == opcode)

    def errors(self):
        return [json.loads(p)["error"] for op, p in self.frames if op == 0x1 and "error" in json.loads(p)]

    @property
    def close(self):
        closes = [(struct.unpack("!H", p[:2])[0], p[2:].decode()) for op, p in self.frames if op == 0x8]
        return closes[0] if closes else None

    @property
    def paused(self):
        return self.transport.producerState == "paused"
