"""A thin WebSocket client connection for load processes (tests and bench/).

Thin so a load process is not the bottleneck: the opening handshake is written by
hand, and received frames are walked by their headers (server frames are unmasked)
and handed over as (opcode, buffer, start, length) without copying. Pings are
answered with masked pongs (zero mask); a close frame closes the TCP connection.
Subclasses implement ``upgraded()``, ``binary(buffer, start, length)``,
``refused(status)`` and, when they care, ``closed_by_server(code)``; a refusal's
response head is in ``response_head`` (its headers, e.g. Retry-After), a close frame's
reason in ``close_reason``.
"""

import base64
import os

from twisted.internet import protocol


def upgrade_request(host, path, subprotocol=None, headers=None):
    """The bytes of a WebSocket opening handshake."""
    return (
        f"GET {path} HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        f"Sec-WebSocket-Key: {base64.b64encode(os.urandom(16)).decode()}\r\nSec-WebSocket-Version: 13\r\n"
        + (f"Sec-WebSocket-Protocol: {subprotocol}\r\n" if subprotocol else "")
        + "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items())
        + "\r\n"
    ).encode()


def handshake(sock, request):
    """Send an opening handshake on a blocking socket; the bytes that followed the 101's headers."""
    sock.sendall(request)
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(4096)
        if not chunk:
            raise RuntimeError("closed during the handshake")
        data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    status = head.split(b"\r\n")[0]
    if b" 101 " not in status:
        raise RuntimeError(f"handshake refused: {status.decode(errors='replace')}")
    return rest


def frame_header(buffer, i=0):
    """(opcode, start, length) of the server frame (unmasked) at ``buffer[i:]``, or None while
    its header is incomplete; its payload is ``buffer[start:start + length]`` once that much is in."""
    n = len(buffer) - i
    if n < 2:
        return None
    opcode, length, head = buffer[i] & 0x0F, buffer[i + 1] & 0x7F, 2
    if length == 126:
        if n < 4:
            return None
        length, head = int.from_bytes(buffer[i + 2 : i + 4], "big"), 4
    elif length == 127:
        if n < 10:
            return None
        length, head = int.from_bytes(buffer[i + 2 : i + 10], "big"), 10
    return opcode, i + head, length


def split_frames(buffer):
    """([(opcode, payload), ...] of the whole server frames at the start of ``buffer``, the rest)."""
    frames, i = [], 0
    while (header := frame_header(buffer, i)) is not None:
        opcode, start, length = header
        if len(buffer) < start + length:
            break
        frames.append((opcode, buffer[start : start + length]))
        i = start + length
    return frames, buffer[i:]


class RawWebSocket(protocol.Protocol):
    def __init__(self, request):
        self.request = request
        self.buffer = b""
        self.upgraded_yet = False
        self.response_head = b""  # the refused handshake's status line and headers
        self.close_reason = ""  # the reason of the server's close frame

    def connectionMade(self):
        self.transport.write(self.request)

    def dataReceived(self, data):
        buffer = self.buffer + data
        if not self.upgraded_yet:
            end = buffer.find(b"\r\n\r\n")
            if end < 0:
                self.buffer = buffer
                return
            status = buffer[: buffer.find(b"\r\n")]
            if b" 101 " not in status:
                self.response_head = buffer[:end]
                self.refused(status.decode(errors="replace"))
                self.transport.loseConnection()
                return
            self.upgraded_yet = True
            buffer = buffer[end + 4 :]
            self.upgraded()
        self.buffer = self._frames(buffer)

    def _frames(self, buffer):
        i, n = 0, len(buffer)
        while (header := frame_header(buffer, i)) is not None:
            opcode, start, length = header
            if n < start + length:
                break
            if opcode == 2:
                self.binary(buffer, start, length)
            elif opcode == 9:  # ping: a masked pong (zero mask) with the same payload
                self.transport.write(bytes([0x8A, 0x80 | length]) + b"\0\0\0\0" + buffer[start : start + length])
            elif opcode == 8:
                self.close_reason = buffer[start + 2 : start + length].decode("utf-8", "replace")
                self.closed_by_server(int.from_bytes(buffer[start : start + 2], "big") if length >= 2 else 1005)
                self.transport.loseConnection()
            i = start + length
        return buffer[i:]

    def upgraded(self):
        """The server answered 101."""

    def binary(self, buffer, start, length):
        """A binary frame: its payload is buffer[start:start + length]."""

    def refused(self, status):
        """The server answered the handshake with ``status`` (not 101)."""

    def closed_by_server(self, code):
        """A close frame with ``code`` (1005: none) arrived."""
