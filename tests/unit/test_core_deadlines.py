"""CoreClient's deadlines on a task.Clock: fake threads and a fake stub drive the queue of calls.

FakeThreads stands in for BlockingCalls: a free thread takes the next job at once and is
busy for as long as the stub says the core kept it (a core that never answers keeps it
until the timeout the stub was given, as grpc would), then takes the next one.
"""

import collections

import grpc
import pytest
from twisted.internet import defer, task
from twisted.python.failure import Failure

from chatgateway.api import chat_pb2 as pb
from chatgateway.core import breaker as circuit
from chatgateway.core.breaker import CircuitBreaker
from chatgateway.core.client import CoreClient


class DeadlineExceeded(grpc.RpcError):
    def code(self):
        return grpc.StatusCode.DEADLINE_EXCEEDED

    def details(self):
        return "Deadline Exceeded"


class FakeChannel:
    """Every method is one stub: it records (room id, timeout) and asks ``core(request, timeout)``
    for how long the core keeps the call and its answer (None: it never answers)."""

    def __init__(self, core):
        self.core = core
        self.calls = []
        self.blocked = 0.0  # how long the last stub call kept its thread

    def _stub(self, request, timeout, metadata):
        self.calls.append((request.room_id, timeout))
        took, answer = self.core(request, timeout)
        if answer is None:
            self.blocked = timeout
            raise DeadlineExceeded()
        self.blocked = took
        return answer

    def unary_unary(self, path, request_serializer, response_deserializer):
        return self._stub

    unary_stream = unary_unary

    def close(self):
        pass


class FakeThreads:
    def __init__(self, clock, channel, count):
        self.clock = clock
        self.channel = channel
        self.free = count
        self.jobs = collections.deque()

    def start(self):
        pass

    def stop(self):
        pass

    def call(self, f, *args):
        d = defer.Deferred()
        self.jobs.append((d, f, args))
        self._take()
        return d

    def _take(self):
        while self.free and self.jobs:
            self.free -= 1
            d, f, args = self.jobs.popleft()
            self.channel.blocked = 0.0
            try:
                result = f(*args)
            except BaseException:
                result = Failure()
            self.clock.callLater(self.channel.blocked, self._done, d, result)

    def _done(self, d, result):
        self.free += 1
        (d.errback if isinstance(result, Failure) else d.callback)(result)
        self._take()


def never_answers(request, timeout):
    return None, None


def answers_in(seconds):
    return lambda request, timeout: (seconds, pb.GetHistoryResponse())


def make_client(core=never_answers, threads=2, timeout=2.0, failures=5):
    clock = task.Clock()
    clock.advance(1000)
    channel = FakeChannel(core)
    pool = FakeThreads(clock, channel, threads)
    breaker = CircuitBreaker(clock, failures=failures, cooldown=30)
    client = CoreClient(
        "fake", clock, timeout, threads, "gw-unit", breaker=breaker, clock=clock, pool=pool, channel=channel
    )
    client.start()
    return clock, channel, client


def call(client, room, **options):
    return client.call("GetHistory", pb.GetHistoryRequest(room_id=room), "t", **options)


def watch(d, clock, answers, name):
    """Record when (and with which code) ``d`` is answered."""

    def answered(result):
        code = result.value.code if isinstance(result, Failure) else grpc.StatusCode.OK
        answers[name] = (clock.seconds(), code)

    d.addBoth(answered)


def outcome(d):
    """The status code ``d`` was answered with (it must have been)."""
    answers = {}
    watch(d, task.Clock(), answers, "d")
    assert answers, "not answered"
    return answers["d"][1]


def run(clock, seconds):
    """Let ``seconds`` pass on ``clock``, stopping at each timer exactly when it is due."""
    end = clock.seconds() + seconds
    while True:
        due = min((c.getTime() for c in clock.getDelayedCalls()), default=end)
        if due >= end:
            break
        clock.advance(max(0.0, due - clock.seconds()))
    clock.advance(end - clock.seconds())


