"""The chaos test of issue #17 (docs/architecture.md#the-chaos-test): nothing is lost,
doubled or reordered while gateways are killed, drained, stopped and cut off from Redis.

Real processes: one redis-server, `twistd chatcore` publishing by the contract, two
`twistd chatgateway` (gw-0 with one process, gw-1 with `--workers 2`), 200 devices
(support/fleet.py: 199 in one process, 1 alone in another so that it can be frozen) each
in 2 of 20 rooms, resuming a third each with their token alone, their positions alone, or
both, and a publisher (support/corepublisher.py) sending numbered events
through the core over gRPC all along. Meanwhile, in this order:

1. ``CLIENT KILL TYPE pubsub``: every gateway process loses its subscriptions at once;
2. gw-1 SIGSTOPped (its processes) until Redis drops it for its output buffer
   (``client-output-buffer-limit pubsub`` set low for that), then SIGCONT;
3. SIGKILL of gw-0: its devices resume on gw-1; gw-0 is started again;
4. SIGTERM of gw-1: it drains (1001 with a reconnect hint), its devices resume on gw-0;
   gw-1 is started again;
5. the lone device's process SIGSTOPped for 5 s: its connection is cut without a close
   (the gateway times it out, 4408), then it resumes.

Then the publisher stops, and every device must hold every event of its rooms exactly
once, in order (support/deliverycheck.py), with no gap event and no DATA_LOSS reported.
A device resuming with its token alone resumes from the token's and the gateway's record
of its positions, which may be up to a heartbeat behind after a SIGKILL
(docs/protocol.md#acks): it may be given again what it holds (counted, dropped), never
anything out of order, and it must miss nothing.
"""

import json
import os
import signal
import time

import pytest

from support.deliverycheck import check
from support.deployment import OWNER, Deployment
from support.fleet import resume_with
from support.loadgen import LineProcess
from support.processes import until

pytestmark = pytest.mark.chaos

SECRET = "chaos-test-secret-0123456789abcdef0123456"
DEVICES = 200
ROOMS = 20
PREFIX = "chaos"
RATE = 40  # events/s over all rooms
RESUME = "mixed"
# devices resuming with their token alone: at least once (support/deliverycheck.py)
TOKEN_ONLY = [f"{PREFIX}{i}" for i in range(DEVICES) if resume_with(RESUME, i) == (True, False)]
SETTINGS = {
    "HEARTBEAT_INTERVAL_SEC": "1",
    "CONNECTION_TIMEOUT_SEC": "3",  # the frozen device is timed out within its 5 s
    "DRAIN_TIMEOUT_SEC": "10",
    "MAX_EVENTS_PER_SECOND": "1000",
}
LOW_PUBSUB_LIMIT = "pubsub 256kb 0 0"
DEFAULT_PUBSUB_LIMIT = "pubsub 32mb 8mb 60"
BALLAST_BYTES = 256 * 1024


