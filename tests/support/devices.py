"""Load generator: many WebSocket devices that record how they are closed.

Runs in its own process (plain Autobahn clients, JSON frames). Talks to the
driver over stdin/stdout, one line each:

    -> READY <n>          every device received its `connected` frame
    <- SEND <k> <room>    the first k devices each send a message (requestId "inflight")
    -> SENT <k>
    <- REPORT             -> REPORT {"codes": {"1001": n}, "hinted": n, "sent": k,
                                     "answered_ok": n, "answered_before_close": n, "open": n}
    <- EXIT

    python tests/support/devices.py --url ws://127.0.0.1:8080/ws --secret S --count 500
"""

import argparse
import json
import sys
from urllib.parse import urlsplit

from autobahn.twisted.websocket import WebSocketClientFactory, WebSocketClientProtocol
from twisted.internet import defer, endpoints, stdio, task
from twisted.protocols.basic import LineReceiver

from chatgateway.auth.devtokens import mint_token

HINT = "gateway draining: reconnect in "


class Device(WebSocketClientProtocol):
    def onOpen(self):
        self.answer = None  # the commandResult of "inflight": "ok" or an error status
        self.answered_before_close = False
        self.close = None

    def onMessage(self, payload, isBinary):
        event = json.loads(payload)
        if "connected" in event and not self.factory.ready.called:
            self.factory.ready.callback(self)
        result = event.get("commandResult")
        if result and result.get("requestId") == "inflight":
            self.answer = result.get("error", {}).get("status", "ok")
            self.answered_before_close = self.close is None

    def onClose(self, wasClean, code, reason):
        self.close = (code, reason or "")
        if not self.factory.ready.called:
            self.factory.ready.errback(RuntimeError(f"closed before connected: {code} {reason}"))

    def send_inflight(self, room_id):
        command = {
            "requestId": "inflight",
            "roomEvent": {"roomId": room_id, "type": "TEXT", "payload": {"text": "in flight"}},
        }
        self.sendMessage(json.dumps({"command": command}).encode())


class Control(LineReceiver):
    delimiter = b"\n"

    def __init__(self, load):
        self.load = load

    def lineReceived(self, line):
        words = line.decode().split()
        if words[:1] == ["SEND"]:
            count, room_id = int(words[1]), words[2]
            for device in self.load.devices[:count]:
                device.send_inflight(room_id)
            self.load.sent = count
            self.sendLine(f"SENT {count}".encode())
        elif words[:1] == ["REPORT"]:
            self.sendLine(b"REPORT " + json.dumps(self.load.report()).encode())
        elif words[:1] == ["EXIT"]:
            self.load.done.callback(None)


class Load:
    def __init__(self, reactor, args):
        self.reactor = reactor
        self.args = args
        self.devices = []
        self.sent = 0
        self.done = defer.Deferred()

    async def connect_one(self, index):
        token = mint_token(
            self.args.secret, f"{self.args.prefix}{index}", device_id="d", audience=self.args.audience, ttl=3600
        )
        factory = WebSocketClientFactory(
            self.args.url, headers={"Authorization": f"Bearer {token}"}, protocols=["chat.v1.json"]
        )
        factory.setProtocolOptions(autoPingInterval=0, openHandshakeTimeout=60, closeHandshakeTimeout=30)
        factory.protocol = Device
        factory.ready = defer.Deferred()
        parts = urlsplit(self.args.url)
        await endpoints.TCP4ClientEndpoint(self.reactor, parts.hostname, parts.port, timeout=60).connect(factory)
        self.devices.append(await factory.ready)

    async def connect_all(self):
        indexes = iter(range(self.args.count))

        async def worker():
            for index in indexes:
                await self.connect_one(index)

        await defer.gatherResults(
            [defer.Deferred.fromCoroutine(worker()) for _ in range(self.args.concurrency)], consumeErrors=True
        )

    def report(self):
        codes = {}
        for device in self.devices:
            code = str(device.close[0]) if device.close else "open"
            codes[code] = codes.get(code, 0) + 1
        senders = self.devices[: self.sent]
        return {
            "codes": codes,
            "hinted": sum(1 for d in self.devices if d.close and d.close[1].startswith(HINT)),
            "sent": self.sent,
            "answered_ok": sum(1 for d in senders if d.answer == "ok"),
            "answered_before_close": sum(1 for d in senders if d.answered_before_close),
            "open": sum(1 for d in self.devices if d.close is None),
        }


async def main(reactor, argv):
    parser = argparse.ArgumentParser()
    parser.add_argument("--url", required=True)
    parser.add_argument("--secret", required=True)
    parser.add_argument("--audience", default="service_chat_gateway")
    parser.add_argument("--count", type=int, default=100)
    parser.add_argument("--prefix", default="device")
    parser.add_argument("--concurrency", type=int, default=50)
    args = parser.parse_args(argv)
    load = Load(reactor, args)
    stdio.StandardIO(Control(load))
    await load.connect_all()
    sys.stdout.write(f"READY {len(load.devices)}\n")
    sys.stdout.flush()
    await load.done


if __name__ == "__main__":
    task.react(lambda reactor: defer.Deferred.fromCoroutine(main(reactor, sys.argv[1:])))
