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
import json
import sys

from twisted.internet import defer, endpoints, stdio, task
from twisted.protocols.basic import LineReceiver

from chatgateway.api import chat_pb2 as pb
from chatgateway.auth.devtokens import mint_token
from support.rawwebsocket import RawWebSocket, upgrade_request


class Member(RawWebSocket):
    """One device: counts messages, order violations and DATA_LOSS notices."""

    def __init__(self, host, token, opened):
        super().__init__(upgrade_request(host, "/ws", "chat.v1.proto", {"Authorization": f"Bearer {token}"}))
        self.opened = opened
        self.messages = 0
        self.last = -1  # the highest numbered message so far
        self.out_of_order = 0
        self.notices = 0
        self.marks = set()
        self.close_code = None

    def refused(self, status):
        self.opened.errback(RuntimeError(status))

    def binary(self, buffer, start, length):
        self._event(pb.ServerEvent.FromString(buffer[start : start + length]))

    def closed_by_server(self, code):
        self.close_code = code

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

    await defer.gatherResults(
        [defer.Deferred.fromCoroutine(worker()) for _ in range(args.concurrency)], consumeErrors=True
    )
    sys.stdout.write(f"READY {len(members)}\n")
    sys.stdout.flush()
    await done


if __name__ == "__main__":
    task.react(lambda reactor: defer.Deferred.fromCoroutine(main(reactor, sys.argv[1:])))
