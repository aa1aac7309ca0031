"""gRPC load client for bench/grpc_vs_ws.py: N receiving devices on ``Connect`` streams.

The gRPC counterpart of bench/fanout_client.py, with the same contract on stdin/stdout
(READY <n> <seconds> {json}; RESET; STATS {json}; QUIT) and the same latency sampling
(every SAMPLE_EVERY-th event of a stream, from the publisher's send time, which is the
ServerEvent's id: field 1, the first bytes of the message). grpc.aio on one asyncio loop;
every device has a channel (an HTTP/2 connection) of its own, as real devices do, and
its events are counted as raw bytes (no protobuf parse). With ``--profile`` every device
is that profile, device ids ``d<index>``; otherwise profiles PREFIX<index>, device ``b``.
A device sends an empty StreamRequest (a heartbeat) every HEARTBEAT_SEC.
"""

import argparse
import asyncio
import json
import sys
import threading
import time

import grpc

from chatgateway.auth.devtokens import mint_token

SAMPLE_EVERY = 4
MAX_SAMPLES = 400_000
HEARTBEAT_SEC = 10.0
CONNECT_METHOD = "/chat.v1.ChatService/Connect"


def _identity(data):
    return data


class Counters:
    def __init__(self):
        self.reset()

    def reset(self):
        self.messages = 0
        self.latencies = []

    def stats(self, closed):
        lat = sorted(self.latencies)

        def pct(p):
            return round(lat[min(len(lat) - 1, int(p * len(lat)))] * 1000, 2) if lat else None

        return {
            "messages": self.messages,
            "samples": len(lat),
            "p50_ms": pct(0.5),
            "p99_ms": pct(0.99),
            "max_ms": round(lat[-1] * 1000, 2) if lat else None,
            "closed": closed,
        }


class Device:
    """One Connect stream: waits for ``connected``, then counts what arrives."""

    def __init__(self, target, token, counters, channel=None):
        self.counters = counters
        self.closed = False
        self.end = None
        self.frames = 0
        self.started = time.monotonic()
        self.connected_at = None
        self.own_channel = channel is None
        self.channel = channel or grpc.aio.insecure_channel(target, options=[("grpc.use_local_subchannel_pool", 1)])
        connect = self.channel.stream_stream(
            CONNECT_METHOD, request_serializer=_identity, response_deserializer=_identity
        )
        self.call = connect(metadata=(("authorization", f"Bearer {token}"),))

    async def open(self):
        first = await self.call.read()
        if first is grpc.aio.EOF:
            raise RuntimeError(f"stream ended before connected: {await self.call.code()}")
        self.connected_at = time.monotonic()

    async def run(self):
        counters = self.counters
        call = self.call
        try:
            while True:
                raw = await call.read()
                if raw is grpc.aio.EOF:
                    break
                counters.messages += 1
                self.frames += 1
                if self.frames % SAMPLE_EVERY == 0 and raw[:1] == b"\x0a" and len(counters.latencies) < MAX_SAMPLES:
                    try:
                        latency = time.time() - float(raw[2 : 2 + raw[1]])
                    except ValueError:
                        latency = None
                    if latency is not None and latency < 3600:
                        counters.latencies.append(latency)
        except (grpc.RpcError, asyncio.CancelledError) as e:
            self.end = repr(e)
        self.closed = True

    async def heartbeat(self):
        try:
            while not self.closed:
                await asyncio.sleep(HEARTBEAT_SEC)
                await self.call.write(b"")
        except (grpc.RpcError, asyncio.InvalidStateError, asyncio.CancelledError):
            pass


def _summary(seconds):
    if not seconds:
        return None
    ms = sorted(s * 1000 for s in seconds)
    return {
        "mean": round(sum(ms) / len(ms), 2),
        "p50": round(ms[len(ms) // 2], 2),
        "p99": round(ms[min(len(ms) - 1, int(0.99 * len(ms)))], 2),
        "max": round(ms[-1], 2),
    }


def _stdin_lines(loop, queue):
    for line in sys.stdin:
        loop.call_soon_threadsafe(queue.put_nowait, line.strip())
    loop.call_soon_threadsafe(queue.put_nowait, "QUIT")


def _say(line):
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


async def main(argv):
    parser = argparse.ArgumentParser()
    parser.add_argument("--target", required=True, help="host:port of GRPC_PORT")
    parser.add_argument("--count", type=int, required=True)
    parser.add_argument("--first", type=int, default=0)
    parser.add_argument("--secret", required=True)
    parser.add_argument("--prefix", default="fan")
    parser.add_argument("--profile", help="every device of this one profile (device ids d<index>)")
    parser.add_argument("--concurrency", type=int, default=24)
    parser.add_argument("--shared-channel", action="store_true", help="every stream on one channel (one connection)")
    args = parser.parse_args(argv)
    counters = Counters()
    devices = []
    tasks = []

    def token(index):
        if args.profile:
            profile, device = args.profile, f"d{index}"
        else:
            profile, device = f"{args.prefix}{index}", "b"
        return mint_token(args.secret, profile, device_id=device, audience="service_chat_gateway", ttl=86400)

    shared = grpc.aio.insecure_channel(args.target) if args.shared_channel else None
    indexes = iter(range(args.first, args.first + args.count))

    async def worker():
        for index in indexes:
            device = Device(args.target, token(index), counters, shared)
            await device.open()
            devices.append(device)
            tasks.append(asyncio.ensure_future(device.run()))
            tasks.append(asyncio.ensure_future(device.heartbeat()))

    started = time.monotonic()
    await asyncio.gather(*(worker() for _ in range(args.concurrency)))
    figures = {
        "connected": len(devices),
        "failed": 0,
        "concurrency": args.concurrency,
        "seconds_to_connected": round(max((d.connected_at for d in devices), default=started) - started, 3),
        "ms_to_connected": _summary([d.connected_at - d.started for d in devices]),
    }
    _say(f"READY {len(devices)} {figures['seconds_to_connected']:.3f} {json.dumps(figures)}")
    lines = asyncio.Queue()
    threading.Thread(target=_stdin_lines, args=(asyncio.get_running_loop(), lines), daemon=True).start()
    while True:
        command = await lines.get()
        if command == "RESET":
            counters.reset()
            _say("RESET")
        elif command == "STATS":
            closed = sum(d.closed for d in devices)
            _say("STATS " + json.dumps(counters.stats(closed)))
        elif command == "QUIT":
            break
    for device in devices:
        device.call.cancel()
    for device in devices:
        if device.own_channel:
            await device.channel.close()
    if shared is not None:
        await shared.close()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1:]))
