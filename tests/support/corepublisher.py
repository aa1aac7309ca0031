"""Load process: numbered room events sent through the reference core (SendEvent over real gRPC).

Runs in its own process (tests/integration/test_chaos.py, bench/resume.py). The events go
round-robin over ``--rooms``, ``--rate`` a second in all; the k-th event of a room carries
``payload.n = k`` (from 0) and ``payload.text`` padded to ``--size`` bytes, so a device's
records (support/fleet.py) say which events of the room it holds. The core gives each its
position and publishes it by the contract (docs/architecture.md#positions-and-the-room-stream).

A send the core did not confirm (an error, a deadline) may or may not have been stored: its
number is logged as uncertain and not used again (a retry with the same number could store
it twice); support/deliverycheck.py neither requires nor forbids it.

stdin/stdout, one line each:

    <- RATE <events/s>       -> RATE <events/s>   from now on
    <- STATS                 -> STATS {json}      sent, uncertain so far
    <- STOP <path>           -> DONE <path>       stop sending, write the log (JSON) to path

    python tests/support/corepublisher.py --core 127.0.0.1:50051 --secret S --owner o --rooms r1,r2
"""

import argparse
import json
import sys
import threading
import time

import grpc

from chatgateway.api import chat_pb2 as pb
from chatgateway.api import chat_pb2_grpc
from chatgateway.auth.devtokens import mint_token


class Publisher:
    def __init__(self, args):
        self.rooms = args.rooms
        self.rate = args.rate
        self.size = args.size
        self.timeout = args.timeout
        token = mint_token(args.secret, args.owner, audience="service_chat_gateway", ttl=86400)
        self.metadata = [("authorization", f"Bearer {token}")]
        self.channel = grpc.insecure_channel(args.core)
        self.stub = chat_pb2_grpc.ChatServiceStub(self.channel)
        self.numbers = {room: 0 for room in self.rooms}
        self.sent = {room: [] for room in self.rooms}  # numbers the core confirmed, in order
        self.uncertain = {room: [] for room in self.rooms}
        self.errors = {}
        self.stopping = threading.Event()
        self.lock = threading.Lock()

    def send(self, room):
        n = self.numbers[room]
        self.numbers[room] = n + 1
        event = pb.RoomEvent(room_id=room, type=pb.RoomEvent.TEXT)
        event.payload.update({"n": n, "text": f"#{n}".ljust(self.size, ".")})
        try:
            self.stub.SendEvent(pb.SendEventRequest(event=event), metadata=self.metadata, timeout=self.timeout)
        except grpc.RpcError as e:
            with self.lock:
                self.uncertain[room].append(n)
                key = e.code().name
                self.errors[key] = self.errors.get(key, 0) + 1
            return
        with self.lock:
            self.sent[room].append(n)

    def run(self):
        """Paced sends (round-robin over the rooms) until STOP; a slow answer delays the next."""
        i = 0
        due = time.monotonic()
        while not self.stopping.is_set():
            self.send(self.rooms[i % len(self.rooms)])
            i += 1
            due += 1.0 / self.rate
            delay = due - time.monotonic()
            if delay > 0:
                self.stopping.wait(delay)  # pacing of a load generator, not a test wait
            elif delay < -1.0:
                due = time.monotonic()  # behind by more than a second: do not burst to catch up

    def send_each(self, count):
        """``count`` events into every room, as fast as the core answers (bench/resume.py)."""
        for _ in range(count):
            for room in self.rooms:
                self.send(room)

    def stats(self):
        with self.lock:
            return {
                "sent": sum(len(v) for v in self.sent.values()),
                "uncertain": sum(len(v) for v in self.uncertain.values()),
                "errors": dict(self.errors),
                "rate": self.rate,
            }

    def log(self):
        with self.lock:
            return {"sent": self.sent, "uncertain": self.uncertain, "errors": self.errors}


def main(argv):
    parser = argparse.ArgumentParser()
    parser.add_argument("--core", required=True, help="host:port of the core's gRPC API")
    parser.add_argument("--secret", required=True)
    parser.add_argument("--owner", required=True, help="the profile that sends (a member of every room)")
    parser.add_argument("--rooms", required=True, type=lambda s: s.split(","))
    parser.add_argument("--rate", type=float, default=20.0, help="events per second over all rooms")
    parser.add_argument("--size", type=int, default=64, help="bytes of payload.text")
    parser.add_argument("--timeout", type=float, default=5.0, help="deadline of each SendEvent (s)")
    args = parser.parse_args(argv)
    publisher = Publisher(args)
    sender = threading.Thread(target=publisher.run, daemon=True)
    sender.start()
    print("STARTED", flush=True)
    for line in sys.stdin:
        command, _, argument = line.strip().partition(" ")
        if command == "RATE":
            publisher.rate = float(argument)
            print(f"RATE {publisher.rate:g}", flush=True)
        elif command == "STATS":
            print("STATS " + json.dumps(publisher.stats()), flush=True)
        elif command == "STOP":
            publisher.stopping.set()
            sender.join()
            with open(argument, "w") as f:
                json.dump(publisher.log(), f)
            print(f"DONE {argument}", flush=True)
            return
    publisher.stopping.set()  # the driver went away


if __name__ == "__main__":
    main(sys.argv[1:])
