"""Load generator: holds many WebSocket connections to one or more gateways.

Runs in its own process (the driver starts it), with plain Autobahn clients
and prebuilt frames, so it costs little next to the gateway it measures.
Talks to the driver over stdin/stdout, one line each:

    <- CONNECT            (with --wait) start connecting now
    -> READY <n>          every connection received its `connected` frame
    <- STATS              -> STATS {"messages": n, "closed": n, ...}
    <- CLOSE              closes every connection cleanly, then -> CLOSED and exit

    python bench/loadclient.py --urls ws://127.0.0.1:8081/ws,ws://127.0.0.1:8082/ws \\
        --secret S --profiles 1000 --prefix dev
"""

import argparse
import json
import sys
from urllib.parse import urlsplit

from autobahn.twisted.websocket import WebSocketClientFactory, WebSocketClientProtocol
from twisted.internet import defer, endpoints, stdio, task
from twisted.protocols.basic import LineReceiver

from chatgateway.auth.devtokens import mint_token


class Device(WebSocketClientProtocol):
    def onOpen(self):
        self.factory.stats["open"] += 1

    def onMessage(self, payload, isBinary):
        stats = self.factory.stats
        if not self.factory.ready.called and b'"connected"' in payload:
            self.factory.ready.callback(self)
            return
        stats["messages"] += 1

    def onClose(self, wasClean, code, reason):
        self.factory.stats["closed"] += 1
        self.factory.stats["close_codes"][str(code)] = self.factory.stats["close_codes"].get(str(code), 0) + 1
        if not self.factory.ready.called:
            self.factory.ready.errback(RuntimeError(f"closed before connected: {code} {reason}"))


class Control(LineReceiver):
    delimiter = b"\n"

    def __init__(self, load):
        self.load = load

    def lineReceived(self, line):
        command = line.decode().strip()
        if command == "CONNECT":
            self.load.go.callback(None)
        elif command == "STATS":
            self.sendLine(b"STATS " + json.dumps(self.load.stats).encode())
        elif command == "CLOSE":
            self.load.close_all().addCallback(lambda _: self.sendLine(b"CLOSED"))


class Load:
    def __init__(self, reactor, args):
        self.reactor = reactor
        self.args = args
        self.stats = {"open": 0, "messages": 0, "closed": 0, "close_codes": {}}
        self.protocols = []
        self.done = defer.Deferred()
        self.go = defer.Deferred()  # fired by CONNECT when --wait

    async def connect_one(self, index):
        url = self.args.urls[index % len(self.args.urls)]
        profile = f"{self.args.prefix}{index}"
        token = mint_token(
            self.args.secret,
            profile,
            device_id="bench",
            issuer=self.args.issuer,
            audience=self.args.audience,
            ttl=86400,
        )
        factory = WebSocketClientFactory(url, headers={"Authorization": f"Bearer {token}"}, protocols=["chat.v1.json"])
        factory.setProtocolOptions(autoPingInterval=0, openHandshakeTimeout=60)
        factory.protocol = Device
        factory.stats = self.stats
        factory.ready = defer.Deferred()
        parts = urlsplit(url)
        endpoint = endpoints.TCP4ClientEndpoint(self.reactor, parts.hostname, parts.port, timeout=60)
        await endpoint.connect(factory)
        protocol = await factory.ready
        self.protocols.append(protocol)

    async def connect_all(self):
        # a bounded number of handshakes in flight at once
        indexes = iter(range(self.args.profiles))

        async def worker():
            for index in indexes:
                await self.connect_one(index)

        await defer.gatherResults(
            [defer.Deferred.fromCoroutine(worker()) for _ in range(self.args.concurrency)], consumeErrors=True
        )

    def close_all(self):
        closed = []
        for protocol in self.protocols:
            d = defer.Deferred()
            original = protocol.onClose

            def on_close(wasClean, code, reason, original=original, d=d):
                original(wasClean, code, reason)
                d.callback(None)

            protocol.onClose = on_close
            protocol.sendClose(1000)
            closed.append(d)
        result = defer.DeferredList(closed)
        result.addCallback(lambda _: self.reactor.callLater(0.1, self.done.callback, None))
        return result


async def main(reactor, argv):
    parser = argparse.ArgumentParser()
    parser.add_argument("--urls", required=True, type=lambda s: s.split(","))
    parser.add_argument("--secret", required=True)
    parser.add_argument("--issuer", default="")
    parser.add_argument("--audience", default="service_chat_gateway")
    parser.add_argument("--profiles", type=int, default=100)
    parser.add_argument("--prefix", default="dev")
    parser.add_argument("--concurrency", type=int, default=50)
    parser.add_argument("--wait", action="store_true", help="connect only when told CONNECT")
    args = parser.parse_args(argv)
    load = Load(reactor, args)
    control = Control(load)
    stdio.StandardIO(control)
    if args.wait:
        await load.go
    await load.connect_all()
    control.sendLine(f"READY {len(load.protocols)}".encode())
    await load.done


if __name__ == "__main__":
    task.react(lambda reactor: defer.Deferred.fromCoroutine(main(reactor, sys.argv[1:])))
