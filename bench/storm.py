"""The reconnect storm: a server holding N devices is SIGKILLed; they reconnect to a second one.

    .venv/bin/python bench/storm.py                          # 10,000 devices, 3 repeats (about 5 minutes)
    .venv/bin/python bench/storm.py --devices 2000 --repeats 1 --systems gateway

Per repeat, afresh: a redis-server on a free port and the reference core (`twistd
chatcore`) on it, rooms of --room-size consecutive profiles created through the core; then
for each system (the order alternates between repeats):

- gateway: two `twistd chatgateway` on that Redis (CACHE_URI, the bus too), the core at
  the reference core;
- gateway-uncached (not by default): the same, with the membership cache and the connection-rate
  limit off (MEMBERSHIP_CACHE_TTL_SEC=0, MAX_CONNECTS_PER_SECOND=0): every connect asks the core;
- reference: two bench/reference_server.py (bare Twisted + Autobahn, no auth, no core, no
  Redis writes), so the same client and backoff give the floor of what absorbing the
  reconnections costs.

N devices (tests/support/stormdevices.py, spread over client processes, each from a
loopback address of its own) connect to the first server and wait for `connected`; MARK;
the first server is SIGKILLed; each device reconnects to the second after full-jitter
exponential backoff (honouring 503/429 Retry-After and a close reason's "reconnect in X s").

Reported per system: seconds from the kill until the last device got `connected` again
(reconnects/s = N / that), per-device loss-to-`connected` times, refusals (HTTP 503/429
answered, Retry-After waits), the core calls the surviving gateway made meanwhile (its
/metrics: every call to the core is counted there) and the core's CPU seconds, the CPU
seconds of the surviving server and Redis commands per reconnect, and the peak reactor lag
of the surviving server: a probe connection of its own sends a WebSocket ping every
--sample-ms and times the pong (answered on the reactor thread, by both systems). Medians
over --repeats; the gateway's figures as ratios to the reference's of the same repeat.

Placement (2 CPUs): the servers on CPU 0 (taskset; the first is dead during the storm, so
the survivor has it alone); the clients, Redis, the core and this process (the probe) on
CPU 1. Results: bench/out/storm.json; bench/RESULTS.md, "Reconnect storm".
"""

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
OUT = HERE / "out"
sys.path.insert(0, str(ROOT / "tests"))

from lagprobe import LagProbe  # noqa: E402
from stormprocesses import (  # noqa: E402
    GATEWAYS,
    LOAD_CPU,
    SECRET,
    Clients,
    cpu_seconds,
    make_rooms,
    pin_threads,
    start_core,
    start_servers,
)

from chatgateway.auth.devtokens import mint_token  # noqa: E402
from support.redis import RedisServer  # noqa: E402
from support.scrape import active_connections, calls_between, core_calls  # noqa: E402


def redis_commands(client):
    return sum(v["calls"] for v in client.info("commandstats").values())


def median(values):
    values = [v for v in values if v is not None]
    return round(statistics.median(values), 3) if values else None


# --------------------------------------------------------------------------- one storm


