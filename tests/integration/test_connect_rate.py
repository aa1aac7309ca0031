"""Storm control on a real gateway process (docs/security.md#storm-control): a burst of raw
upgrades over MAX_CONNECTS_PER_SECOND, and a paced run at twice the rate, both counted by
the HTTP status each socket gets. Nothing here asserts speed: the expected admissions are
computed from the elapsed time measured, with generous bounds (the machine is shared)."""

import os
import queue
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request

import pytest

from chatgateway.api import chat_pb2 as pb
from chatgateway.auth.devtokens import mint_token
from support.fakecore import FakeCore
from support.processes import REPO_ROOT, one_gateway
from support.rawwebsocket import upgrade_request

SECRET = "storm-control-secret-0123456789abcdef0123456"
RATE = 20
BURST = 20


@pytest.fixture(scope="module")
def gateway(tmp_path_factory):
    core = FakeCore()
    core.answers["SearchRooms"] = lambda request, context: [pb.SearchRoomsResponse(data=[pb.Room(id="r1")])]
    process = one_gateway(
        tmp_path_factory.mktemp("storm"),
        core,
        SECRET,
        MAX_CONNECTS_PER_SECOND=RATE,
        CONNECT_BURST=BURST,
        MAX_UNAUTHENTICATED_PER_ADDRESS=0,  # every socket comes from 127.0.0.1
    )
    process.start()
    yield process
    code = process.stop()
    assert code == 0, process.log_tail()
    assert "Traceback (most recent call last)" not in process.log_text(), process.log_tail(80)


def send_upgrade(port, device):
    token = mint_token(SECRET, "storm", device_id=device, audience="service_chat_gateway")
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    sock.sendall(upgrade_request(f"127.0.0.1:{port}", "/ws", "chat.v1.proto", {"Authorization": f"Bearer {token}"}))
    return sock


def answer(sock):
    """(status, Retry-After or None) of the gateway's answer to an upgrade."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(4096)
        assert chunk, f"closed before an answer: {data!r}"
        data += chunk
    sock.close()
    head = data.split(b"\r\n\r\n", 1)[0].decode()
    status = int(head.split(" ", 2)[1])
    found = re.search(r"(?im)^retry-after: *(\d+)\r?$", head)
    return status, int(found.group(1)) if found else None


def refused_total(port):
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    found = re.search(
        r'chatgateway_server_connects_refused_total\{[^}]*chatgateway_transport="websocket"[^}]*\} (\S+)', text
    )
    return float(found.group(1))


def test_a_burst_gets_the_burst_and_the_rest_503_with_jittered_retry_after(gateway):
    started = time.monotonic()
    sockets = [send_upgrade(gateway.port, f"burst-{i}") for i in range(100)]
    answers = [answer(s) for s in sockets]
    elapsed = time.monotonic() - started
    statuses = [status for status, _ in answers]
    admitted = statuses.count(101)
    assert statuses.count(503) == 100 - admitted, statuses
    # The bucket was full; it refilled at RATE/s for at most the time the burst took.
    assert BURST <= admitted <= BURST + RATE * elapsed + 1, (admitted, elapsed)
    delays = [retry for status, retry in answers if status == 503]
    assert all(delay is not None and 1 <= delay <= 60 for delay in delays), delays
    assert len(set(delays)) > 1  # jittered per client
    assert refused_total(gateway.port) >= 100 - admitted


def test_at_twice_the_rate_about_the_rate_is_let_in(gateway):
    time.sleep(BURST / RATE + 0.5)  # the bucket is full again
    pace, seconds = 1.0 / (2 * RATE), 4.0
    sockets = []
    started = time.monotonic()
    for i in range(int(seconds * 2 * RATE)):
        sockets.append(send_upgrade(gateway.port, f"paced-{i}"))
        time.sleep(max(0.0, started + (i + 1) * pace - time.monotonic()))
    sent = time.monotonic() - started
    statuses = [answer(s)[0] for s in sockets]
    total = time.monotonic() - started
    admitted = statuses.count(101)
    assert statuses.count(503) == len(statuses) - admitted
    # A bucket refilling at 1/s would let in about BURST + 4 here; the rate lets in BURST + RATE x 4.
    assert 0.6 * (BURST + RATE * sent) <= admitted <= BURST + RATE * total + 1, (admitted, sent, total)


def test_the_cli_tail_waits_out_a_503_and_then_connects(gateway):
    # Keep the bucket empty with raw upgrades until tail has been refused, then let it in.
    stop = threading.Event()

    def hammer():
        i = 0
        while not stop.is_set():
            try:
                answer(send_upgrade(gateway.port, f"hammer-{i}"))
            except (OSError, AssertionError):
                pass
            i += 1
            time.sleep(0.005)

    hammering = threading.Thread(target=hammer, daemon=True)
    hammering.start()
    time.sleep(1.5)  # the burst is spent
    tail = subprocess.Popen(
        [sys.executable, "-m", "chatgateway.client.cli", "--url", f"ws://127.0.0.1:{gateway.port}/ws"]
        + ["--secret", "--as", "tailer", "tail", "r1"],
        cwd=REPO_ROOT,
        env={**os.environ, "JWT_SECRET": SECRET, "PYTHONUNBUFFERED": "1"},
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    lines = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in tail.stderr], daemon=True).start()

    def next_line(timeout):
        try:
            return lines.get(timeout=timeout)
        except queue.Empty:
            return None

    try:
        refused = next_line(30)
        stop.set()
        assert refused is not None and "HTTP 503: too many new connections" in refused, refused
        delay = float(re.search(r"reconnecting in (\d+\.\d)s", refused).group(1))
        assert 1 <= delay <= 60  # the Retry-After it was given (a whole number), or more
        started = time.monotonic()
        tailing = next_line(delay + 30)
        assert tailing is not None and tailing.startswith("tailing room r1 as tailer"), tailing
        assert time.monotonic() - started >= delay - 0.5  # it waited, it did not retry at once
    finally:
        stop.set()
        os.killpg(tail.pid, signal.SIGINT)
        assert tail.wait(30) == 0
    hammering.join(10)
