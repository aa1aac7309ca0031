"""CPU per SearchRooms call to the core: the gateway's client against grpc.aio.

    .venv/bin/python bench/core_call_cost.py [--calls 5000] [--concurrency 24] [--rounds 2]

Every new device costs the gateway one SearchRooms call (its memberships). This
measures what such a call costs the calling process in CPU, all threads
included, two ways, in alternating rounds:

- ``client``: chatgateway.core.client.CoreClient as the gateway uses it (sync grpcio
  stubs on its own threads, chatgateway.core.blockingcalls; answers on the reactor);
- ``aio``: grpc.aio on an asyncio loop in a thread of its own, each call handed
  to it with ``run_coroutine_threadsafe`` and answered with ``callFromThread``
  (how the gateway would use grpc.aio from the reactor).

The reference core (`twistd chatcore`) runs on CPU 1; each measuring process on
CPU 0, with at most --concurrency calls in flight, after 200 calls of warm-up.
Reported: calls/s and CPU microseconds per call (getrusage of the whole
process). The core's own cost is not in the figure.
"""

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from suite import LOAD_CPU, SERVER_CPU, kill_tree, pinned, spawn, wait_port  # noqa: E402

from support.processes import TWISTD, free_port  # noqa: E402

SECRET = "bench-core-call-secret-0123456789abcdef0123"
PROFILES = 200


def measure(target, mode, calls, concurrency):
    """Runs in the measuring process: prints 'mode calls_per_second cpu_us_per_call'."""
    import asyncio
    import resource
    import threading

    import grpc
    from twisted.internet import defer, reactor

    from chatgateway.api import chat_pb2 as pb
    from chatgateway.auth.devtokens import mint_token
    from chatgateway.core.client import CoreClient

    tokens = [mint_token(SECRET, f"p{i}", audience="service_chat_gateway") for i in range(PROFILES)]
    request = pb.SearchRoomsRequest(page_size=500)

    if mode == "client":
        client = CoreClient(target, reactor, 5.0, 16, "bench")
        client.start()

        def one(i):
            return client.call("SearchRooms", request, tokens[i % PROFILES], "d")
    else:
        loop = asyncio.new_event_loop()
        threading.Thread(target=loop.run_forever, daemon=True).start()

        async def make():
            channel = grpc.aio.insecure_channel(target)
            return channel.unary_stream(
                "/chat.v1.ChatService/SearchRooms",
                request_serializer=pb.SearchRoomsRequest.SerializeToString,
                response_deserializer=pb.SearchRoomsResponse.FromString,
            )

        stub = asyncio.run_coroutine_threadsafe(make(), loop).result()

        async def call(metadata):
            return [page async for page in stub(request, timeout=5, metadata=metadata)]

        def one(i):
            metadata = (
                ("authorization", f"Bearer {tokens[i % PROFILES]}"),
                ("x-gateway-id", "bench"),
                ("x-device-id", "d"),
            )
            d = defer.Deferred()
            future = asyncio.run_coroutine_threadsafe(call(metadata), loop)
            future.add_done_callback(
                lambda f: (
                    reactor.callFromThread(d.errback, f.exception())
                    if f.exception()
                    else reactor.callFromThread(d.callback, f.result())
                )
            )
            return d

    def cpu():
        usage = resource.getrusage(resource.RUSAGE_SELF)
        return usage.ru_utime + usage.ru_stime

    async def run():
        try:
            await defer.gatherResults([one(i) for i in range(200)])  # warm-up
            limit = defer.DeferredSemaphore(concurrency)
            cpu0, t0 = cpu(), time.monotonic()
            await defer.gatherResults([limit.run(one, i) for i in range(calls)])
            cpu1, t1 = cpu(), time.monotonic()
            print(f"{mode} {calls / (t1 - t0):.0f} {(cpu1 - cpu0) / calls * 1e6:.0f}", flush=True)
        finally:
            reactor.stop()

    reactor.callWhenRunning(lambda: defer.ensureDeferred(run()))
    reactor.run()


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calls", type=int, default=5000)
    parser.add_argument("--concurrency", type=int, default=24)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--measure", nargs=2, metavar=("TARGET", "MODE"), help=argparse.SUPPRESS)
    options = parser.parse_args()
    if options.measure:
        measure(*options.measure, options.calls, options.concurrency)
        return
    port = free_port()
    env = {**os.environ, "JWT_SECRET": SECRET, "LOG_LEVEL": "warning"}
    core = spawn(
        pinned(LOAD_CPU, [*TWISTD, "--nodaemon", "--pidfile=", "chatcore", "--port", str(port)]),
        env=env,
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_port(port, core)
        results = {"client": [], "aio": []}
        for _ in range(options.rounds):
            for mode in results:
                argv = [
                    "taskset",
                    "-c",
                    SERVER_CPU,
                    sys.executable,
                    __file__,
                    "--calls",
                    str(options.calls),
                    "--concurrency",
                    str(options.concurrency),
                    "--measure",
                    f"127.0.0.1:{port}",
                    mode,
                ]
                done = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
                line = done.stdout.split()
                if len(line) != 3:
                    raise SystemExit(f"{mode}: no result; its stderr ends with:\n{done.stderr[-2000:]}")
                results[mode].append((float(line[1]), float(line[2])))
                print(f"{mode:6}: {line[1]:>6} calls/s, {line[2]:>4} us of CPU per call", flush=True)
        for mode, runs in results.items():
            cpus = sorted(c for _, c in runs)
            print(f"{mode:6}: CPU per call {cpus[0]:.0f}-{cpus[-1]:.0f} us over {len(runs)} rounds")
    finally:
        kill_tree(core)


if __name__ == "__main__":
    main()
