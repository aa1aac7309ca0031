"""Load process: devices that record every room event with its position, and resume.

Runs in its own process (tests/integration/test_chaos.py, bench/resume.py). Device i is
profile ``PREFIX<i>``, device ``d`` (its own JWT), on the chat.v1.proto subprotocol (the
handshake written by hand: support.rawwebsocket). It signs in with its first frame, a
``StreamRequest`` with ``auth_token`` and, after its first `connected`, what it needs to
resume (docs/protocol.md#positions): ``resume_token`` (the last `connected` gave it) and/or
``positions`` (the last offset it holds per room), as ``--resume`` says.

Every room event (``message``) is recorded per room as (epoch, offset, n), n being the
publisher's number (``payload.n``, support/corepublisher.py); gap events and errors are
recorded too. support/deliverycheck.py judges the records.

A device whose connection ends (or whose attempt fails) tries again as stormdevices does
(docs/protocol.md#reconnect-hints): full-jitter backoff, never sooner than a close
reason's ``reconnect in X s``, to the next of ``--urls`` unless a 503/429 said when.
``--acks S`` acknowledges each room's last event (with its position) every S seconds.

stdin/stdout, one line each:

    -> READY <n> {json}      every device received its first `connected`
    <- STATS                 -> STATS {json}   (see Fleet.stats)
    <- DUMP <path>           -> DUMPED <path>  every device's records, as JSON (Fleet.dump)
    <- AWAY                  -> AWAY <unix time>  every connection cut (no close frame), none reconnects
    <- BACK <url index>      -> BACK <unix time>  every device connects to that URL at once
    <- QUIT

    python tests/support/fleet.py --urls ws://127.0.0.1:8081/ws,ws://127.0.0.1:8082/ws \\
        --secret S --count 200 --prefix chaos
"""

import argparse
import json
import sys
import time
from urllib.parse import urlsplit

from twisted.internet import defer, endpoints, stdio, task
from twisted.protocols.basic import LineReceiver

from chatgateway.api import chat_pb2 as pb
from chatgateway.auth.devtokens import mint_token
from support.rawwebsocket import RawWebSocket, upgrade_request
from support.stormdevices import DIGITS, STATUS, next_try

RESUME_MODES = ("none", "token", "positions", "both", "mixed")


def client_frame(payload, opcode=0x2):
    """A masked client frame (zero mask: the payload goes as it is) of ``payload``."""
    n = len(payload)
    if n < 126:
        head = bytes([0x80 | opcode, 0x80 | n])
    elif n < 65536:
        head = bytes([0x80 | opcode, 0x80 | 126]) + n.to_bytes(2, "big")
    else:
        head = bytes([0x80 | opcode, 0x80 | 127]) + n.to_bytes(8, "big")
    return head + b"\0\0\0\0" + payload


def resume_with(mode, index):
    """What device ``index`` resumes with under ``mode``: (token?, positions?)."""
    if mode == "mixed":  # one in three of each kind
        mode = ("token", "positions", "both")[index % 3]
    return mode in ("token", "both"), mode in ("positions", "both")


class Connection(RawWebSocket):
    """One attempt of a device: the handshake, the sign-in frame, then its events."""

    def __init__(self, device, request):
        super().__init__(request)
        self.device = device
        self.opened = False
        self.status = None  # HTTP status of a refused handshake
        self.close_code = None  # of the server's close frame

    def upgraded(self):
        self.transport.write(client_frame(self.device.sign_in().SerializeToString()))

    def send(self, request):
        self.transport.write(client_frame(request.SerializeToString()))

    def refused(self, status):
        match = STATUS.match(status)
        self.status = int(match.group(1)) if match else 0

    def binary(self, buffer, start, length):
        event = pb.ServerEvent.FromString(buffer[start : start + length])
        kind = event.WhichOneof("payload")
        if kind == "message":
            self.device.record(event)
        elif kind == "connected":
            self.opened = True
            self.device.opened(event.connected)
        elif kind == "gap":
            gap = event.gap
            self.device.gaps.append([gap.room_id, gap.epoch, gap.first_offset, gap.last_offset, gap.reason])
        elif kind == "error":
            self.device.errors.append([event.error.status, event.error.message[:200]])

    def closed_by_server(self, code):
        self.close_code = code
        codes = self.device.fleet.close_codes
        reason = f"{code} " + DIGITS.sub("N", self.close_reason)[:80]
        codes[reason] = codes.get(reason, 0) + 1

    def connectionLost(self, reason):
        self.device.ended(self)


