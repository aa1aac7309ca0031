"""Real processes for integration tests: free ports and twistd plugins."""

import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]

# twistd of this interpreter; ``python -m twisted`` is the different ``twist`` runner.
TWISTD = (
    sys.executable,
    "-c",
    "import sys; sys.argv[0] = 'twistd'; from twisted.scripts.twistd import run; sys.exit(run())",
)
# The installed twistd script, as an operator runs it: unlike ``python -c`` (TWISTD), it does
# not put the working directory on sys.path.
TWISTD_SCRIPT = (str(Path(sys.executable).with_name("twistd")),)


# The exit code of a twistd that shut down cleanly on SIGTERM (twistd's own handling, e.g.
# `twistd chatcore`). `twistd chatgateway` handles SIGTERM itself: it drains and exits 0.
CLEAN_STOP = -signal.SIGTERM


def until(condition, timeout=10, what=None, step=0.1):
    """Poll ``condition`` (a real process changes state on its own clock) until it returns
    something true, and return that. After ``timeout`` s: fail saying ``what``, or, without
    one, return its last (false) value for the caller to assert on."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            assert what is None, f"not within {timeout} s: {what}"
            return value
        time.sleep(step)


def _ephemeral_range():
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            low, high = (int(n) for n in f.read().split())
            return low, high
    except (OSError, ValueError):
        return 32768, 60999


# Ports handed to servers come from below the kernel's ephemeral range: a port picked from
# inside it (bind to 0) may be taken by some client's outgoing connection before the server
# started for it binds it, and the test then fails on an address in use.
_EPHEMERAL_LOW = _ephemeral_range()[0]
_PORTS = random.Random(os.getpid())


def free_port(host="127.0.0.1"):
    """A TCP port nothing listens on right now, outside the kernel's ephemeral range."""
    for _ in range(200):
        port = _PORTS.randrange(max(1024, _EPHEMERAL_LOW - 12000), _EPHEMERAL_LOW)
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind((host, port))
            except OSError:
                continue
            return port
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def children_of(pid):
    """Process ids whose parent is pid (from /proc)."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    if int(f.read().rsplit(")", 1)[1].split()[1]) == pid:
                        found.append(int(entry))
            except OSError:
                pass
    return found


def _accepts(host, port):
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


class Twistd:
    """``twistd --nodaemon --pidfile= <plugin> <args>`` in the repository root (or ``cwd``).

    Output (stdout and stderr of every run) goes to ``log_path``. ``start`` may be
    called again after ``stop`` to restart with the same arguments. ``twistd`` is
    TWISTD unless given (e.g. TWISTD_SCRIPT).
    """

    def __init__(
        self,
        plugin,
        args=(),
        env=None,
        port=None,
        host="127.0.0.1",
        log_dir=None,
        also_ports=(),
        cwd=REPO_ROOT,
        twistd=TWISTD,
    ):
        self.plugin = plugin
        self.cwd = cwd
        self.twistd = tuple(twistd)
        self.args = [str(a) for a in args]
        self.env = dict(env or {})
        self.port = port
        # Other ports to wait for (e.g. GRPC_PORT, bound after the HTTP port).
        self.also_ports = tuple(also_ports)
        self.host = host
        self.log_path = Path(log_dir or tempfile.mkdtemp(prefix=f"twistd-{plugin}-")) / f"{plugin}.log"
        self.process = None

    @property
    def pid(self):
        return None if self.process is None else self.process.pid

    @property
    def running(self):
        return self.process is not None and self.process.poll() is None

    def start(self, timeout=30):
        """Start and wait until ``port`` (and ``also_ports``) accept TCP connections; raise with the log tail if it dies."""
        if self.running:
            raise RuntimeError(f"twistd {self.plugin} already running (pid {self.pid})")
        command = [*self.twistd, "--nodaemon", "--pidfile=", self.plugin, *self.args]
        env = {**os.environ, "PYTHONUNBUFFERED": "1", **self.env}
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                command, cwd=self.cwd, env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT
            )
        deadline = time.monotonic() + timeout
        ports = [p for p in (self.port, *self.also_ports) if p is not None]
        while not all(_accepts(self.host, p) for p in ports):
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"twistd {self.plugin} exited with {self.process.returncode} before listening:\n{self.log_tail()}"
                )
            if time.monotonic() > deadline:
                self.kill()
                raise TimeoutError(
                    f"twistd {self.plugin} not listening on {ports} after {timeout}s:\n{self.log_tail()}"
                )
            time.sleep(0.05)  # readiness polling only
        return self

    def stop(self, timeout=10):
        """SIGTERM, then SIGKILL after ``timeout`` seconds; the exit code.

        twistd ends a clean SIGTERM shutdown by killing itself with SIGTERM again,
        so a clean stop is ``-signal.SIGTERM`` (see CLEAN_STOP); SIGKILL gives -9.
        """
        if self.process is None:
            return None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode

    def kill(self):
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        return None if self.process is None else self.process.returncode

    def log_text(self):
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def log_tail(self, lines=40):
        return "\n".join(self.log_text().splitlines()[-lines:])

    def __enter__(self):
        if not self.running:
            self.start()
        return self

    def __exit__(self, *exc_info):
        self.stop()


def one_gateway(tmp_path, core, secret, **settings):
    """A `twistd chatgateway --workers 1` (not started) on a free port, calling ``core``
    (a support.fakecore.FakeCore), with HS256 ``secret``; ``settings`` add or override
    environment variables. One process: memory and signals are measured on the process
    the devices talk to."""
    port = free_port()
    env = {
        "JWT_SECRET": secret,
        "OAUTH2_ISSUER": "",
        "HTTP_PORT": str(port),
        "HTTP_INTERFACE": "127.0.0.1",
        "GRPC_PORT": str(free_port()),
        "CHAT_SERVICE_URI": core.target,
        "LOG_LEVEL": "info",
        **{k: str(v) for k, v in settings.items()},
    }
    return Twistd("chatgateway", ["--workers", "1"], env=env, port=port, log_dir=tmp_path)
