"""Under a real twistd, a drain in which a service failed to stop exits 1; a clean one exits 0.

The service tree is the gateway's root and signal handling (chatgateway.service) with
two small children, one of whose stop can be made to fail, in a .tac file; it sends
itself SIGTERM once running.
"""

import os
import subprocess
import textwrap

from support.processes import REPO_ROOT, TWISTD

TAC = textwrap.dedent(
    """
    import os
    import signal

    from twisted.application import service
    from twisted.internet import reactor, task

    from chatgateway.service import _Root, _Signals


    class Slow(service.Service):
        def __init__(self, name, error=None):
            self.setName(name)
            self.error = error

        def stopService(self):
            super().stopService()

            def stopped():
                print(f"{self.name} stopped")
                if self.error:
                    raise RuntimeError(self.error)

            return task.deferLater(reactor, 0.2, stopped)


    application = service.Application("stop-exit-code")
    root = _Root()
    root.setServiceParent(application)
    Slow("store", os.environ.get("STORE_STOP_ERROR")).setServiceParent(root)
    root.gateway = Slow("gateway")
    root.gateway.setServiceParent(root)
    _Signals(reactor, 10, root).setServiceParent(root)
    reactor.callWhenRunning(reactor.callLater, 0.5, os.kill, os.getpid(), signal.SIGTERM)
    """
)


def run_tac(tmp_path, **env):
    """twistd running TAC; its completed process (output captured)."""
    tac = tmp_path / "tree.tac"
    tac.write_text(TAC)
    command = [*TWISTD, "--nodaemon", "--pidfile=", "--python", str(tac)]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **env}
    return subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=60)


def test_a_service_that_fails_to_stop_makes_twistd_exit_1_after_the_drain(tmp_path):
    result = run_tac(tmp_path, STORE_STOP_ERROR="store refused")
    log = result.stdout + result.stderr
    assert result.returncode == 1, log
    assert log.index("gateway stopped") < log.index("store stopped")  # the drain went on to the end
    assert "stopping store failed" in log
    assert "services failed to stop (store: RuntimeError: store refused): exiting 1" in log


def test_a_clean_drain_exits_0(tmp_path):
    result = run_tac(tmp_path)
    log = result.stdout + result.stderr
    assert result.returncode == 0, log
    assert "store stopped" in log and "failed" not in log
