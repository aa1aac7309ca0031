"""A server's reactor lag, seen from outside: the round trip of a WebSocket ping (bench/storm.py).

Both the gateway and bench/reference_server.py answer a ping on their reactor thread, so its
round trip is the time the reactor takes to come round to the probe's socket.
"""

import socket
import threading
import time

from support.rawwebsocket import handshake, split_frames, upgrade_request


class LagProbe(threading.Thread):
    """A server's reactor lag: the round trip of a WebSocket ping (masked, zero mask) every
    ``period`` s on a connection of its own; samples are (unix time sent, seconds)."""

    def __init__(self, port, path, headers, period):
        super().__init__(daemon=True)
        self.period = period
        self.samples = []
        self.error = None
        self._stopping = threading.Event()
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=30)
        self.buffer = handshake(self.sock, upgrade_request(f"127.0.0.1:{port}", path, "chat.v1.proto", headers))

    def run(self):
        n = 0
        try:
            while not self._stopping.is_set():
                n += 1
                payload = n.to_bytes(4, "big")
                wall, sent = time.time(), time.monotonic()
                self.sock.sendall(bytes([0x89, 0x84]) + b"\0\0\0\0" + payload)
                self._until_pong(payload)
                self.samples.append((wall, time.monotonic() - sent))
                self._stopping.wait(max(0.0, sent + self.period - time.monotonic()))
        except Exception as e:  # the figure says the probe stopped; the run goes on
            self.error = repr(e)

    def _until_pong(self, payload):
        while True:
            frames, self.buffer = split_frames(self.buffer)
            answered = False
            for opcode, data in frames:
                if opcode == 10 and data == payload:
                    answered = True
                elif opcode == 9:  # the server's heartbeat
                    self.sock.sendall(bytes([0x8A, 0x80 | len(data)]) + b"\0\0\0\0" + data)
                elif opcode == 8:
                    raise RuntimeError("the server closed the probe")
            if answered:
                return
            chunk = self.sock.recv(65536)
            if not chunk:
                raise RuntimeError("the probe's connection ended")
            self.buffer += chunk

    def stop(self):
        self._stopping.set()
        self.join(10)
        self.sock.close()

    def figures(self, start, end):
        """Lag before ``start`` (baseline) and within [start, end] (the storm), in ms."""
        before = sorted(rtt for t, rtt in self.samples if t < start)
        during = sorted(rtt for t, rtt in self.samples if start <= t <= end)

        def ms(values, q):
            return round(values[min(len(values) - 1, int(q * len(values)))] * 1000, 2) if values else None

        return {
            "baseline_p50_ms": ms(before, 0.5),
            "storm_p50_ms": ms(during, 0.5),
            "storm_p99_ms": ms(during, 0.99),
            "peak_ms": round(during[-1] * 1000, 2) if during else None,
            "samples": len(during),
            "probe_error": self.error,
        }
