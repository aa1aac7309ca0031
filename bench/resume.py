"""Resume at once (issue #17, target 2): 1,000 devices of one gateway, each 100 events
behind in one of 10 rooms, resume on another gateway at the same moment.

Starts redis-server, the reference core and two `twistd chatgateway` (one process each)
on free ports; 10 rooms of 100 profiles (one device each, tests/support/fleet.py in one
client process, all on the first gateway). Each repeat: every device's connection is cut
(the gateway keeps its positions at the disconnect); 100 events per room are sent through
the core (tests/support/corepublisher.py, SendEvent over gRPC); then every device
connects to the other gateway at once and resumes (``--resume``: its resume token, its
positions, both (the default), or a third each of token / positions / both). Reported per repeat: the time from
the reconnect to the last event caught up, the CPU the resuming gateway and the client
process spent meanwhile (/proc; the steadier figure on a shared machine), the stream reads and GetHistory pages of the
resuming gateway (its /metrics, chatgateway_catchup_reads_total) and every call it made to
the core meanwhile; at the end, the delivery check of every device's records (each event of
its room once, in order; tests/support/deliverycheck.py). Target: all caught up with ≤ 10
stream reads (one per room) and 0 core calls. JSON to bench/out/resume.json.

    .venv/bin/python bench/resume.py --devices 1000 --rooms 10 --behind 100 --repeats 3
"""

import argparse
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
OUT = HERE / "out"
sys.path.insert(0, str(ROOT / "tests"))

from support.corepublisher import Publisher  # noqa: E402
from support.deliverycheck import check  # noqa: E402
from support.deployment import OWNER, Deployment  # noqa: E402
from support.loadgen import LineProcess  # noqa: E402
from support.processes import until  # noqa: E402
from support.scrape import active_connections, calls_between, catchup_reads, core_calls  # noqa: E402

SECRET = "bench-resume-secret-0123456789abcdef0123456"
PREFIX = "resume"
SETTINGS = {
    "HEARTBEAT_INTERVAL_SEC": "5",
    "MAX_CONNECTS_PER_SECOND": "100000",  # the storm limit is not what this measures
    "MAX_EVENTS_PER_SECOND": "1000",
}


def cpu_seconds(pid):
    """User + system CPU of a process so far (/proc): steadier than wall time on a shared machine."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def ask(process, line, answer=None, timeout=60):
    process.send(line)
    return process.expect(answer or line.split()[0], timeout)


def stats(fleet):
    return json.loads(ask(fleet, "STATS"))


def one_repeat(deployment, fleet, publisher, source, target, behind, devices, wait):
    """Cut every device from gateway ``source``, send ``behind`` events per room, bring them
    all back on ``target`` at once: the figures of the catch-up."""
    ask(fleet, "AWAY")
    until(lambda: active_connections(deployment.gateways[source].port) == 0, 60, what="every device gone")
    publisher.send_each(behind)
    before_events = stats(fleet)["events"]
    port = deployment.gateways[target].port
    reads_before, calls_before = catchup_reads(port), core_calls(port)
    pids = {"gateway": deployment.gateways[target].pid, "client": fleet.process.pid}
    cpu_before = {k: cpu_seconds(p) for k, p in pids.items()}
    back_at = float(ask(fleet, f"BACK {target}"))
    expected = before_events + devices * behind
    caught_up = until(lambda: stats(fleet)["events"] >= expected, wait)
    after = stats(fleet)
    cpu = {k: round(cpu_seconds(p) - cpu_before[k], 2) for k, p in pids.items()}
    reads_after, calls_after = catchup_reads(port), core_calls(port)
    reads = {k: v - reads_before.get(k, 0) for k, v in reads_after.items()}
    return {
        "caught_up": bool(caught_up),
        "events": after["events"] - before_events,
        "expected": devices * behind,
        "seconds": round(after["last_event"] - back_at, 3) if caught_up else None,
        "connected": after["connected"],
        "gateway_cpu_seconds": cpu["gateway"],  # from the reconnects to a little after the last event
        "client_cpu_seconds": cpu["client"],
        "stream_reads": reads.get("stream", 0),
        "core_pages": reads.get("core", 0),
        "core_calls": calls_between(calls_after, calls_before),
        "gaps": after["gaps"],
        "errors": after["errors"],
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--devices", type=int, default=1000)
    parser.add_argument("--rooms", type=int, default=10)
    parser.add_argument("--behind", type=int, default=100, help="events per room sent while the devices are away")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--wait", type=float, default=120, help="longest wait for a repeat's catch-up (s)")
    parser.add_argument("--resume", choices=("token", "positions", "both", "mixed"), default="both")
    parser.add_argument("--out", default=str(OUT / "resume.json"))
    args = parser.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    log_dir = Path(tempfile.mkdtemp(prefix="bench-resume-"))
    deployment = Deployment(SECRET, log_dir, gateways=(1, 1), **SETTINGS).start()
    fleet = publisher = None
    results = {"args": vars(args), "repeats": [], "logs": str(log_dir)}
    try:
        members = [[OWNER] for _ in range(args.rooms)]
        for i in range(args.devices):
            members[i % args.rooms].append(f"{PREFIX}{i}")
        rooms = deployment.make_rooms(members)
        expected_rooms = {f"{PREFIX}{i}": [rooms[i % args.rooms]] for i in range(args.devices)}
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
                PREFIX,
                "--start",
                "first",
                "--resume",
                args.resume,
            ],
            log_path=log_dir / "fleet.log",
        )
        fleet.expect("READY", 180)
        publisher = Publisher(
            argparse.Namespace(
                core=deployment.core_target, secret=SECRET, owner=OWNER, rooms=rooms, rate=1, size=64, timeout=10
            )
        )
        publisher.send_each(1)  # every device holds a position in its room
        until(lambda: stats(fleet)["events"] >= args.devices, 60, what="the first event of every room delivered")
        source = 0
        for repeat in range(args.repeats):
            target = 1 - source
            figures = one_repeat(deployment, fleet, publisher, source, target, args.behind, args.devices, args.wait)
            figures["from"], figures["to"] = f"gw-{source}", f"gw-{target}"
            results["repeats"].append(figures)
            print(f"repeat {repeat}: {json.dumps(figures)}", flush=True)
            source = target
        dump_path = log_dir / "records.json"
        ask(fleet, f"DUMP {dump_path}", "DUMPED")
        report = check(expected_rooms, publisher.log(), json.loads(dump_path.read_text()))
        results["check"] = report.counts()
        results["check_ok"] = report.ok
        if not report.ok:
            print(report.describe(), flush=True)
        done = [r for r in results["repeats"] if r["caught_up"] and r["seconds"] is not None]
        results["median"] = {
            "seconds": statistics.median(r["seconds"] for r in done) if done else None,
            "gateway_cpu_seconds": statistics.median(r["gateway_cpu_seconds"] for r in results["repeats"]),
            "stream_reads": statistics.median(r["stream_reads"] for r in results["repeats"]),
            "core_calls": statistics.median(sum(r["core_calls"].values()) for r in results["repeats"]),
            "caught_up": f"{len(done)}/{len(results['repeats'])}",
        }
        print(f"median: {json.dumps(results['median'])}; check: {json.dumps(results['check'])}", flush=True)
    finally:
        if fleet is not None:
            fleet.stop()
        deployment.stop()
        Path(args.out).write_text(json.dumps(results, indent=1))
    print(f"wrote {args.out}", flush=True)


if __name__ == "__main__":
    main()
