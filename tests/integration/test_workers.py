"""`twistd chatgateway --workers 2` run as an operator runs it (the installed twistd script):
what the workers import, a worker that keeps dying at start, and /readyz while a worker is
missing. Real processes and a real redis-server; every wait is bounded."""

import http.client
import json
import os
import re
import signal
import time
import urllib.error
import urllib.request

from support.fakecore import FakeCore
from support.processes import TWISTD_SCRIPT, Twistd, children_of, free_port, until

SECRET = "workers-test-secret-0123456789abcdef01234"
STARTUP_WINDOW_SEC = 10  # docs/operations.md#workers: deaths "within 10 s of starting" count


def workers_gateway(tmp_path, redis_server, core_target=None, **settings):
    """A parent of 2 workers (not started) with ``tmp_path`` as its working directory."""
    port = free_port()
    env = {
        "JWT_SECRET": SECRET,
        "OAUTH2_ISSUER": "",
        "CACHE_URI": redis_server.uri,
        "EVENTS_URI": "",
        "HTTP_PORT": str(port),
        "HTTP_INTERFACE": "127.0.0.1",
        "GRPC_PORT": str(free_port()),
        "CHAT_SERVICE_URI": core_target or f"127.0.0.1:{free_port()}",
        "LOG_LEVEL": "info",
        **settings,
    }
    return Twistd(
        "chatgateway", ["--workers", "2"], env=env, port=port, log_dir=tmp_path, cwd=tmp_path, twistd=TWISTD_SCRIPT
    )


def instances(redis_server):
    return redis_server.client().smembers("gateway:instances")


def readyz(port):
    """(status, dependencies) of one /readyz answer, or None when the connection failed
    (a connection the kernel had queued on a worker that was just killed)."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=5) as response:
            return response.status, json.load(response)["dependencies"]
    except urllib.error.HTTPError as e:
        return e.code, json.load(e)["dependencies"]
    except (urllib.error.URLError, ConnectionError, http.client.HTTPException):
        return None


def ready_everywhere(port, answers=10):
    """``answers`` /readyz answers in a row are 200 with every worker up. The kernel spreads
    connections over the processes, and each process answers on its own dependencies."""
    for _ in range(answers):
        answer = readyz(port)
        if answer is None or answer[0] != 200 or answer[1]["workers"] != "up":
            return False
    return True


def test_workers_import_the_parents_code_not_a_stray_module_in_the_working_directory(tmp_path, redis_server):
    (tmp_path / "txredisapi.py").write_text('raise ImportError("stray txredisapi.py in the working directory")\n')
    parent = workers_gateway(tmp_path, redis_server, GATEWAY_ID="gw-stray")
    parent.start()
    try:
        # The parent keeps GATEWAY_ID; worker 1 is <GATEWAY_ID>-w1 (docs/operations.md#workers).
        until(
            lambda: instances(redis_server) == {"gw-stray", "gw-stray-w1"},
            60,
            f"both processes registered\n{parent.log_tail()}",
        )
        assert len(children_of(parent.pid)) == 1
        assert "stray txredisapi.py" not in parent.log_text()
        assert "worker w1 ended" not in parent.log_text()
    finally:
        assert parent.stop() == 0, parent.log_tail()


def test_a_worker_that_keeps_dying_at_start_stops_the_parent_with_exit_1(tmp_path, redis_server):
    # A deploy that broke the code under a running parent: a directory on its sys.path
    # (PYTHONPATH) gets a txredisapi.py that fails on import. The parent imported the real
    # one when it started; every worker started from then on imports the broken one, and dies.
    code = tmp_path / "code"
    code.mkdir()
    parent = workers_gateway(tmp_path, redis_server, GATEWAY_ID="gw-broken", PYTHONPATH=str(code))
    parent.start()
    try:
        until(lambda: "gw-broken-w1" in instances(redis_server), 60, f"worker 1 up\n{parent.log_tail()}")
        (code / "txredisapi.py").write_text('raise ImportError("broken deploy")\n')
        (worker,) = children_of(parent.pid)
        os.kill(worker, signal.SIGKILL)
        # At most: the killed one and 3 restarts, each a second apart and dying at its imports.
        status = parent.process.wait(timeout=90)
    finally:
        parent.kill()
    log = parent.log_text()
    assert status == 1, log[-3000:]
    assert re.search(r"worker w1 died 3 times within 10 s of starting \(last exit: status 1\)", log), log[-3000:]
    assert "broken deploy" in log  # the workers' own tracebacks say why


def test_readyz_is_503_while_a_worker_is_missing_and_the_parent_restarts_it(tmp_path, redis_server):
    core = FakeCore()
    parent = workers_gateway(tmp_path, redis_server, core_target=core.target, GATEWAY_ID="gw-ready")
    parent.start()
    try:
        (worker,) = until(lambda: children_of(parent.pid), 60, "worker 1 started")
        spawned_before = time.monotonic()
        until(lambda: ready_everywhere(parent.port), 60, f"ready\n{parent.log_tail()}")
        # Once it has run a while (past the start window), its death is an ordinary restart.
        time.sleep(max(0.0, STARTUP_WINDOW_SEC + 0.5 - (time.monotonic() - spawned_before)))
        os.kill(worker, signal.SIGKILL)

        missing = until(
            lambda: (lambda a: a if a and a[0] == 503 else None)(readyz(parent.port)), 10, "/readyz 503 after the kill"
        )
        assert missing[1]["workers"] == "missing w1", missing
        listening_before = parent.log_text().count("http listening on")
        until(lambda: (readyz(parent.port) or (0,))[0] == 200, 60, f"ready again\n{parent.log_tail()}")
        # Ready again only once the new worker listens; then every process says so.
        assert parent.log_text().count("http listening on") == listening_before + 1
        (restarted,) = children_of(parent.pid)
        assert restarted != worker
        until(lambda: ready_everywhere(parent.port), 60, f"every process ready again\n{parent.log_tail()}")
        assert parent.running
    finally:
        assert parent.stop() == 0, parent.log_tail()
        core.stop()
