"""The worker pool's rules on a fake process reactor: the workers' sys.path, restarts,
giving up on a worker that keeps dying at start, and the workers' readiness."""

import os
import tempfile

from twisted.internet import error
from twisted.internet.task import Clock
from twisted.python.failure import Failure

from chatgateway import workers
from chatgateway.workers import LISTENING_FD, ParentWatch, WorkerPool


class FakeProcess:
    def __init__(self, pid):
        self.pid = pid
        self.written = []
        self.signals = []

    def write(self, data):
        self.written.append(data)

    def signalProcess(self, name):
        self.signals.append(name)


class ProcessReactor(Clock):
    def __init__(self):
        super().__init__()
        self.spawned = []  # (protocol, argv, childFDs, FakeProcess)

    def spawnProcess(self, protocol, executable, args, env=None, childFDs=None):
        process = FakeProcess(1000 + len(self.spawned))
        self.spawned.append((protocol, args, childFDs, process))
        return process

    def live(self, index):
        """The protocol and process of worker ``index``'s latest spawn."""
        for protocol, _, _, process in reversed(self.spawned):
            if protocol.index == index:
                return protocol, process
        raise AssertionError(f"worker {index} never spawned")


def pool_of(count, reactor=None, path=("/parent/path",)):
    reactor = reactor or ProcessReactor()
    gave_up = []
    pool = WorkerPool(reactor, count, ["--http-port", "9300"], {"A": "1"}, 35, gave_up.append, path=list(path))
    pool.startService()
    return pool, reactor, gave_up


def end(reactor, index, exit_code=1, signal=None):
    protocol, _ = reactor.live(index)
    protocol.processEnded(Failure(error.ProcessTerminated(exitCode=exit_code, signal=signal)))


def listening(reactor, index):
    protocol, _ = reactor.live(index)
    protocol.childDataReceived(LISTENING_FD, b"listening\n")


def test_a_worker_starts_with_the_parents_sys_path_made_absolute():
    pool, reactor, _ = pool_of(2, path=["", "/site-packages", "relative"])
    ((_, argv, child_fds, _),) = reactor.spawned
    assert argv[1] == "-c"
    # Set first thing: nothing the worker imports can come from its working directory.
    expected = [os.getcwd(), "/site-packages", os.path.abspath("relative")]
    assert argv[2].startswith(f"import sys; sys.path[:] = {expected!r};")
    assert argv[3:] == ["--nodaemon", "--pidfile=", "chatgateway", "--http-port", "9300", "--worker-index", "1"]
    assert child_fds == {0: "w", 1: 1, 2: 2, LISTENING_FD: "r"}


def test_three_deaths_soon_after_start_stop_the_parent_with_the_reason():
    pool, reactor, gave_up = pool_of(2)
    for death in range(3):
        reactor.advance(2)  # each dies 2 s after its start
        end(reactor, 1, exit_code=1)
        if death < 2:
            assert gave_up == []
            reactor.advance(workers.RESTART_DELAY_SEC)
    assert gave_up == ["worker w1 died 3 times within 10 s of starting (last exit: status 1)"]
    reactor.advance(60)
    assert len(reactor.spawned) == 3  # no restart after giving up


def test_a_worker_that_ran_a_while_is_restarted_and_its_count_starts_over():
    pool, reactor, gave_up = pool_of(2)
    for _ in range(2):
        reactor.advance(1)
        end(reactor, 1)
        reactor.advance(workers.RESTART_DELAY_SEC)
    reactor.advance(workers.STARTUP_WINDOW_SEC)  # this one runs past the start window
    end(reactor, 1, exit_code=None, signal=9)
    reactor.advance(workers.RESTART_DELAY_SEC)
    for _ in range(2):
        reactor.advance(1)
        end(reactor, 1)
        reactor.advance(workers.RESTART_DELAY_SEC)
    assert gave_up == [] and len(reactor.spawned) == 6
    reactor.advance(1)
    end(reactor, 1)
    assert gave_up == ["worker w1 died 3 times within 10 s of starting (last exit: status 1)"]


def test_early_deaths_are_counted_per_worker():
    pool, reactor, gave_up = pool_of(3)
    for index in (1, 2, 1, 2):
        reactor.advance(1)
        end(reactor, index)
        reactor.advance(workers.RESTART_DELAY_SEC)
    assert gave_up == []
    end(reactor, 2, exit_code=None, signal=6)
    assert gave_up == ["worker w2 died 3 times within 10 s of starting (last exit: signal 6)"]


def test_workers_are_missing_until_they_listen_and_every_worker_is_told():
    pool, reactor, _ = pool_of(3)
    assert pool.readiness() == "missing w1, w2"
    listening(reactor, 1)
    assert pool.readiness() == "missing w2"
    listening(reactor, 2)
    assert pool.readiness() == "up"
    _, first = reactor.live(1)
    _, second = reactor.live(2)
    assert first.written[-1] == second.written[-1] == b"up\n"
    end(reactor, 2, exit_code=None, signal=9)
    assert pool.readiness() == "missing w2"
    assert first.written[-1] == b"missing w2\n"
    reactor.advance(workers.RESTART_DELAY_SEC)
    _, restarted = reactor.live(2)
    assert restarted is not second and restarted.written == [b"missing w2\n"]
    listening(reactor, 2)
    assert pool.readiness() == "up" and first.written[-1] == restarted.written[-1] == b"up\n"


def test_a_stopping_pool_terminates_its_workers_and_restarts_none():
    pool, reactor, gave_up = pool_of(2)
    _, process = reactor.live(1)
    stopped = pool.stopService()
    assert process.signals == ["TERM"]
    end(reactor, 1, exit_code=0)
    assert stopped.called
    reactor.advance(60)
    assert len(reactor.spawned) == 1 and gave_up == []


class PipeReactor:
    running = True

    def __init__(self):
        self.stopped = False
        self.readers = []

    def addReader(self, reader):
        self.readers.append(reader)

    def removeReader(self, reader):
        self.readers.remove(reader)

    def stop(self):
        self.stopped = True


def test_a_worker_keeps_the_parents_last_word_and_stops_when_the_pipe_ends():
    from chatgateway.workers import _ParentPipe

    reactor, watch = PipeReactor(), ParentWatch(None)
    assert watch.readiness() == "unknown"  # not ready before the parent has said anything
    read, write = os.pipe()
    pipe = _ParentPipe(reactor, watch._heard, fd=read)
    reactor.addReader(pipe)
    os.write(write, b"missing w1\nu")
    assert pipe.doRead() is None
    assert watch.readiness() == "missing w1"
    os.write(write, b"p\n")
    pipe.doRead()
    assert watch.readiness() == "up"
    os.close(write)
    reason = pipe.doRead()
    pipe.connectionLost(reason)
    assert reactor.stopped and reactor.readers == []
    os.close(read)


def test_a_worker_tells_its_parent_on_the_pipe_and_only_on_a_pipe():
    from chatgateway.workers import _tell_parent_listening

    read, write = os.pipe()
    _tell_parent_listening(write)
    assert os.read(read, 100) == b"listening\n"
    assert os.read(read, 100) == b""  # told once: the worker's end is closed
    os.close(read)
    with tempfile.TemporaryFile() as not_a_pipe:  # fd 3 of a process no pool started
        _tell_parent_listening(not_a_pipe.fileno())
        not_a_pipe.seek(0)
        assert not_a_pipe.read() == b""
