"""Every core in use: worker processes sharing the listening ports.

``twistd chatgateway --workers N`` runs the gateway in this process (worker 0,
which keeps GATEWAY_ID) and N - 1 more twistd processes of the same command
(worker i has GATEWAY_ID ``<id>-w<i>``), each accepting on the same HTTP (and
gRPC) port through SO_REUSEPORT, so the kernel spreads new connections over
them. They coordinate through the configured store and bus, which is why
N > 1 needs both on Redis: an in-memory store or bus cannot span processes
(the options refuse it with a clear error).

A worker runs exactly the parent's code: it replaces its sys.path with the
parent's (made absolute) before importing anything, so a module in the working
directory cannot shadow an installed one in the workers only.

Two pipes join a worker to its parent. Its stdin, from the parent, carries one
line each time the workers' state changes: the state itself ("up", or "missing
w1, w2"), which every process reports as the "workers" dependency of /readyz
(any of them may answer it, through SO_REUSEPORT). When that pipe closes the
parent is gone, and the worker stops (even after a SIGKILL of the parent). Its
fd 3, to the parent, says "listening" once the worker's ports are bound: until
then the worker is missing.

The parent restarts a worker that dies, after a second; but a worker that dies
within STARTUP_WINDOW_SEC of its start STARTUP_DEATHS times in a row is not
going to start: the parent logs "worker w1 died 3 times within 10 s of
starting (last exit: status 1)", stops (its workers drain) and exits 1. On
stop it sends every worker SIGTERM and waits for it (their drain included).
"""

import atexit
import os
import socket
import stat
import sys

from twisted.application import service
from twisted.internet import defer, error, fdesc, protocol
from twisted.internet.interfaces import IReadDescriptor
from twisted.logger import Logger
from zope.interface import implementer

# A worker: twistd with the parent's sys.path, in place before anything is imported from it.
WORKER_MAIN = (
    "import sys; sys.path[:] = {path!r}; sys.argv[0] = 'twistd'; "
    "from twisted.scripts.twistd import run; sys.exit(run())"
)
RESTART_DELAY_SEC = 1.0
STARTUP_WINDOW_SEC = 10.0  # a death this soon after the start counts towards giving up
STARTUP_DEATHS = 3  # in a row: the parent stops and exits 1
LISTENING_FD = 3  # in a worker: the pipe on which it tells the parent it listens
BACKLOG = 1024


def listen_shared(reactor, port, factory, interface=""):
    """Like reactor.listenTCP, with SO_REUSEPORT: several processes accept on one port."""
    family = socket.AF_INET6 if ":" in interface else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((interface or ("::" if family == socket.AF_INET6 else "0.0.0.0"), port))
        sock.listen(BACKLOG)
        sock.setblocking(False)
        return reactor.adoptStreamPort(sock.fileno(), family, factory)
    finally:
        sock.close()  # the reactor holds its own duplicate of the descriptor


def worker_name(index):
    return f"w{index}"


def describe_exit(reason):
    """'status 1' or 'signal 9', from a ProcessDone or ProcessTerminated."""
    if getattr(reason, "signal", None) is not None:
        return f"signal {reason.signal}"
    return f"status {reason.exitCode}"


class _Worker(protocol.ProcessProtocol):
    def __init__(self, pool, index, started):
        self.pool = pool
        self.index = index
        self.started = started  # reactor time of the spawn
        self.listening = False
        self.ended = defer.Deferred()
        self._said = b""

    def childDataReceived(self, fd, data):
        if fd == LISTENING_FD and not self.listening:
            self._said += data
            if b"listening\n" in self._said:
                self.listening = True
                self.pool.worker_listening(self)

    def processEnded(self, reason):
        self.ended.callback(reason.value.exitCode)
        self.pool.worker_ended(self, reason.value)


