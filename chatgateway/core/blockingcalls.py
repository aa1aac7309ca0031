"""Blocking calls on a fixed set of threads of their own, answered on the reactor.

What ``deferToThreadPool`` does, for the calls a connect storm makes by the
thousand (the core's SearchRooms for every new device). Twisted's ThreadPool
routes each call through its ``Team``: a coordinator lock, a worker hand-off
and a log-context wrapper, about 0.15 ms of the reactor's time per call, a
fifth of what a whole connect costs it. Here a call is one ``SimpleQueue.put``
(the waiting thread wakes on it) and the answer one ``callFromThread``.

The threads are started with the pool and live until ``stop``: a thread blocked
on the queue costs nothing. The callables must end on their own (the core
client's calls carry gRPC deadlines), since ``stop`` waits for them.
"""

import queue
import threading

from twisted.internet import defer
from twisted.python.failure import Failure

_STOP = object()


class BlockingCalls:
    """``threads`` threads running blocking callables; each ``call`` is a Deferred."""

    def __init__(self, reactor, threads, name):
        self._reactor = reactor
        self._count = threads
        self._name = name
        self._jobs = queue.SimpleQueue()
        self._threads = []

    def start(self):
        for i in range(self._count):
            thread = threading.Thread(target=self._work, name=f"{self._name}-{i}", daemon=True)
            thread.start()
            self._threads.append(thread)

    def call(self, f, *args):
        """Run ``f(*args)`` on a thread; a Deferred of its result, fired on the reactor."""
        if not self._threads:
            return defer.fail(RuntimeError(f"{self._name}: not started"))
        d = defer.Deferred()
        self._jobs.put((d, f, args))
        return d

    def stop(self):
        """Let the calls queued so far finish, then end the threads (blocking: call it off the reactor)."""
        threads, self._threads = self._threads, []
        for _ in threads:
            self._jobs.put(_STOP)
        for thread in threads:
            thread.join()

    def _work(self):
        fire = self._reactor.callFromThread
        while True:
            job = self._jobs.get()
            if job is _STOP:
                return
            d, f, args = job
            try:
                result = f(*args)
            except BaseException:
                fire(d.errback, Failure())
            else:
                fire(d.callback, result)
