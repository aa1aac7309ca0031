"""The reference for bench/suite.py: a bare Twisted + Autobahn room fan-out.

No auth, no registry, no limits: devices connect to ws://host:port/?room=R,
the server keeps room -> connections, subscribes to the same Redis channel
the gateway's events arrive on (chat:room:R), and fans out each message once
prepared. Payloads are forwarded as they come (binary frames).

    python bench/reference_server.py --port 9000 --redis redis://127.0.0.1:6379/0
"""

import argparse
import sys
from urllib.parse import urlsplit

import txredisapi
from autobahn.twisted.websocket import WebSocketServerFactory, WebSocketServerProtocol
from twisted.internet import endpoints, reactor


class Device(WebSocketServerProtocol):
    def onConnect(self, request):
        self.room = (request.params.get("room") or ["default"])[0]

    def onOpen(self):
        self.factory.rooms.setdefault(self.room, set()).add(self)

    def onClose(self, wasClean, code, reason):
        self.factory.rooms.get(getattr(self, "room", None), set()).discard(self)


class Subscriber(txredisapi.SubscriberProtocol):
    def connectionMade(self):
        self.psubscribe("chat:room:*")

    def messageReceived(self, pattern, channel, message):
        room = channel.decode().rpartition(":")[2] if isinstance(channel, bytes) else channel.rpartition(":")[2]
        members = self.factory.devices.rooms.get(room)
        if members:
            prepared = self.factory.devices.prepareMessage(message, isBinary=True)
            for device in members:
                device.sendPreparedMessage(prepared)


def main(argv):
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--redis", required=True)
    # Twisted's default of 50 drops SYNs in a connect storm (bench/storm.py gives the gateway's)
    parser.add_argument("--backlog", type=int, default=50, help="the listening socket's accept backlog")
    args = parser.parse_args(argv)
    devices = WebSocketServerFactory()
    devices.protocol = Device
    devices.rooms = {}
    devices.setProtocolOptions(autoPingInterval=0)
    reactor.listenTCP(args.port, devices, backlog=args.backlog, interface="127.0.0.1")
    parts = urlsplit(args.redis)
    subscribers = txredisapi.SubscriberFactory()
    subscribers.charset = None  # binary payloads
    subscribers.protocol = Subscriber
    subscribers.devices = devices
    endpoints.TCP4ClientEndpoint(reactor, parts.hostname, parts.port or 6379).connect(subscribers)
    print("listening", flush=True)
    reactor.run()


if __name__ == "__main__":
    main(sys.argv[1:])
