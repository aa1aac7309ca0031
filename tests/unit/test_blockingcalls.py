"""chatgateway.core.blockingcalls: blocking callables on a fixed set of threads, answered on the reactor."""

import threading

import pytest
import pytest_twisted
from twisted.internet import defer, reactor, threads

from chatgateway.core.blockingcalls import BlockingCalls


@pytest.fixture
def pool():
    calls = BlockingCalls(reactor, 3, "test-calls")
    calls.start()
    yield calls
    calls.stop()


@pytest_twisted.ensureDeferred
async def test_results_and_errors_come_back_on_the_reactor_thread(pool):
    seen = []

    def on_reactor(value):
        seen.append(threading.current_thread() is threading.main_thread())
        return value

    assert await pool.call(lambda a, b: a + b, 2, 3).addCallback(on_reactor) == 5
    with pytest.raises(ZeroDivisionError):
        await pool.call(lambda: 1 / 0).addErrback(lambda f: on_reactor(f))
    assert seen == [True, True]


@pytest_twisted.ensureDeferred
async def test_at_most_the_pools_threads_run_at_once(pool):
    release = threading.Event()
    running, most = [0], [0]
    lock = threading.Lock()

    def job():
        with lock:
            running[0] += 1
            most[0] = max(most[0], running[0])
        release.wait(10)
        with lock:
            running[0] -= 1
        return threading.current_thread().name

    calls = [pool.call(job) for _ in range(10)]
    await threads.deferToThread(lambda: [release.wait(0.3)])  # let the threads take what they can
    assert running[0] == 3
    release.set()
    names = await defer.gatherResults(calls)
    assert most[0] == 3
    assert set(names) <= {"test-calls-0", "test-calls-1", "test-calls-2"}


@pytest_twisted.ensureDeferred
async def test_stop_finishes_what_was_queued_and_later_calls_fail():
    calls = BlockingCalls(reactor, 1, "test-stop")
    calls.start()
    queued = [calls.call(lambda i=i: i) for i in range(5)]
    await threads.deferToThread(calls.stop)
    assert await defer.gatherResults(queued) == [0, 1, 2, 3, 4]
    with pytest.raises(RuntimeError, match="not started"):
        await calls.call(lambda: 1)
