"""Every core in use: worker processes sharing the listening ports.

``twistd chatgateway --workers N`` runs the gateway in this process and
N - 1 more twistd processes of the same command, each accepting on the same
HTTP (and gRPC) port through SO_REUSEPORT, so the kernel spreads new
connections over them. Each worker is a complete gateway with its own
GATEWAY_ID (``<id>-w<i>``); they coordinate through the configured store
and bus, which is why N > 1 needs both on Redis: an in-memory store or bus
cannot span processes (the options refuse it with a clear error).

A worker stops when its parent does: it watches its stdin, a pipe from the
parent, and stops its reactor when that closes (even after a SIGKILL of the
parent). The parent restarts a worker that dies, after a second, and on
stop sends every worker SIGTERM and waits for it (their drain included).
"""

import socket
import sys

from twisted.application import service
from twisted.internet import defer, fdesc, protocol
from twisted.internet.interfaces import IReadDescriptor
from twisted.logger import Logger
from zope.interface import implementer

TWISTD = "import sys; sys.argv[0] = 'twistd'; from twisted.scripts.twistd import run; sys.exit(run())"
RESTART_DELAY_SEC = 1.0
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


class _Worker(protocol.ProcessProtocol):
    def __init__(self, pool, index):
        self.pool = pool
        self.index = index
        self.ended = defer.Deferred()

    def processEnded(self, reason):
        self.ended.callback(reason.value.exitCode)
        self.pool.worker_ended(self)


class WorkerPool(service.Service):
    """Spawns and keeps the extra worker processes (index 1 .. count-1)."""

    log = Logger()
    name = "workers"

    def __init__(self, reactor, count, args, env, stop_timeout):
        self._reactor = reactor
        self._count = count
        self._args = list(args)  # twistd plugin arguments, without --workers/--worker-index
        self._env = env
        self._stop_timeout = stop_timeout
        self.workers = {}  # index -> (_Worker, process transport)

    def startService(self):
        super().startService()
        for index in range(1, self._count):
            self._spawn(index)

    def _spawn(self, index):
        worker = _Worker(self, index)
        argv = [sys.executable, "-c", TWISTD, "--nodaemon", "--pidfile=", "chatgateway", *self._args,
                "--worker-index", str(index)]
        transport = self._reactor.spawnProcess(worker, sys.executable, argv, env=self._env, childFDs={0: "w", 1: 1, 2: 2})
        self.workers[index] = (worker, transport)
        self.log.info("started worker {index} (pid {pid})", index=index, pid=transport.pid)

    def worker_ended(self, worker):
        if self.workers.get(worker.index, (None,))[0] is not worker:
            return
        del self.workers[worker.index]
        if self.running:
            self.log.warn("worker {index} ended; restarting it", index=worker.index)
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


@implementer(IReadDescriptor)
class _ParentPipe:
    """Reads (and ignores) stdin; its end means the parent is gone."""

    def __init__(self, reactor, fd=0):
        self._reactor = reactor
        self._fd = fd

    def fileno(self):
        return self._fd

    def logPrefix(self):
        return "parent-pipe"

    def doRead(self):
        return fdesc.readFromFD(self._fd, lambda data: None)

    def connectionLost(self, reason):
        self._reactor.removeReader(self)
        if self._reactor.running:
            self._reactor.stop()


class ParentWatch(service.Service):
    """In a worker: stop when the parent's pipe on stdin closes."""

    name = "parent-watch"

    def __init__(self, reactor):
        self._reactor = reactor

    def startService(self):
        super().startService()
        fdesc.setNonBlocking(0)
        self._reactor.addReader(_ParentPipe(self._reactor))
