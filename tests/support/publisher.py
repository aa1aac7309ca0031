"""Load generator: publishes room messages on the Redis bus at a steady rate, as a core would.

Runs in its own process. Messages are ServerEvents (protobuf) with ids m0, m1, ...
on ``chat:room:{room}``; every 10 ms the messages due are sent in one pipeline.
Prints ``DONE <n>`` when finished.

    python tests/support/publisher.py --redis redis://127.0.0.1:6379/0 --room R --rate 2000 --seconds 10
"""

import argparse
import sys
import time

import redis

from chatgateway.api import chat_pb2 as pb


def event(room_id, i, size):
    message = pb.RoomEvent(id=f"m{i}", room_id=room_id, sender_id="publisher", type=pb.RoomEvent.TEXT)
    message.payload.update({"text": f"{i:08d}".ljust(size, "x")})
    return pb.ServerEvent(id=f"m{i}", message=message).SerializeToString()


def main(argv):
    parser = argparse.ArgumentParser()
    parser.add_argument("--redis", required=True)
    parser.add_argument("--room", required=True)
    parser.add_argument("--rate", type=float, default=2000)
    parser.add_argument("--seconds", type=float, default=10)
    parser.add_argument("--size", type=int, default=1024)
    args = parser.parse_args(argv)
    client = redis.Redis.from_url(args.redis)
    channel = f"chat:room:{args.room}"
    total = int(args.rate * args.seconds)
    started = time.monotonic()
    sent = 0
    while sent < total:
        due = min(total, int((time.monotonic() - started) * args.rate) + 1)
        if due > sent:
            pipe = client.pipeline(transaction=False)
            for i in range(sent, due):
                pipe.publish(channel, event(args.room, i, args.size))
            pipe.execute()
            sent = due
        time.sleep(0.01)  # pacing of a load generator, not a test wait
    print(f"DONE {sent}", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