class Device:
    """A device across its connections: its records, its positions, its resume token."""

    def __init__(self, fleet, index, profile, token, use_token, use_positions):
        self.fleet = fleet
        self.index = index
        self.profile = profile
        self.token = token
        self.use_token, self.use_positions = use_token, use_positions
        self.url = index % len(fleet.targets) if fleet.spread else 0
        self.attempt = 0
        self.connection = None
        self.pending = None
        self.timer = None
        self.first = defer.Deferred()
        self.rooms = {}  # room id -> [[epoch, offset, n], ...] in arrival order
        self.last = {}  # room id -> (event id, epoch, offset) of its newest event
        self.acked = {}  # room id -> the offset last acknowledged
        self.gaps = []
        self.errors = []
        self.resume_token = ""
        self.room_ids = []  # of the last `connected`
        self.connects = 0
        self.resumed = 0  # `connected` frames that said resumed
        # [unix time, "open", gateway, resumed, sent token?, {room: offset sent}] and
        # [unix time, "end", close code (None: no close frame)]: where the seams are
        self.history = []
        self.sent = (False, {})  # what the last sign-in resumed with

    def sign_in(self):
        request = pb.StreamRequest(auth_token=self.token)
        if self.connects and self.use_token:
            request.resume_token = self.resume_token
        if self.connects and self.use_positions:
            for room_id, (_, epoch, offset) in sorted(self.last.items()):
                request.positions.add(room_id=room_id, epoch=epoch, offset=offset)
        self.sent = (bool(request.resume_token), {p.room_id: p.offset for p in request.positions})
        return request

    def record(self, event):
        message = event.message
        epoch = sys.intern(event.epoch)
        number = message.payload["n"] if "n" in message.payload else -1
        self.rooms.setdefault(message.room_id, []).append([epoch, event.offset, int(number)])
        self.last[message.room_id] = (message.id, epoch, event.offset)
        self.fleet.events += 1
        self.fleet.last_event = time.time()

    def ack(self):
        connection = self.connection
        if connection is None or not connection.opened:
            return
        for room_id, (event_id, epoch, offset) in self.last.items():
            if self.acked.get(room_id) != offset:
                self.acked[room_id] = offset
                connection.send(
                    pb.StreamRequest(ack=pb.Ack(event_id=event_id, room_id=room_id, epoch=epoch, offset=offset))
                )

    def connect(self):
        fleet = self.fleet
        if fleet.quitting or fleet.away or self.connection is not None:
            return
        fleet.attempts += 1
        host, path, endpoint = fleet.targets[self.url]
        connection = self.connection = Connection(self, upgrade_request(host, path, "chat.v1.proto"))
        self.timer = fleet.reactor.callLater(fleet.attempt_timeout, self._timed_out, connection)
        self.pending = endpoints.connectProtocol(endpoint, connection)
        self.pending.addCallbacks(self._tcp_connected, self._tcp_failed, errbackArgs=(connection,))

    def _tcp_connected(self, _):
        self.pending = None

    def _tcp_failed(self, failure, connection):
        self.pending = None
        self.ended(connection)

    def _timed_out(self, connection):
        self.timer = None
        if self.pending is not None:
            self.pending.cancel()
        elif connection.transport is not None:
            connection.transport.abortConnection()

    def opened(self, connected):
        if self.timer is not None and self.timer.active():
            self.timer.cancel()
        self.timer = None
        self.attempt = 0
        self.connects += 1
        self.resumed += bool(connected.resumed)
        self.resume_token = connected.resume_token
        self.room_ids = sorted(connected.room_ids)
        token, positions = self.sent
        self.history.append([round(time.time(), 3), "open", connected.gateway_id, connected.resumed, token, positions])
        self.fleet.connected += 1
        if not self.first.called:
            self.first.callback(self)

    def ended(self, connection):
        if connection is not self.connection:
            return
        self.connection = None
        fleet = self.fleet
        if self.timer is not None and self.timer.active():
            self.timer.cancel()
        self.timer = None
        if connection.opened:
            fleet.connected -= 1
            fleet.lost += 1
            self.history.append([round(time.time(), 3), "end", connection.close_code])
        if fleet.quitting or fleet.away:
            return
        delay, same, _ = next_try(
            connection.status, connection.response_head, connection.close_reason, self.attempt, fleet.base, fleet.cap
        )
        self.attempt += 1
        if not same:
            self.url = (self.url + 1) % len(fleet.targets)
        fleet.reactor.callLater(delay, self.connect)

    def dump(self):
        return {
            "profile": self.profile,
            "rooms": self.rooms,
            "room_ids": self.room_ids,
            "gaps": self.gaps,
            "errors": self.errors,
            "connects": self.connects,
            "resumed": self.resumed,
            "history": self.history,
        }


