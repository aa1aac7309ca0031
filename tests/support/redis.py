"""A real redis-server for integration tests, on a free port, started and stopped by the test.

Tests never talk to a Redis they did not start (docs/architecture.md#testing-rules). redis-server
must be on PATH: without it the tests fail (CI installs it), they do not skip.
"""

import re
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import redis

from support.processes import free_port

MISSING = (
    "redis-server is not on PATH: the Redis integration tests need it "
    "(apt-get install redis-server, or `make redis-server`)"
)


class RedisServer:
    """``redis-server`` without persistence, bound to 127.0.0.1 on ``port`` (a free one by default)."""

    def __init__(self, port=None, start=True, tls=None, extra=()):
        """``tls``: support.tlscerts.Certificates; the server then also listens with TLS on
        ``tls_port`` and asks clients for a certificate (not required: tls-auth-clients optional).
        ``extra``: more redis-server arguments."""
        self.binary = shutil.which("redis-server")
        if self.binary is None:
            raise RuntimeError(MISSING)
        self.version = _version(self.binary)
        self.port = port or free_port()
        self.tls = tls
        self.tls_port = free_port() if tls is not None else None
        self.extra = list(extra)
        self.dir = Path(tempfile.mkdtemp(prefix="redis-test-"))
        self.log_path = self.dir / "redis.log"
        self.process = None
        if start:
            self.start()

    @property
    def uri(self):
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def socket_path(self):
        return self.dir / "redis.sock"

    def unix_uri(self, db=0):
        return f"unix://{self.socket_path}?db={db}"

    @property
    def running(self):
        return self.process is not None and self.process.poll() is None

    def client(self, **kwargs):
        """A blocking redis-py client (for assertions, never on a hot path)."""
        kwargs.setdefault("decode_responses", True)
        kwargs.setdefault("socket_timeout", 10)
        return redis.Redis(host="127.0.0.1", port=self.port, **kwargs)

    def start(self, timeout=10):
        if self.running:
            raise RuntimeError(f"redis-server already running on port {self.port}")
        command = [
            self.binary,
            "--save",
            "",
            "--appendonly",
            "no",
            "--bind",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--dir",
            str(self.dir),
            "--logfile",
            str(self.log_path),
            "--unixsocket",
            str(self.socket_path),
            "--unixsocketperm",
            "700",
        ]
        if self.tls is not None:
            command += [
                "--tls-port",
                str(self.tls_port),
                "--tls-cert-file",
                str(self.tls.server_cert),
                "--tls-key-file",
                str(self.tls.server_key),
                "--tls-ca-cert-file",
                str(self.tls.ca),
                "--tls-auth-clients",
                "optional",
            ]
        command += self.extra
        if self.version >= (7,):
            command += ["--enable-debug-command", "local"]  # DEBUG SLEEP in tests; off by default since 7.0
        self.process = subprocess.Popen(
            command, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT
        )
        deadline = time.monotonic() + timeout
        client = self.client(socket_timeout=1, socket_connect_timeout=1)
        try:
            while True:
                if self.process.poll() is not None:
                    raise RuntimeError(f"redis-server exited with {self.process.returncode}:\n{self.log_tail()}")
                try:
                    if client.ping():
                        return
                except redis.ConnectionError:
                    pass
                if time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"redis-server did not answer PING within {timeout} s:\n{self.log_tail()}")
                time.sleep(0.02)
        finally:
            client.close()

    def stop(self, kill=False, timeout=10):
        """SIGTERM (or SIGKILL with ``kill``), then SIGKILL if it lingers. Returns the exit code."""
        if self.process is None:
            return None
        process, self.process = self.process, None
        if process.poll() is None:
            process.send_signal(signal.SIGKILL if kill else signal.SIGTERM)
            try:
                process.wait(timeout)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        return process.returncode

    def restart(self, kill=True):
        """Stop (killed by default: nothing is flushed) and start again on the same port."""
        self.stop(kill=kill)
        self.start()

    def log_tail(self, lines=30):
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def cleanup(self):
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


def _version(binary):
    out = subprocess.run([binary, "--version"], capture_output=True, text=True, check=True).stdout
    match = re.search(r"v=(\d+)\.(\d+)\.(\d+)", out)
    return tuple(int(n) for n in match.groups()) if match else (0,)


async def eventually(predicate, timeout=10.0, interval=0.05, what=None):
    """Poll ``predicate`` on the reactor until it is true (returned), failing after ``timeout`` s."""
    from twisted.internet import reactor, task

    deadline = reactor.seconds() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if reactor.seconds() >= deadline:
            raise AssertionError(f"not true within {timeout} s: {what or predicate}")
        await task.deferLater(reactor, interval, lambda: None)
