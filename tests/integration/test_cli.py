"""chatgateway-client against a real ``twistd chatgateway --dev``, all as subprocesses."""

import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time

import jwt
import pytest

from support.chat import unique
from support.processes import REPO_ROOT, Twistd, free_port

CLIENT = [sys.executable, "-m", "chatgateway.client.cli"]
TIMEOUT = 30  # seconds any one CLI run or expected line may take
LINE = re.compile(r"^\d\d:\d\d:\d\d (?P<sender>\S+): (?P<text>.*)$")


@pytest.fixture(scope="module")
def gateway():
    port = free_port()
    process = Twistd("chatgateway", args=["--dev", "--http-port", port], port=port)
    process.start()
    try:
        yield f"ws://127.0.0.1:{port}/ws"
    finally:
        process.stop()


def _env(**extra):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CHATGATEWAY_", "JWT_"))}
    return {**env, "PYTHONUNBUFFERED": "1", **extra}


def cli(*args, env=None):
    """Run the CLI to completion; the CompletedProcess (text)."""
    return subprocess.run(
        [*CLIENT, *map(str, args)],
        cwd=REPO_ROOT,
        env=env or _env(),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )


def as_user(url, profile, *args):
    return cli("--url", url, "--as", profile, *args)


def ok(result):
    assert result.returncode == 0, f"exit {result.returncode}\nstdout: {result.stdout}\nstderr: {result.stderr}"
    assert "Traceback" not in result.stderr, result.stderr
    return result.stdout


