"""What one gateway process can open per second, and what a refusal by MAX_CONNECTS_PER_SECOND costs.

    .venv/bin/python bench/connect_rate.py --devices 2000 --refusals 5000 --repeats 3

Per repeat, each on a freshly started server pinned to CPU 0 (the reference core, Redis
and the load process on CPU 1), the same load process (this file with ``--client``: asyncio,
raw sockets, ``--concurrency`` upgrades in flight) opens:

1. reference: ``--devices`` upgrades of bench/reference_server.py (no auth): 101s per second;
2. open: ``--devices`` upgrades of a gateway with ``MAX_CONNECTS_PER_SECOND=0``, each with its
   own HS256 JWT, each until its ``connected`` frame (the token verified, the core's
   SearchRooms answered, the session registered): connects per second;
3. refuse: ``--refusals`` upgrades of a gateway with ``MAX_CONNECTS_PER_SECOND=1`` (burst 1):
   all but one are answered 503 by the router before Autobahn parses them;
4. limited: ``--refusals`` upgrades as fast as the client goes, of a gateway with
   ``MAX_CONNECTS_PER_SECOND=--limit`` (burst: one second's worth): how many got in, against
   the burst + the rate x the elapsed time.

Reported: rates (medians of the repeats, each next to the failed/unanswered count), the
server's CPU per connect and per refusal (/proc utime+stime over the phase; steadier than
rates on a busy machine), their ratios, and the ratio to the reference. JSON goes to
bench/out/connect_rate.json. The default of MAX_CONNECTS_PER_SECOND is chosen from phase 2
(docs/security.md#storm-control).
"""

import argparse
import asyncio
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from suite import LOAD_CPU, SERVER_CPU, cpu_seconds, kill_tree, pinned, spawn, wait_port  # noqa: E402

from chatgateway.auth.devtokens import mint_token  # noqa: E402
from support.processes import TWISTD, free_port  # noqa: E402
from support.rawwebsocket import upgrade_request  # noqa: E402
from support.redis import RedisServer  # noqa: E402

SECRET = "connect-rate-bench-secret-0123456789abcdef0"
OUT = HERE / "out"


# --------------------------------------------------------------------------- the load process


async def _one(port, request, want_frame, held):
    """The HTTP status of one upgrade (after the first frame when ``want_frame``), or 0 on failure."""
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(request)
        head = await reader.readuntil(b"\r\n\r\n")
        status = int(head.split(b" ", 2)[1])
        if status == 101 and want_frame:
            await reader.readexactly(2)  # the header of `connected`: the session is open
            held.append(writer)
        elif status == 101:
            held.append(writer)
        else:
            writer.close()
        return status
    except (OSError, asyncio.IncompleteReadError, ValueError, IndexError):
        return 0


async def _load(args):
    requests = [line.encode().replace(b"\\r\\n", b"\r\n") for line in Path(args.requests).read_text().splitlines()]
    held, statuses = [], []
    queue = iter(requests)

    async def worker():
        for request in queue:
            statuses.append(await _one(args.port, request, args.want_frame, held))

    started = time.monotonic()
    await asyncio.gather(*(worker() for _ in range(args.concurrency)))
    seconds = time.monotonic() - started
    for writer in held:
        writer.close()
    counts = {}
    for status in statuses:
        counts[str(status)] = counts.get(str(status), 0) + 1
    return {"seconds": seconds, "statuses": counts, "client_cpu": time.process_time()}


def client_main(argv):
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--requests", required=True)
    parser.add_argument("--concurrency", type=int, default=48)
    parser.add_argument("--want-frame", action="store_true")
    args = parser.parse_args(argv)
    print(json.dumps(asyncio.run(_load(args))), flush=True)


# --------------------------------------------------------------------------- the runs


def requests_file(kind, count, port):
    """Upgrade requests, one per line (CRLFs escaped), minted before anything is timed."""
    path = Path(tempfile.mkstemp(prefix=f"connect-rate-{kind}-", suffix=".txt")[1])
    lines = []
    for i in range(count):
        if kind == "reference":
            request = upgrade_request(f"127.0.0.1:{port}", "/?room=bench")
        else:
            token = mint_token(SECRET, f"p{i}", device_id="d", audience="service_chat_gateway", ttl=3600)
            request = upgrade_request(f"127.0.0.1:{port}", "/ws", "chat.v1.proto", {"Authorization": f"Bearer {token}"})
        lines.append(request.decode().replace("\r\n", "\\r\\n"))
    path.write_text("\n".join(lines) + "\n")
    return path


def measure(server, port, kind, count, concurrency, want_frame):
    path = requests_file(kind, count, port)
    argv = [sys.executable, __file__, "--client", "--port", str(port), "--requests", str(path)]
    argv += ["--concurrency", str(concurrency)] + (["--want-frame"] if want_frame else [])
    before = cpu_seconds(server.pid)
    done = subprocess.run(pinned(LOAD_CPU, argv), capture_output=True, text=True, timeout=600)
    server_cpu = cpu_seconds(server.pid) - before
    path.unlink()
    if done.returncode != 0:
        raise RuntimeError(done.stderr)
    result = json.loads(done.stdout.strip().splitlines()[-1])
    result["server_cpu"] = server_cpu
    return result


