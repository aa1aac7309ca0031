"""What the operator page's poll costs the gateway: GET /console/status.json against GET /readyz.

Starts `twistd chatgateway --dev` on free ports (the console is on in development) with
``--devices`` WebSocket devices connected from this process, then, ``--repeats`` times,
sends ``--requests`` requests of each kind on one keep-alive connection and reads the
gateway's CPU time (/proc) around them. The reference is /readyz, measured in the same run:
status.json does what it does (the readiness checks) plus the registry read and the JSON
of the status. Prints medians and writes bench/out/console_status_cost.json.

    .venv/bin/python bench/console_status_cost.py --requests 300 --repeats 5 --devices 200
"""

import argparse
import http.client
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from support.processes import Twistd, free_port  # noqa: E402

SECRET = "bench-console-secret-0123456789abcdef0123"

# Holds N WebSocket devices open until its stdin closes (a separate process: the load
# of this script's own requests stays out of the devices' way).
DEVICES = r"""
import json, sys, urllib.request, websocket
port, count = sys.argv[1], int(sys.argv[2])
held = []
for n in range(count):
    token = json.load(urllib.request.urlopen(f"http://127.0.0.1:{port}/dev/token?profile=p{n}&device=d"))["token"]
    ws = websocket.create_connection(f"ws://127.0.0.1:{port}/ws", subprotocols=["chat.v1.json"])
    ws.send(json.dumps({"authToken": token}))
    assert "connected" in ws.recv()
    held.append(ws)
print("ready", flush=True)
sys.stdin.read()
"""


def cpu_seconds(pid):
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def measure(port, pid, path, headers, requests):
    """(wall ms, gateway CPU ms) per request, over ``requests`` on one keep-alive connection."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    cpu0, wall0 = cpu_seconds(pid), time.perf_counter()
    for _ in range(requests):
        connection.request("GET", path, headers=headers)
        response = connection.getresponse()
        response.read()
        assert response.status == 200, (path, response.status)
    wall, cpu = time.perf_counter() - wall0, cpu_seconds(pid) - cpu0
    connection.close()
    return 1000 * wall / requests, 1000 * cpu / requests


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=300)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--devices", type=int, default=200)
    args = parser.parse_args()

    port, grpc_port = free_port(), free_port()
    gateway = Twistd(
        "chatgateway",
        ["--dev", "--http-port", port, "--grpc-port", grpc_port],
        env={"JWT_SECRET": SECRET, "LOG_LEVEL": "warning"},
        port=port,
        also_ports=[grpc_port],
        log_dir=tempfile.mkdtemp(prefix="bench-console-"),
    )
    with gateway:
        devices = subprocess.Popen(
            [sys.executable, "-c", DEVICES, str(port), str(args.devices)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert devices.stdout.readline().strip() == "ready"
        token = json.load(urllib.request.urlopen(f"http://127.0.0.1:{port}/dev/token?profile=op&admin=1"))["token"]
        kinds = {
            "status.json": ("/console/status.json", {"Authorization": f"Bearer {token}"}),
            "readyz": ("/readyz", {}),
        }
        runs = {kind: [] for kind in kinds}
        for _ in range(args.repeats):
            for kind, (path, headers) in kinds.items():
                runs[kind].append(measure(port, gateway.pid, path, headers, args.requests))
        devices.stdin.close()
        devices.wait(30)

    result = {"requests": args.requests, "repeats": args.repeats, "devices": args.devices}
    for kind, samples in runs.items():
        result[kind] = {
            "wall_ms": round(statistics.median(w for w, _ in samples), 3),
            "cpu_ms": round(statistics.median(c for _, c in samples), 3),
        }
    result["cpu_ratio_status_to_readyz"] = round(result["status.json"]["cpu_ms"] / result["readyz"]["cpu_ms"], 2)
    # The operator page polls every 2 s: the share of one core an open page costs.
    result["one_open_page_cpu_share"] = round(result["status.json"]["cpu_ms"] / 2000, 5)
    out = REPO / "bench" / "out"
    out.mkdir(exist_ok=True)
    (out / "console_status_cost.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