class Fleet:
    def __init__(self, reactor, args):
        self.reactor = reactor
        self.base, self.cap, self.attempt_timeout = args.base, args.cap, args.attempt_timeout
        self.spread = args.start == "spread"
        self.targets = []
        for url in args.urls:
            parts = urlsplit(url)
            endpoint = endpoints.TCP4ClientEndpoint(reactor, parts.hostname, parts.port, timeout=args.attempt_timeout)
            self.targets.append((parts.netloc, parts.path + (f"?{parts.query}" if parts.query else ""), endpoint))
        self.devices = []
        for i in range(args.first, args.first + args.count):
            profile = f"{args.prefix}{i}"
            token = mint_token(args.secret, profile, device_id="d", audience="service_chat_gateway", ttl=86400)
            self.devices.append(Device(self, i, profile, token, *resume_with(args.resume, i)))
        self.quitting = self.away = False
        self.connected = self.lost = self.attempts = self.events = 0
        self.last_event = None  # unix time of the latest room event recorded
        self.close_codes = {}

    def stats(self):
        return {
            "devices": len(self.devices),
            "connected": self.connected,
            "lost": self.lost,
            "attempts": self.attempts,
            "events": self.events,
            "resumed": sum(d.resumed for d in self.devices),
            "gaps": sum(len(d.gaps) for d in self.devices),
            "errors": sum(len(d.errors) for d in self.devices),
            "close_codes": self.close_codes,
            "last_event": self.last_event,
            "time": time.time(),
        }

    def dump(self, path):
        with open(path, "w") as f:
            json.dump({d.profile: d.dump() for d in self.devices}, f)

    def ack(self):
        for device in self.devices:
            device.ack()

    def cut(self):
        for device in self.devices:
            if device.connection is not None and device.connection.transport is not None:
                device.connection.transport.abortConnection()

    def leave(self):
        """Every device's connection is cut (TCP closed, no close frame), and none reconnects."""
        self.away = True
        self.cut()

    def back(self, url):
        """Every device connects to ``url`` (an index of --urls) at once."""
        self.away = False
        for device in self.devices:
            if device.connection is None:
                device.url = url
                device.attempt = 0
                device.connect()

    def quit(self):
        self.quitting = True
        self.cut()


class Control(LineReceiver):
    delimiter = b"\n"

    def __init__(self, fleet, done):
        self.fleet, self.done = fleet, done

    def lineReceived(self, line):
        command, _, argument = line.decode().strip().partition(" ")
        if command == "STATS":
            self.sendLine(b"STATS " + json.dumps(self.fleet.stats()).encode())
        elif command == "DUMP":
            self.fleet.dump(argument)
            self.sendLine(f"DUMPED {argument}".encode())
        elif command == "AWAY":
            self.fleet.leave()
            self.sendLine(f"AWAY {time.time():.6f}".encode())
        elif command == "BACK":
            at = time.time()
            self.fleet.back(int(argument))
            self.sendLine(f"BACK {at:.6f}".encode())
        elif command == "QUIT":
            self.stop()

    def connectionLost(self, reason):  # the driver went away
        self.stop()

    def stop(self):
        self.fleet.quit()
        if not self.done.called:
            self.done.callback(None)


async def main(reactor, argv):
    parser = argparse.ArgumentParser()
    parser.add_argument("--urls", required=True, type=lambda s: s.split(","), help="device i starts on URL i mod n")
    parser.add_argument("--secret", required=True)
    parser.add_argument("--count", type=int, required=True)
    parser.add_argument("--first", type=int, default=0, help="index of the first device")
    parser.add_argument("--prefix", default="fleet")
    parser.add_argument("--resume", choices=RESUME_MODES, default="mixed")
    parser.add_argument(
        "--start",
        choices=("spread", "first"),
        default="spread",
        help="device i starts on URL i mod n, or all on the first",
    )
    parser.add_argument("--acks", type=float, default=1.0, help="s between acknowledgements (0: none)")
    parser.add_argument("--concurrency", type=int, default=32, help="first connects in flight")
    parser.add_argument("--base", type=float, default=0.5, help="backoff base (s)")
    parser.add_argument("--cap", type=float, default=5.0, help="backoff cap (s)")
    parser.add_argument("--attempt-timeout", type=float, default=15.0, help="s from TCP connect to `connected`")
    args = parser.parse_args(argv)
    fleet = Fleet(reactor, args)
    done = defer.Deferred()
    control = Control(fleet, done)
    stdio.StandardIO(control)
    started = time.monotonic()
    devices = iter(fleet.devices)

    async def worker():
        for device in devices:
            device.connect()
            await device.first

    await defer.gatherResults([defer.Deferred.fromCoroutine(worker()) for _ in range(args.concurrency)])
    if args.acks > 0:
        task.LoopingCall(fleet.ack).start(args.acks, now=False)
    control.sendLine(
        f"READY {fleet.connected} {json.dumps({'seconds': round(time.monotonic() - started, 3)})}".encode()
    )
    await done


if __name__ == "__main__":
    task.react(lambda reactor: defer.Deferred.fromCoroutine(main(reactor, sys.argv[1:])))