def _as_in_a_terminal():
    """SIGINT as a terminal's foreground job has it. A shell starts background jobs with
    SIGINT ignored, and the child would inherit that: Python then installs no handler for
    it, nor does Twisted, and stop()'s Ctrl-C would go unheard (seen with `make test &`)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


class Running:
    """A long-running CLI subprocess whose output lines are read by threads into queues."""

    def __init__(self, *args):
        self.process = subprocess.Popen(
            [*CLIENT, *map(str, args)],
            cwd=REPO_ROOT,
            env=_env(),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            preexec_fn=_as_in_a_terminal,
        )
        self.lines = {"stdout": queue.Queue(), "stderr": queue.Queue()}
        self.seen = {"stdout": [], "stderr": []}
        for name in self.lines:
            stream = getattr(self.process, name)
            threading.Thread(target=self._read, args=(stream, self.lines[name]), daemon=True).start()

    @staticmethod
    def _read(stream, lines):
        for line in stream:
            lines.put(line.rstrip("\n"))
        lines.put(None)

    def wait_for(self, pattern, stream="stdout", timeout=TIMEOUT):
        """The first new line of ``stream`` matching ``pattern`` (a regex); fails at EOF or timeout."""
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            try:
                line = self.lines[stream].get(timeout=max(0.0, remaining))
            except queue.Empty:
                pytest.fail(f"no {stream} line matching {pattern!r} in {timeout}s; seen: {self.seen}")
            if line is None:
                self.lines[stream].put(None)
                pytest.fail(f"{stream} ended (exit {self.process.poll()}) before {pattern!r}; seen: {self.seen}")
            self.seen[stream].append(line)
            match = re.search(pattern, line)
            if match:
                return match

    def rest(self, stream):
        """Every remaining line of ``stream`` (after the process ended)."""
        lines = []
        while True:
            line = self.lines[stream].get(timeout=TIMEOUT)
            if line is None:
                return lines
            lines.append(line)

    def wait(self, timeout=TIMEOUT):
        return self.process.wait(timeout)

    def stop(self):
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(TIMEOUT)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode


@pytest.fixture
def running():
    started = []

    def start(*args):
        process = Running(*args)
        started.append(process)
        return process

    yield start
    for process in started:
        process.stop()


# ---------------------------------------------------------------- without a gateway


def test_help_lists_the_commands():
    out = ok(cli("--help"))
    for command in ("token", "rooms", "send", "tail", "history"):
        assert command in out


def test_token_minted_with_secret():
    secret = "s" * 32
    out = ok(cli("--secret", "token", "alice", "phone", env=_env(JWT_SECRET=secret)))
    claims = jwt.decode(out.strip(), secret, algorithms=["HS256"], audience="service_chat_gateway")
    assert claims["sub"] == "alice"
    assert claims["device_id"] == "phone"
    assert claims["iss"] == "chatgateway-dev"


def test_connection_refused_exits_2():
    url = f"ws://127.0.0.1:{free_port()}/ws"
    result = cli("--url", url, "--token", "whatever", "rooms", "list")
    assert result.returncode == 2
    assert "connection refused" in result.stderr
    assert "Traceback" not in result.stderr


def test_usage_error_exits_2():
    result = cli("history", "room", "--limit", "0")
    assert result.returncode == 2
    assert "--limit" in result.stderr


# ---------------------------------------------------------------- against a gateway


def test_token_from_the_dev_endpoint(gateway):
    out = ok(cli("--url", gateway, "token", "alice", "laptop"))
    claims = jwt.decode(out.strip(), options={"verify_signature": False})
    assert claims["sub"] == "alice"
    assert claims["device_id"] == "laptop"


def test_conversation(gateway, running):
    name = unique("general")
    room = ok(as_user(gateway, "alice", "rooms", "create", name, "--member", "bob")).splitlines()[0]
    assert room

    tail = running("--url", gateway, "--as", "bob", "tail", room)
    tail.wait_for(rf"tailing room {re.escape(room)} as bob", stream="stderr")

    event_id = ok(as_user(gateway, "alice", "send", room, "hello", "bob")).strip()
    assert event_id
    line = tail.wait_for(LINE.pattern)
    assert (line["sender"], line["text"]) == ("alice", "hello bob")

    for profile in ("alice", "bob"):
        rooms = ok(as_user(gateway, profile, "rooms", "list")).splitlines()
        assert f"{room}\t{name}" in rooms
    assert ok(as_user(gateway, "bob", "rooms", "list", name)).splitlines() == [f"{room}\t{name}"]

    ok(as_user(gateway, "bob", "send", room, "hi", "alice"))
    tail.wait_for(r" bob: hi alice$")
    history = [LINE.match(h) for h in ok(as_user(gateway, "bob", "history", room)).splitlines()]
    assert all(history)
    texts = [(h["sender"], h["text"]) for h in history if not h["text"].startswith("[SYSTEM] ")]
    assert texts == [("alice", "hello bob"), ("bob", "hi alice")]  # oldest first

    assert tail.stop() == 0
    assert "Traceback" not in "\n".join(tail.rest("stderr"))


def test_non_member_send_is_denied(gateway):
    room = ok(as_user(gateway, "alice", "rooms", "create", unique("private"))).splitlines()[0]
    result = as_user(gateway, "mallory", "send", room, "let me in")
    assert result.returncode == 1
    assert result.stderr.startswith("error: PERMISSION_DENIED: ")
    assert "Traceback" not in result.stderr
    assert result.stdout == ""


def test_join_and_leave(gateway):
    room = ok(as_user(gateway, "alice", "rooms", "create", unique("club"))).splitlines()[0]
    assert ok(as_user(gateway, "alice", "rooms", "join", room, "carol")).splitlines() == ["carol\tmember"]
    assert room in ok(as_user(gateway, "carol", "rooms", "list"))
    assert ok(as_user(gateway, "carol", "rooms", "leave", room)).splitlines() == ["carol"]
    assert room not in ok(as_user(gateway, "carol", "rooms", "list"))


def test_json_output(gateway):
    room = ok(as_user(gateway, "alice", "--json", "rooms", "create", unique("json")))
    assert '"room"' in room


def test_tail_exits_nonzero_when_the_gateway_closes_it(gateway, running):
    room = ok(as_user(gateway, "alice", "rooms", "create", unique("replaced"))).splitlines()[0]
    first = running("--url", gateway, "--as", "alice", "--device", "desk", "tail", room)
    first.wait_for("tailing room", stream="stderr")
    second = running("--url", gateway, "--as", "alice", "--device", "desk", "tail", room)
    second.wait_for("tailing room", stream="stderr")
    # MAX_CONNECTIONS_PER_DEVICE is 1: the newer connection replaces the older (4001).
    assert first.wait() == 3
    assert any("4001" in line for line in first.rest("stderr"))


def test_bad_token_is_refused_at_the_handshake(gateway):
    result = cli("--url", gateway, "--token", "not-a-jwt", "rooms", "list")
    assert result.returncode == 2
    assert result.stderr.startswith("error: cannot connect to ")
    assert "Traceback" not in result.stderr