def storm(system, args, redis_client, redis_uri, core, log_dir):
    """One storm of ``system``: its figures."""
    servers = start_servers(system, redis_uri, core.port, log_dir, dict(e.split("=", 1) for e in args.gateway_env))
    first, second = servers
    clients = probe = None
    try:
        probe_headers = {}
        if system in GATEWAYS:
            token = mint_token(SECRET, "storm-probe", device_id="probe", audience="service_chat_gateway", ttl=86400)
            probe_headers["Authorization"] = f"Bearer {token}"
        probe = LagProbe(second.port, "/?room=probe" if system == "reference" else "/ws", probe_headers, args.sample)
        probe.start()
        clients = Clients(system, servers, args, log_dir)
        started = time.monotonic()
        initial = clients.ready(timeout=900)
        initial_seconds = time.monotonic() - started
        connected = sum(f["connected"] for f in initial)
        result = {
            "system": system,
            "devices": args.devices,
            "initial": {
                "connected": connected,
                "seconds": round(initial_seconds, 2),
                "handshakes_per_second": round(connected / initial_seconds, 1),
            },
        }
        if system in GATEWAYS:
            result["initial"]["core_calls"] = core_calls(first.port)
            result["initial"]["active_connections"] = active_connections(first.port)
        time.sleep(args.settle)  # the connects' writes land, the first heartbeat passes
        calls_before = core_calls(second.port, by_status=True) if system in GATEWAYS else {}
        cpu_before = {"server": cpu_seconds(second.pid), "core": cpu_seconds(core.pid)}
        commands_before = redis_commands(redis_client)
        marks = [float(line) for line in clients.command("MARK")]
        killed_at = time.time()
        first.kill()  # SIGKILL: no drain, no close frames
        deadline = time.monotonic() + args.timeout
        while True:
            stats = clients.stats()
            back = sum(s["reconnected"] for s in stats)
            if back >= args.devices or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        done_at = max((s["last_connected"] or killed_at for s in stats), default=killed_at)
        time.sleep(1.0)  # the probe sees the tail, the server's last writes land
        stats = clients.stats()
        cpu_after = {"server": cpu_seconds(second.pid), "core": cpu_seconds(core.pid)}
        calls = calls_between(core_calls(second.port, by_status=True), calls_before) if system in GATEWAYS else {}
        commands = redis_commands(redis_client) - commands_before
        recovery = done_at - killed_at
        refused, close_codes = {}, {}
        for s in stats:
            for status, n in s["refused"].items():
                refused[status] = refused.get(status, 0) + n
            for code, n in s["close_reasons"].items():
                close_codes[code] = close_codes.get(code, 0) + n
        result.update(
            {
                "mark_skew_s": round(killed_at - min(marks), 3),
                "reconnected": back,
                "all_back": back >= args.devices,
                "recovery_seconds": round(recovery, 3),
                "reconnects_per_second": round(back / max(recovery, 0.001), 1),
                "reconnect_ms": {
                    "p50": median([s["reconnect_ms"]["p50"] for s in stats if s["reconnect_ms"]]),
                    "p99": max((s["reconnect_ms"]["p99"] for s in stats if s["reconnect_ms"]), default=None),
                    "max": max((s["reconnect_ms"]["max"] for s in stats if s["reconnect_ms"]), default=None),
                },
                "core_calls": calls,
                "core_calls_total": sum(calls.values()),
                "core_calls_share": round(sum(calls.values()) / args.devices, 4),
                "core_calls_ok": sum(n for key, n in calls.items() if key.endswith(" OK")),
                "core_cpu_seconds": round(cpu_after["core"] - cpu_before["core"], 2),
                "server_cpu_seconds": round(cpu_after["server"] - cpu_before["server"], 2),
                "server_cpu_ms_per_reconnect": round(
                    (cpu_after["server"] - cpu_before["server"]) * 1000 / max(1, back), 3
                ),
                "redis_commands_per_reconnect": round(commands / max(1, back), 2),
                "refused": refused,
                "attempts": sum(s["attempts"] for s in stats),
                "retry_after_waits": sum(s["retry_after"] for s in stats),
                "retry_after_max_s": max(s["retry_after_max"] for s in stats),
                "told_waits": sum(s["told"] for s in stats),
                "backoff_waits": sum(s["backoff"] for s in stats),
                "connect_errors": sum(s["connect_errors"] for s in stats),
                "close_codes": close_codes,
                "timeouts": sum(s["timeouts"] for s in stats),
                "lag": probe.figures(killed_at, done_at),
            }
        )
        if system in GATEWAYS:
            result["active_connections_after"] = active_connections(second.port) - 1  # the probe
        return result
    finally:
        for cleanup in [probe and probe.stop, clients and clients.stop, *(s.stop for s in servers)]:
            try:
                if cleanup:
                    cleanup()
            except Exception as e:  # the next cleanups still run; atexit kills what is left
                print(f"  cleanup: {e!r}", flush=True)


def summarize(runs, systems):
    """Medians per system over the repeats, and the gateway's ratios to the reference of the same repeat."""
    keys = [
        "recovery_seconds",
        "reconnects_per_second",
        "core_calls_total",
        "core_calls_share",
        "core_calls_ok",
        "core_cpu_seconds",
        "server_cpu_ms_per_reconnect",
        "redis_commands_per_reconnect",
        "attempts",
        "retry_after_waits",
    ]
    summary = {}
    for system in systems:
        mine = [r[system] for r in runs if system in r and "error" not in r[system]]
        if not mine:
            continue
        figures = {k: median([r[k] for r in mine]) for k in keys}
        figures["lag_peak_ms"] = median([r["lag"]["peak_ms"] for r in mine])
        figures["lag_p99_ms"] = median([r["lag"]["storm_p99_ms"] for r in mine])
        figures["lag_baseline_p50_ms"] = median([r["lag"]["baseline_p50_ms"] for r in mine])
        figures["refused_503"] = median([r["refused"].get("503", 0) for r in mine])
        figures["refused_429"] = median([r["refused"].get("429", 0) for r in mine])
        figures["reconnect_p99_ms"] = median([r["reconnect_ms"]["p99"] for r in mine])
        figures["initial_handshakes_per_second"] = median([r["initial"]["handshakes_per_second"] for r in mine])
        figures["all_back"] = all(r["all_back"] for r in mine)
        figures["repeats"] = len(mine)
        summary[system] = figures
    ratios = {}
    for system in systems:
        if system not in GATEWAYS:
            continue
        pairs = [
            r
            for r in runs
            if "error" not in r.get(system, {"error": 1}) and "error" not in r.get("reference", {"error": 1})
        ]
        if not pairs:
            continue
        ratios[system] = {
            "recovery_time_over_reference": median(
                [p[system]["recovery_seconds"] / max(0.001, p["reference"]["recovery_seconds"]) for p in pairs]
            ),
            "reconnects_per_second_over_reference": median(
                [
                    p[system]["reconnects_per_second"] / max(0.001, p["reference"]["reconnects_per_second"])
                    for p in pairs
                ]
            ),
            "lag_peak_over_reference": median(
                [
                    p[system]["lag"]["peak_ms"] / p["reference"]["lag"]["peak_ms"]
                    for p in pairs
                    if p[system]["lag"]["peak_ms"] and p["reference"]["lag"]["peak_ms"]
                ]
            ),
        }
    if ratios:
        summary["ratios"] = ratios
    return summary


