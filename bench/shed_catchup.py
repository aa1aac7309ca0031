"""Exactly once through overload: a room of 1,000 published into faster than one gateway
fans out, every delivery checked (issue #17, items 2 and 5).

bench/suite.py counts deliveries per step (a device's frames within the step and its
drain), so it cannot tell an event delivered late (after its 0.5 s quiet drain) from one
never delivered. This bench holds every device's records instead: redis-server, the
reference core and one `twistd chatgateway`; N devices (tests/support/fleet.py, one client
process) in one room; this process publishes numbered events by the contract (the room's
script: positioned, kept in the stream, PUBLISHed) at ``--rate`` for ``--seconds``, past
what the gateway fans out at once, so its fan-out sheds and the shed recipients catch up
from the stream. The core never saw these events: a device further behind than the stream
(``--stream-len``) gets a gap event naming what it missed. Then the delivery check (tests/support/deliverycheck.py: every event once,
in order) and the gateway's catch-up reads and shed warnings. JSON to bench/out/shed_catchup.json.

    .venv/bin/python bench/shed_catchup.py --devices 1000 --rate 300 --seconds 5
"""

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
OUT = HERE / "out"
sys.path.insert(0, str(ROOT / "tests"))

from chatgateway.api import chat_pb2 as pb  # noqa: E402
from chatgateway.bus import roomstream  # noqa: E402
from support.deliverycheck import check  # noqa: E402
from support.deployment import OWNER, Deployment  # noqa: E402
from support.loadgen import LineProcess  # noqa: E402
from support.processes import until  # noqa: E402
from support.scrape import catchup_reads  # noqa: E402

SECRET = "bench-shed-catchup-secret-0123456789abcdef"


def publish(redis_client, room, rate, seconds, stream_len):
    """Events n = 0, 1, ... by the contract at ``rate`` a second (those due in one pipeline),
    the stream kept to ``stream_len``; how many."""
    script, keys, args = roomstream.publish_call(room, b"", max_len=stream_len)
    sha = redis_client.script_load(script)
    sent, start = 0, time.monotonic()
    while time.monotonic() - start < seconds:
        due = int((time.monotonic() - start) * rate) + 1
        pipe = redis_client.pipeline(transaction=False)
        for n in range(sent, due):
            event = pb.RoomEvent(id=f"x{n}", room_id=room, type=pb.RoomEvent.TEXT)
            event.payload.update({"n": n, "text": "x" * 100})
            payload = pb.ServerEvent(id=f"x{n}", message=event).SerializeToString()
            pipe.evalsha(sha, len(keys), *keys, args[0], payload, *args[2:])
        pipe.execute()
        sent = due
        time.sleep(0.002)  # pacing of a load generator
    return sent


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--devices", type=int, default=1000)
    parser.add_argument("--rate", type=float, default=300, help="events per second into the room")
    parser.add_argument("--seconds", type=float, default=5)
    parser.add_argument(
        "--stream-len",
        type=int,
        default=roomstream.MAX_LEN,
        help="events the room's stream keeps (ROOM_STREAM_MAX_LEN); the core never saw these events, so a "
        "device further behind than the stream gets a gap event",
    )
    parser.add_argument("--wait", type=float, default=180, help="longest wait for every delivery (s)")
    parser.add_argument("--out", default=str(OUT / "shed_catchup.json"))
    args = parser.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    log_dir = Path(tempfile.mkdtemp(prefix="bench-shed-"))
    deployment = Deployment(SECRET, log_dir, gateways=(1,), MAX_CONNECTS_PER_SECOND="100000").start()
    fleet = None
    try:
        [room] = deployment.make_rooms([[OWNER] + [f"shed{i}" for i in range(args.devices)]])
        fleet = LineProcess(
            "tests/support/fleet.py",
            [
                "--urls",
                deployment.urls(),
                "--secret",
                SECRET,
                "--count",
                args.devices,
                "--prefix",
                "shed",
                "--acks",
                "0",
            ],
            log_path=log_dir / "fleet.log",
        )
        fleet.expect("READY", 180)
        started = time.monotonic()
        sent = publish(deployment.redis.client(decode_responses=False), room, args.rate, args.seconds, args.stream_len)

        def stats():
            fleet.send("STATS")
            return json.loads(fleet.expect("STATS", 60))

        until(lambda: stats()["events"] >= sent * args.devices or stats()["gaps"] >= args.devices, args.wait)
        seconds = time.monotonic() - started
        dump = log_dir / "records.json"
        fleet.send(f"DUMP {dump}")
        fleet.expect("DUMPED", 180)
        report = check(
            {f"shed{i}": [room] for i in range(args.devices)},
            {"sent": {room: list(range(sent))}},
            json.loads(dump.read_text()),
        )
        sheds = [line for line in deployment.gateways[0].log_text().splitlines() if "fan-out overloaded" in line]
        results = {
            "args": vars(args),
            "sent": sent,
            "deliveries_expected": sent * args.devices,
            "seconds_to_all_delivered": round(seconds, 2),
            "check": report.counts(),
            "check_ok": report.ok,
            "catchup_reads": catchup_reads(deployment.gateways[0].port),
            "shed_warnings": [line.split("] ", 1)[-1] for line in sheds],
        }
        print(json.dumps(results, indent=1), flush=True)
        if not report.ok:
            print(report.describe(), flush=True)
        Path(args.out).write_text(json.dumps(results, indent=1))
    finally:
        if fleet is not None:
            fleet.stop()
        deployment.stop()


if __name__ == "__main__":
    main()