def test_no_call_outlives_its_deadline_whether_it_ran_waited_for_a_thread_or_was_refused():
    clock, channel, client = make_client(threads=2, timeout=2.0)
    start = clock.seconds()
    answers = {}
    for i in range(200):
        watch(call(client, str(i)), clock, answers, i)
    run(clock, 12)
    assert len(answers) == 200
    late = {i: at - start for i, (at, _) in answers.items() if at - start > 2.0}
    assert late == {}
    codes = collections.Counter(code for _, code in answers.values())
    # 2 on the threads, 8 queued for them, 100 waiting for a place; the other 90 refused at once
    assert codes == {grpc.StatusCode.DEADLINE_EXCEEDED: 110, grpc.StatusCode.RESOURCE_EXHAUSTED: 90}
    assert channel.calls == [("0", 2.0), ("1", 2.0)]  # the queued ones never reached the core
    assert (client.in_flight, client.waiting) == (0, 0)


def test_a_call_taken_late_by_a_thread_gets_what_is_left_of_its_deadline():
    clock, channel, client = make_client(answers_in(1.5), threads=1, timeout=5.0)
    first, second = call(client, "first"), call(client, "second")
    run(clock, 3.5)
    assert outcome(first) == outcome(second) == grpc.StatusCode.OK
    assert channel.calls == [("first", 5.0), ("second", pytest.approx(3.5))]


def test_a_callers_own_deadline_is_kept_and_never_more_than_core_timeout():
    clock, channel, client = make_client(answers_in(0.0), timeout=5.0)
    call(client, "r", timeout=1.75)
    call(client, "long", timeout=60)
    assert channel.calls == [("r", 1.75), ("long", 5.0)]
    assert outcome(call(client, "gone", timeout=-0.5)) == grpc.StatusCode.DEADLINE_EXCEEDED
    assert len(channel.calls) == 2


def test_a_short_deadline_queued_behind_long_ones_is_answered_at_its_own():
    clock, channel, client = make_client(threads=1, timeout=5.0)
    start = clock.seconds()
    answers = {}
    deadlines = {"in-pool": 0.7, "waiting": 0.5}
    for name in ["running", "in-pool", "long2", "long3", "long4", "waiting"]:
        options = {"timeout": deadlines[name]} if name in deadlines else {}
        watch(call(client, name, **options), clock, answers, name)
    assert (client.in_flight, client.waiting) == (5, 1)  # one on the thread, four queued for it, one waiting
    run(clock, 0.8)
    assert answers == {
        "waiting": (pytest.approx(start + 0.5), grpc.StatusCode.DEADLINE_EXCEEDED),
        "in-pool": (pytest.approx(start + 0.7), grpc.StatusCode.DEADLINE_EXCEEDED),
    }
    run(clock, 6)
    assert [room for room, _ in channel.calls] == ["running"]  # the others ran out queued behind it
    assert len(answers) == 6 and all(at - start <= 5.0 for at, _ in answers.values())


def test_one_timer_watches_every_call_waiting_for_a_thread():
    clock, channel, client = make_client(threads=2, timeout=2.0)
    calls = [call(client, str(i)) for i in range(100)]
    # the fake threads' two busy calls, and one for the 98 waiting for a thread
    assert len(clock.getDelayedCalls()) == 3
    run(clock, 2.5)
    assert {outcome(d) for d in calls} == {grpc.StatusCode.DEADLINE_EXCEEDED}
    assert clock.getDelayedCalls() == []


def test_calls_that_got_a_thread_are_not_kept_by_the_watch():
    clock, channel, client = make_client(answers_in(0.001), threads=1, timeout=60.0)
    for _ in range(40):
        calls = [call(client, "r") for _ in range(5)]
        run(clock, 0.01)
        assert {outcome(d) for d in calls} == {grpc.StatusCode.OK}
    assert len(client._deadlines) < 100  # 160 calls queued for the thread, each done long before its deadline


def test_a_timeout_after_waiting_for_a_thread_does_not_count_against_the_core():
    def core(request, timeout):
        return (4.0, pb.GetHistoryResponse()) if request.room_id == "slow" else (None, None)

    clock, channel, client = make_client(core, threads=1, timeout=5.0, failures=1)
    slow, behind = call(client, "slow"), call(client, "behind")
    run(clock, 5.5)
    assert (outcome(slow), outcome(behind)) == (grpc.StatusCode.OK, grpc.StatusCode.DEADLINE_EXCEEDED)
    assert channel.calls == [("slow", 5.0), ("behind", pytest.approx(1.0))]
    assert client.breaker.state == circuit.CLOSED  # one second at the core says nothing about it
    hung = call(client, "hung")
    run(clock, 5.5)
    assert outcome(hung) == grpc.StatusCode.DEADLINE_EXCEEDED
    assert client.breaker.state == circuit.OPEN  # the whole CORE_TIMEOUT_SEC does