def print_run(result):
    lag = result["lag"]
    print(
        f"  {result['system']:9} {result['reconnected']:>6}/{result['devices']} back in {result['recovery_seconds']:.2f} s "
        f"({result['reconnects_per_second']:,.0f}/s), core calls {result['core_calls_total']} "
        f"({result['core_calls_share']:.2%}) {result['core_calls']}, refused {result['refused']}, "
        f"lag peak {lag['peak_ms']} ms p99 {lag['storm_p99_ms']} ms (baseline {lag['baseline_p50_ms']} ms), "
        f"server {result['server_cpu_ms_per_reconnect']} ms CPU/reconnect, core {result['core_cpu_seconds']} s CPU",
        flush=True,
    )


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--devices", type=int, default=10000)
    parser.add_argument("--profiles", type=int, default=0, help="devices share this many profiles (0: one each)")
    parser.add_argument("--room-size", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--systems", default="reference,gateway", help="of reference, " + ", ".join(GATEWAYS))
    parser.add_argument("--per-client", type=int, default=5000, help="devices per client process")
    parser.add_argument("--concurrency", type=int, default=48, help="first connects in flight, over all clients")
    parser.add_argument("--base", type=float, default=1.0, help="the devices' backoff base (s)")
    parser.add_argument("--cap", type=float, default=60.0, help="the devices' backoff cap (s)")
    parser.add_argument("--sample", type=float, default=0.05, help="s between lag probes")
    parser.add_argument("--settle", type=float, default=3.0, help="s between all connected and the kill")
    parser.add_argument("--timeout", type=float, default=300.0, help="s to wait for every device to come back")
    parser.add_argument("--gateway-env", action="append", default=[], help="KEY=VALUE for both gateways")
    parser.add_argument("--out", default=str(OUT / "storm.json"))
    args = parser.parse_args()
    systems = [s for s in args.systems.split(",") if s]
    OUT.mkdir(parents=True, exist_ok=True)
    log_dir = OUT / "storm-logs"
    shutil.rmtree(log_dir, ignore_errors=True)  # this run's logs only
    log_dir.mkdir(parents=True)
    os.sched_setaffinity(0, {int(LOAD_CPU)})
    document = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "commit": subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT
        ).stdout.strip(),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()},
        "options": vars(args),
        "runs": [],
    }
    for repeat in range(args.repeats):
        print(f"repeat {repeat + 1} of {args.repeats}", flush=True)
        redis_server = RedisServer()
        pin_threads(redis_server.process.pid, LOAD_CPU)
        redis_client = redis_server.client(decode_responses=False)
        core = start_core(redis_server.uri, log_dir)
        run = {}
        try:
            document["machine"]["redis"] = redis_client.info("server")["redis_version"]
            make_rooms(core.port, redis_client, args.profiles or args.devices, args.room_size)
            order = systems if repeat % 2 == 0 else systems[::-1]
            for system in order:
                try:
                    run[system] = storm(system, args, redis_client, redis_server.uri, core, log_dir)
                    print_run(run[system])
                except Exception as e:
                    run[system] = {"error": repr(e)}
                    print(f"  {system}: failed: {e!r}", flush=True)
        finally:
            core.stop()
            redis_client.close()
            redis_server.cleanup()
        document["runs"].append(run)
        document["summary"] = summarize(document["runs"], systems)
        Path(args.out).write_text(json.dumps(document, indent=2) + "\n")
    print(json.dumps(document["summary"], indent=2))


if __name__ == "__main__":
    main()