def start_reference(redis):
    port = free_port()
    argv = [sys.executable, str(HERE / "reference_server.py"), "--port", str(port), "--redis", redis.uri]
    process = spawn(pinned(SERVER_CPU, argv), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_port(port, process)
    return process, port


def start_gateway(core_port, limit, log, burst=None):
    port = free_port()
    env = {
        **os.environ,
        "JWT_SECRET": SECRET,
        "OAUTH2_ISSUER": "",
        "HTTP_PORT": str(port),
        "HTTP_INTERFACE": "127.0.0.1",
        "GRPC_PORT": str(free_port()),
        "CHAT_SERVICE_URI": f"127.0.0.1:{core_port}",
        "MAX_CONNECTS_PER_SECOND": str(limit),
        "CONNECT_BURST": str(burst or ""),
        "MAX_UNAUTHENTICATED_PER_ADDRESS": "0",  # every device comes from 127.0.0.1
        "LOG_LEVEL": "warning",
    }
    argv = [*TWISTD, "--nodaemon", "--pidfile=", "chatgateway", "--workers", "1"]
    process = spawn(pinned(SERVER_CPU, argv), cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    wait_port(port, process)
    time.sleep(1.0)  # the gRPC edge and the core client settle
    return process, port


def run_phase(name, start, kind, count, options, want_frame):
    process, port = start()
    try:
        result = measure(process, port, kind, count, options.concurrency, want_frame)
    finally:
        kill_tree(process)
    statuses = result["statuses"]
    wanted = statuses.get("503" if name == "refuse" else "101", 0)
    answered = statuses.get("101", 0) + statuses.get("503", 0)
    result.update(
        phase=name,
        rate=wanted / result["seconds"],
        server_cpu_ms_each=1000 * result["server_cpu"] / max(1, wanted),
        lost=count - (answered if name in ("refuse", "limited") else wanted),
    )
    if name == "limited":
        result["expected_admitted"] = options.limit + options.limit * result["seconds"]
    print(
        f"{name:9} {wanted:6d} in {result['seconds']:6.2f} s: {result['rate']:8.0f}/s, "
        f"server CPU {result['server_cpu_ms_each']:.3f} ms each, client CPU {result['client_cpu']:.1f} s, "
        f"statuses {statuses}, unanswered/failed {result['lost']}",
        flush=True,
    )
    return result


def main():
    if len(sys.argv) > 1 and sys.argv[1] == "--client":
        client_main(sys.argv[2:])
        return
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--devices", type=int, default=2000)
    parser.add_argument("--refusals", type=int, default=5000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--concurrency", type=int, default=48)
    parser.add_argument(
        "--limit",
        type=int,
        default=400,
        help="MAX_CONNECTS_PER_SECOND of the limited phase (below what the process opens)",
    )
    options = parser.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    log = open(OUT / "connect_rate-servers.log", "ab")
    runs = []
    redis = RedisServer()  # the reference server's subscription (it fans out nothing here)
    try:
        core_port = free_port()
        core_env = {**os.environ, "JWT_SECRET": SECRET, "LOG_LEVEL": "warning"}
        core_argv = [*TWISTD, "--nodaemon", "--pidfile=", "chatcore", "--port", str(core_port)]
        core = spawn(pinned(LOAD_CPU, core_argv), cwd=ROOT, env=core_env, stdout=log, stderr=subprocess.STDOUT)
        try:
            wait_port(core_port, core)
            for repeat in range(options.repeats):
                print(f"repeat {repeat + 1}/{options.repeats}", flush=True)
                runs.append(
                    [
                        run_phase(
                            "reference", lambda: start_reference(redis), "reference", options.devices, options, False
                        ),
                        run_phase(
                            "open", lambda: start_gateway(core_port, 0, log), "gateway", options.devices, options, True
                        ),
                        run_phase(
                            "refuse",
                            lambda: start_gateway(core_port, 1, log, 1),
                            "gateway",
                            options.refusals,
                            options,
                            False,
                        ),
                        run_phase(
                            "limited",
                            lambda: start_gateway(core_port, options.limit, log),
                            "gateway",
                            options.refusals,
                            options,
                            True,
                        ),
                    ]
                )
        finally:
            kill_tree(core)
    finally:
        redis.cleanup()
    summary = {}
    for index, name in enumerate(("reference", "open", "refuse", "limited")):
        phase = [run[index] for run in runs]
        summary[name] = {
            "rate_median": statistics.median(r["rate"] for r in phase),
            "rates": [round(r["rate"]) for r in phase],
            "server_cpu_ms_each_median": statistics.median(r["server_cpu_ms_each"] for r in phase),
            "lost": [r["lost"] for r in phase],
        }
    reference = summary["reference"]["rate_median"]
    opened, refused = summary["open"], summary["refuse"]
    print()
    print(f"reference  {reference:8.0f} upgrades/s (medians of {options.repeats}; lost {summary['reference']['lost']})")
    print(
        f"open       {opened['rate_median']:8.0f} connects/s = {opened['rate_median'] / reference:.2f}x the reference; "
        f"{opened['server_cpu_ms_each_median']:.3f} ms CPU each (lost {opened['lost']})"
    )
    print(
        f"refuse     {refused['rate_median']:8.0f} refusals/s = {refused['rate_median'] / reference:.2f}x; "
        f"{refused['server_cpu_ms_each_median']:.3f} ms CPU each, "
        f"{opened['server_cpu_ms_each_median'] / refused['server_cpu_ms_each_median']:.1f}x cheaper than a connect "
        f"(lost {refused['lost']})"
    )
    limited = [run[3] for run in runs]
    print(
        "limited    admitted "
        + ", ".join(
            f"{r['statuses'].get('101', 0)} of {options.refusals} in {r['seconds']:.2f} s "
            f"(burst + rate x elapsed = {r['expected_admitted']:.0f}; unanswered {r['lost']})"
            for r in limited
        )
    )
    record = {
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
        "options": vars(options),
        "summary": summary,
        "runs": runs,
    }
    (OUT / "connect_rate.json").write_text(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()
