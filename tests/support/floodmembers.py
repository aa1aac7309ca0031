"""Load generator: many WebSocket members of one room that read everything (chat.v1.proto).

Runs in its own process. Deliberately thin so it is not the bottleneck: the
handshake is written by hand and frames are walked by their headers; each binary
frame is parsed as a ServerEvent to tell messages (ids are numbers, or a marker
word) from DATA_LOSS errors. Talks to the driver over stdin/stdout, one line each:

    -> READY <n>            every device received its `connected` frame
    <- REPORT               -> REPORT {"open": n, "messages": n, "out_of_order": n, "told": n,
                                       "notices": n, "marked": {"word": n}, "closes": {"4429": n}}
    <- EXIT

    python tests/support/floodmembers.py --port 8080 --secret S --count 300
"""

import argparse
import base64
import json
import os
import sys

from twisted.internet import defer, endpoints, protocol, stdio, task
from twisted.protocols.basic import LineReceiver

from chatgateway.api import chat_pb2 as pb
from chatgateway.auth import mint_token


class Member(protocol.Protocol):
    """One device: counts messages, order violations and DATA_LOSS notices."""

    def __init__(self, host, token, opened):
        self.request = (
            f"GET /ws HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            f"Sec-WebSocket-Key: {base64.b64encode(os.urandom(16)).decode()}\r\nSec-WebSocket-Version: 13\r\n"
            f"Sec-WebSocket-Protocol: chat.v1.proto\r\nAuthorization: Bearer {token}\r\n\r\n"
        ).encode()
        self.opened = opened
        self.buffer = b""
        self.upgraded = False
        self.messages = 0
        self.last = -1  # the highest numbered message so far
        self.out_of_order = 0
        self.notices = 0
        self.marks = set()
        self.close_code = None

    def connectionMade(self):
        self.transport.write(self.request)

    def dataReceived(self, data):
        buffer = self.buffer + data
        if not self.upgraded:
            end = buffer.find(b"\r\n\r\n")
            if end < 0:
                self.buffer = buffer
                return
            if b" 101 " not in buffer[: buffer.find(b"\r\n")]:
                self.opened.errback(RuntimeError(buffer[: buffer.find(b"\r\n")].decode(errors="replace")))
                self.transport.loseConnection()
                return
            self.upgraded = True
            buffer = buffer[end + 4 :]
        self.buffer = self._frames(buffer)

    def _frames(self, buffer):
        i, n = 0, len(buffer)
        while n - i >= 2:
            opcode = buffer[i] & 0x0F
            length = buffer[i + 1] & 0x7F
            head = 2
            if length == 126:
                if n - i < 4:
                    break
                length, head = int.from_bytes(buffer[i + 2 : i + 4], "big"), 4
            elif length == 127:
                if n - i < 10:
                    break
                length, head = int.from_bytes(buffer[i + 2 : i + 10], "big"), 10
            if n - i < head + length:
                break
            start = i + head
            payload = buffer[start : start + length]
            if opcode == 2:
                self._event(pb.ServerEvent.FromString(payload))
            elif opcode == 9:  # ping: a masked pong (zero mask) with the same payload
                self.transport.write(bytes([0x8A, 0x80 | length]) + b"\0\0\0\0" + payload)
            elif opcode == 8:
                self.close_code = int.from_bytes(payload[:2], "big") if length >= 2 else 1005
                self.transport.loseConnection()
            i = start + length
        return buffer[i:]

    def _event(self, event):
        kind = event.WhichOneof("payload")
        if kind == "connected":
            if not self.opened.called:
                self.opened.callback(self)
        elif kind == "error" and event.error.status == "DATA_LOSS":
            self.notices += 1
        elif kind == "message":
            if event.id.isdigit():
                self.messages += 1
                number = int(event.id)
                if number <= self.last:
                    self.out_of_order += 1
                self.last = max(self.last, number)
            else:
                self.marks.add(event.id)

    def connectionLost(self, reason):
        if self.close_code is None:
            self.close_code = 1006
        if not self.opened.called:
            self.opened.errback(RuntimeError(f"closed before connected: {reason.getErrorMessage()}"))


class Control(LineReceiver):
    delimiter = b"\n"

    def __init__(self, members, done):
        self.members, self.done = members, done

    def lineReceived(self, line):
        command = line.decode().strip()
        if command == "REPORT":
            self.sendLine(b"REPORT " + json.dumps(report(self.members)).encode())
        elif command == "EXIT":
            self.done.callback(None)


def report(members):
    closes, marked = {}, {}
    for member in members:
        if member.close_code is not None:
            closes[str(member.close_code)] = closes.get(str(member.close_code), 0) + 1
        for mark in member.marks:
            marked[mark] = marked.get(mark, 0) + 1
    return {
        "open": sum(1 for m in members if m.close_code is None),
        "messages": sum(m.messages for m in members),
        "out_of_order": sum(m.out_of_order for m in members),
        "told": sum(1 for m in members if m.notices),
        "notices": sum(m.notices for m in members),
        "marked": marked,
        "closes": closes,
    }


async def main(reactor, argv):
    parser = argparse.ArgumentParser()
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--secret", required=True)
    parser.add_argument("--count", type=int, required=True)
    parser.add_argument("--prefix", default="member")
    parser.add_argument("--concurrency", type=int, default=20)
    args = parser.parse_args(argv)
    members = []
    done = defer.Deferred()
    stdio.StandardIO(Control(members, done))
    endpoint = endpoints.TCP4ClientEndpoint(reactor, args.host, args.port, timeout=60)
    indexes = iter(range(args.count))

    async def worker():
        for index in indexes:
            token = mint_token(args.secret, f"{args.prefix}{index}", device_id="d", audience="service_chat_gateway")
            opened = defer.Deferred()
            await endpoints.connectProtocol(endpoint, Member(f"{args.host}:{args.port}", token, opened))
            members.append(await opened)

    await defer.gatherResults([defer.Deferred.fromCoroutine(worker()) for _ in range(args.concurrency)], consumeErrors=True)
    sys.stdout.write(f"READY {len(members)}\n")
    sys.stdout.flush()
    await done


if __name__ == "__main__":
    task.react(lambda reactor: defer.Deferred.fromCoroutine(main(reactor, sys.argv[1:])))