def rooms_of(i):
    """The two rooms (indexes) of device i: every room gets 20 devices."""
    return i % ROOMS, (i + 1 + i // ROOMS) % ROOMS


class Run:
    """The deployment, the device processes and the publisher of one chaos run."""

    def __init__(self, tmp_path):
        self.tmp_path = tmp_path
        self.deployment = Deployment(SECRET, tmp_path, gateways=(1, 2), **SETTINGS).start()
        members = [[OWNER] for _ in range(ROOMS)]
        for i in range(DEVICES):
            for r in rooms_of(i):
                members[r].append(f"{PREFIX}{i}")
        self.rooms = self.deployment.make_rooms(members)
        self.expected = {f"{PREFIX}{i}": [self.rooms[r] for r in rooms_of(i)] for i in range(DEVICES)}
        self.fleets = []
        self.publisher = None

    def start_fleet(self, first, count):
        fleet = LineProcess(
            "tests/support/fleet.py",
            [
                "--urls",
                self.deployment.urls(),
                "--secret",
                SECRET,
                "--first",
                first,
                "--count",
                count,
                "--prefix",
                PREFIX,
                "--resume",
                RESUME,
            ],
            log_path=self.tmp_path / f"fleet-{first}.log",
        )
        self.fleets.append(fleet)
        ready = fleet.expect("READY", 90)
        assert int(ready.split()[0]) == count, ready
        return fleet

    def start_publisher(self):
        self.publisher = LineProcess(
            "tests/support/corepublisher.py",
            [
                "--core",
                self.deployment.core_target,
                "--secret",
                SECRET,
                "--owner",
                OWNER,
                "--rooms",
                ",".join(self.rooms),
                "--rate",
                RATE,
            ],
            log_path=self.tmp_path / "publisher.log",
        )
        self.publisher.expect("STARTED", 30)

    def tell(self, process, line, answer=None):
        process.send(line)
        return process.expect(answer or line.split()[0], 30)

    def stats(self):
        return [json.loads(self.tell(fleet, "STATS")) for fleet in self.fleets]

    def connected(self):
        return sum(s["connected"] for s in self.stats())

    def all_connected(self, what, timeout=60):
        until(lambda: self.connected() == DEVICES, timeout, what=f"all {DEVICES} devices connected {what}")

    def dump(self):
        records = {}
        for n, fleet in enumerate(self.fleets):
            path = self.tmp_path / f"records-{n}.json"
            self.tell(fleet, f"DUMP {path}", "DUMPED")
            records.update(json.loads(path.read_text()))
        return records

    def stop(self):
        for process in [*self.fleets, *([self.publisher] if self.publisher else [])]:
            if process.process.poll() is None:
                os.kill(process.process.pid, signal.SIGCONT)  # a frozen one must hear the QUIT
            process.stop()
        return self.deployment.stop()


@pytest.fixture
def run(tmp_path):
    run = Run(tmp_path)
    yield run
    run.stop()


def pubsub_clients(admin):
    return len(admin.execute_command("CLIENT", "LIST", "TYPE", "pubsub").splitlines())


def ballast(admin, gateway_ids):
    """Fill the subscriptions of stopped gateway processes sooner than room events would (the
    kernel buffers megabytes first): a large eviction of no session on each one's control
    channel, which a gateway that reads it ignores."""
    reason = "x" * BALLAST_BYTES
    for gateway_id in gateway_ids:
        admin.publish(
            f"gateway:ctl:{gateway_id}", json.dumps({"evict": {"session_id": "-", "code": 4000, "reason": reason}})
        )
    return True


def test_every_device_holds_every_event_once_in_order_through_kills_drains_stops_and_cuts(run):
    deployment = run.deployment
    admin = deployment.redis.client()
    lone = run.start_fleet(0, 1)
    run.start_fleet(1, DEVICES - 1)
    run.start_publisher()
    stages = []

    def stage(name):
        stages.append((name, round(time.monotonic() - started, 1)))

    started = time.monotonic()
    time.sleep(4)  # events flow: the publisher runs throughout

    stage("CLIENT KILL TYPE pubsub")
    until(lambda: pubsub_clients(admin) >= 3, 30, what="every gateway process subscribed")
    assert admin.execute_command("CLIENT", "KILL", "TYPE", "pubsub") >= 3
    time.sleep(4)

    stage("gw-1 SIGSTOPped until Redis drops it")
    until(lambda: pubsub_clients(admin) >= 3, 30, what="every gateway process subscribed again")
    subscribed = pubsub_clients(admin)
    admin.config_set("client-output-buffer-limit", LOW_PUBSUB_LIMIT)
    deployment.signal(1, signal.SIGSTOP)
    try:
        until(
            lambda: ballast(admin, ["gw-1", "gw-1-w1"]) and pubsub_clients(admin) <= subscribed - 2,
            60,
            what="Redis dropped both processes of the stopped gw-1",
        )
    finally:
        deployment.signal(1, signal.SIGCONT)
        admin.config_set("client-output-buffer-limit", DEFAULT_PUBSUB_LIMIT)
    assert "overcoming of output buffer limits" in deployment.redis.log_tail(200)
    run.all_connected("after gw-1 woke up")
    time.sleep(3)

    stage("SIGKILL gw-0")
    deployment.kill(0)
    deployment.gateways[0].start()
    run.all_connected("after gw-0 was killed")
    time.sleep(3)

    stage("SIGTERM gw-1 (drain)")
    code = deployment.gateways[1].stop(timeout=30)
    assert code == 0, deployment.gateways[1].log_tail()
    deployment.gateways[1].start()
    run.all_connected("after gw-1 drained")
    time.sleep(2)

    stage("the lone device cut for 5 s")
    os.kill(lone.process.pid, signal.SIGSTOP)
    time.sleep(5)
    os.kill(lone.process.pid, signal.SIGCONT)
    run.all_connected("after the cut")
    time.sleep(3)

    stage("publisher stopped")
    published_path = run.tmp_path / "published.json"
    run.tell(run.publisher, f"STOP {published_path}", "DONE")
    published = json.loads(published_path.read_text())
    assert sum(len(v) for v in published["sent"].values()) > RATE * 20  # it ran throughout

    def judged():
        return check(run.expected, published, run.dump(), at_least_once=TOKEN_ONLY)

    # every device holds every event (a count of events would be met early by repeats)
    until(lambda: judged().complete, 30, step=1.0)  # then judged whatever it is
    stage("judged")
    report = judged()
    stats = run.stats()
    summary = f"stages (s from the start): {stages}\npublisher errors: {published['errors']}\nfleets: {stats}\n"
    if not report.ok:  # the first faults of each device, not the Report's repr
        pytest.fail(summary + report.describe() + "\n" + deployment.logs(20), pytrace=False)
    # the faults did happen: every device resumed (the drain moved them all), the lone one
    # was timed out, the drained ones were told so
    assert all(d["resumed"] >= 1 for d in run.dump().values()), summary
    assert any(code.startswith("4408") for code in stats[0]["close_codes"]), summary
    assert any(code.startswith("1001") for code in stats[1]["close_codes"]), summary
