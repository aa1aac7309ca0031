"""Driving a load generator process over stdin/stdout lines (tests/support/*.py, bench/loadclient.py)."""

import os
import queue
import subprocess
import sys
import threading

from support.processes import REPO_ROOT


class LineProcess:
    """``python <script> <args>``; ``expect`` waits (bounded) for a line with a prefix."""

    def __init__(self, script, args, log_path=None):
        # tests/ too: load generators share the support package (e.g. support.rawwebsocket).
        env = {
            **os.environ,
            "PYTHONUNBUFFERED": "1",
            "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), str(REPO_ROOT / "tests")]),
        }
        self._log = open(log_path, "ab") if log_path else subprocess.DEVNULL
        self.process = subprocess.Popen(
            # -P: the script's own directory (tests/support, with its redis.py) is not put on sys.path
            [sys.executable, "-P", str(REPO_ROOT / script), *map(str, args)],
            cwd=REPO_ROOT,
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._log,
        )
        self._lines = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        for line in self.process.stdout:
            self._lines.put(line.decode().rstrip("\n"))
        self._lines.put(None)

    def send(self, line):
        self.process.stdin.write((line + "\n").encode())
        self.process.stdin.flush()

    def expect(self, prefix, timeout):
        """The rest of the first line starting with ``prefix``; raises on timeout or exit."""
        while True:
            try:
                line = self._lines.get(timeout=timeout)
            except queue.Empty:
                raise TimeoutError(f"no {prefix!r} line within {timeout}s") from None
            if line is None:
                raise RuntimeError(f"load generator exited ({self.process.wait()}) before {prefix!r}")
            if line.startswith(prefix):
                return line[len(prefix) :].strip()

    def stop(self):
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait()
        if self._log is not subprocess.DEVNULL:
            self._log.close()