class WorkerPool(service.Service):
    """Spawns and keeps the extra worker processes (index 1 .. count-1); see the module docstring.

    ``give_up(message)`` is called when a worker will not start.
    """

    log = Logger()

    def __init__(self, reactor, count, args, env, stop_timeout, give_up, path=None):
        self.setName("workers")
        self._reactor = reactor
        self._count = count
        self._args = list(args)  # twistd plugin arguments, without --workers/--worker-index
        self._env = env
        self._stop_timeout = stop_timeout
        self._give_up = give_up
        # Resolved now: a relative entry ("" for a `python -c` parent) means the parent's directory.
        self._path = [os.path.abspath(entry) for entry in (sys.path if path is None else path)]
        self._early_deaths = {}  # index -> deaths in a row within STARTUP_WINDOW_SEC of the start
        self.workers = {}  # index -> (_Worker, process transport)

    def readiness(self):
        """The "workers" dependency: "up" when every worker listens, else which are missing."""
        missing = [worker_name(i) for i in range(1, self._count) if not self._listening(i)]
        return "missing " + ", ".join(missing) if missing else "up"

    def _listening(self, index):
        worker = self.workers.get(index)
        return worker is not None and worker[0].listening

    def startService(self):
        super().startService()
        for index in range(1, self._count):
            self._spawn(index)

    def _spawn(self, index):
        worker = _Worker(self, index, self._reactor.seconds())
        argv = [
            sys.executable,
            "-c",
            WORKER_MAIN.format(path=self._path),
            "--nodaemon",
            "--pidfile=",
            "chatgateway",
            *self._args,
            "--worker-index",
            str(index),
        ]
        transport = self._reactor.spawnProcess(
            worker, sys.executable, argv, env=self._env, childFDs={0: "w", 1: 1, 2: 2, LISTENING_FD: "r"}
        )
        self.workers[index] = (worker, transport)
        self.log.info("started worker {name} (pid {pid})", name=worker_name(index), pid=transport.pid)
        self._tell_workers()

    def worker_listening(self, worker):
        if self.workers.get(worker.index, (None,))[0] is worker:
            self._tell_workers()

    def _tell_workers(self):
        line = (self.readiness() + "\n").encode()
        for _, transport in self.workers.values():
            transport.write(line)  # the worker's stdin

    def worker_ended(self, worker, reason):
        if self.workers.get(worker.index, (None,))[0] is not worker:
            return
        del self.workers[worker.index]
        if not self.running:
            return
        self._tell_workers()
        name, last_exit = worker_name(worker.index), describe_exit(reason)
        if self._reactor.seconds() - worker.started < STARTUP_WINDOW_SEC:
            deaths = self._early_deaths[worker.index] = self._early_deaths.get(worker.index, 0) + 1
        else:
            deaths = self._early_deaths[worker.index] = 0  # it ran a while: its start worked
        if deaths >= STARTUP_DEATHS:
            message = f"worker {name} died {deaths} times within {STARTUP_WINDOW_SEC:g} s of starting (last exit: {last_exit})"
            self.log.critical("{message}: stopping every worker and exiting with status 1", message=message)
            self._give_up(message)
            return
        self.log.warn(
            "worker {name} ended ({exit}); restarting it in {delay:g} s",
            name=name,
            exit=last_exit,
            delay=RESTART_DELAY_SEC,
        )
        self._reactor.callLater(RESTART_DELAY_SEC, self._restart, worker.index)

    def _restart(self, index):
        if self.running and index not in self.workers:
            self._spawn(index)

    def stopService(self):
        super().stopService()
        waits = []
        for worker, transport in list(self.workers.values()):
            try:
                transport.signalProcess("TERM")
            except Exception:  # already gone
                continue
            kill = self._reactor.callLater(self._stop_timeout, _kill, transport)
            worker.ended.addBoth(lambda result, kill=kill: kill.active() and kill.cancel())
            waits.append(worker.ended)
        return defer.DeferredList(waits)


def _kill(transport):
    try:
        transport.signalProcess("KILL")
    except Exception:
        pass


def stop_and_exit(reactor, status):
    """Stop the reactor (every service stops, the workers drain), then exit with ``status``.

    twistd ends with 0 (or the signal) whatever its services did: an exit handler,
    run once twistd has returned, gives the status.
    """
    atexit.register(_exit_now, status)
    try:
        reactor.stop()
    except error.ReactorNotRunning:
        pass


def _exit_now(status):
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(status)


def _tell_parent_listening(fd=LISTENING_FD):
    try:
        if not stat.S_ISFIFO(os.fstat(fd).st_mode):
            return  # not started by a WorkerPool: fd 3 is not its pipe
        os.write(fd, b"listening\n")
        os.close(fd)
    except OSError:
        pass  # no such descriptor, or the parent is gone (the stdin watch stops the worker)


@implementer(IReadDescriptor)
class _ParentPipe:
    """Reads the parent's lines on stdin; its end means the parent is gone."""

    def __init__(self, reactor, on_line, fd=0):
        self._reactor = reactor
        self._on_line = on_line
        self._fd = fd
        self._buffer = b""

    def fileno(self):
        return self._fd

    def logPrefix(self):
        return "parent-pipe"

    def doRead(self):
        return fdesc.readFromFD(self._fd, self._received)

    def _received(self, data):
        *lines, self._buffer = (self._buffer + data).split(b"\n")
        for line in lines:
            self._on_line(line.decode("utf-8", "replace"))

    def connectionLost(self, reason):
        self._reactor.removeReader(self)
        if self._reactor.running:
            self._reactor.stop()


class ParentWatch(service.Service):
    """In a worker: tell the parent once listening (started after the listeners), keep the
    parent's word on the workers' state (the "workers" dependency), and stop the worker
    when the parent's pipe on stdin closes."""

    def __init__(self, reactor):
        self.setName("parent-watch")
        self._reactor = reactor
        self.workers = "unknown"  # until the parent's first line

    def readiness(self):
        return self.workers

    def startService(self):
        super().startService()
        _tell_parent_listening()
        fdesc.setNonBlocking(0)
        self._reactor.addReader(_ParentPipe(self._reactor, self._heard))

    def _heard(self, line):
        self.workers = line
