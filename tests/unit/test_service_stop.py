"""The service tree's stop: every child is stopped, and a failed stop reaches the caller and the exit code."""

import pytest
from twisted.application import service
from twisted.internet import defer
from twisted.internet.testing import MemoryReactor
from twisted.logger import LogLevel, globalLogPublisher

from chatgateway.service import StopFailed, _Root, _Signals


class Child(service.Service):
    """Records when it is asked to stop; its stop fails with ``error`` (at once or later)."""

    def __init__(self, name, stopped, error=None, pending=False):
        self.setName(name)
        self._stopped = stopped
        self._error = error
        self.finish = defer.Deferred() if pending else None

    def stopService(self):
        super().stopService()
        self._stopped.append(self.name)
        if self.finish is not None:
            return self.finish
        if self._error is not None:
            raise self._error
        return None


def tree(*children, gateway):
    root = _Root()
    for child in children:
        child.setServiceParent(root)
    root.gateway = next(child for child in children if child.name == gateway)
    root.startService()
    return root


def failure_of(d):
    failures = []
    d.addErrback(failures.append)
    assert len(failures) == 1, "the stop did not fail"
    return failures[0]


@pytest.fixture
def logged():
    events = []
    globalLogPublisher.addObserver(events.append)
    yield events
    globalLogPublisher.removeObserver(events.append)


def test_a_failed_stop_fails_the_root_after_every_other_child_stopped(logged):
    stopped = []
    boom = RuntimeError("store refused")
    root = tree(
        Child("telemetry", stopped),
        Child("store", stopped, error=boom),
        Child("core-client", stopped),
        Child("gateway", stopped),
        Child("http", stopped),
        gateway="gateway",
    )

    failure = failure_of(root.stopService())

    assert stopped == ["http", "gateway", "core-client", "store", "telemetry"]
    assert not any(child.running for child in root)
    assert failure.check(StopFailed)
    assert [(name, f.value) for name, f in failure.value.failures] == [("store", boom)]
    assert root.stop_error is failure.value
    assert str(failure.value) == "store: RuntimeError: store refused"
    assert [e["name"] for e in logged if e.get("log_format") == "stopping {name} failed"] == ["store"]


def test_failures_of_both_phases_are_all_reported_in_stop_order():
    stopped = []
    errors = {"grpc": ValueError("port"), "bus": ConnectionError("gone")}
    root = tree(
        Child("bus", stopped, error=errors["bus"]),
        Child("gateway", stopped),
        Child("grpc", stopped, error=errors["grpc"]),
        gateway="gateway",
    )

    failure = failure_of(root.stopService())

    assert stopped == ["grpc", "gateway", "bus"]
    assert [(name, f.value) for name, f in failure.value.failures] == [("grpc", errors["grpc"]), ("bus", errors["bus"])]


def test_the_drain_waits_for_the_first_phase_even_when_part_of_it_failed():
    stopped = []
    root = tree(
        Child("store", stopped),
        Child("gateway", stopped, pending=True),
        Child("http", stopped, error=OSError("listening")),
        gateway="gateway",
    )
    gateway = root.getServiceNamed("gateway")

    d = root.stopService()
    assert stopped == ["http", "gateway"] and not d.called  # the store waits for the gateway's drain
    gateway.finish.callback(None)

    assert stopped == ["http", "gateway", "store"]
    assert [name for name, _ in failure_of(d).value.failures] == ["http"]


def test_a_clean_stop_succeeds():
    stopped = []
    root = tree(Child("store", stopped), Child("gateway", stopped), gateway="gateway")
    results = []
    root.stopService().addBoth(results.append)
    assert results == [None] and root.stop_error is None


def signals_after_shutdown(root):
    """A started _Signals of ``root`` on a MemoryReactor: its after-shutdown trigger and the exit codes it used."""
    reactor = MemoryReactor()
    exits = []
    signals = _Signals(reactor, drain_timeout=30, tree=root, exit=exits.append)
    signals.startService()  # the reactor never runs: no signal handler is installed
    [(trigger, args, kwargs)] = reactor.triggers["after"]["shutdown"]
    return lambda: trigger(*args, **kwargs), exits


def test_twistd_exits_1_when_a_service_failed_to_stop(logged):
    root = tree(Child("store", [], error=RuntimeError("store refused")), Child("gateway", []), gateway="gateway")
    after_shutdown, exits = signals_after_shutdown(root)
    root.stopService().addErrback(lambda failure: None)  # twistd's own DeferredList ignores it

    after_shutdown()

    assert exits == [1]
    [exiting] = [e for e in logged if e.get("log_format", "").startswith("services failed to stop")]
    assert exiting["log_level"] == LogLevel.critical
    assert str(exiting["error"]) == "store: RuntimeError: store refused"


def test_twistd_exits_normally_after_a_clean_stop():
    root = tree(Child("store", []), Child("gateway", []), gateway="gateway")
    after_shutdown, exits = signals_after_shutdown(root)
    root.stopService()

    after_shutdown()

    assert exits == []  # twistd then exits 0
