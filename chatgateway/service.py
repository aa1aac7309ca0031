"""The gateway's service tree: store, bus, (reference core), core client, gateway, listeners.

Children start in the order added. They stop as a drain (docs/operations.md#stopping-the-drain):
first, together and at once, the gateway and everything added after it (the
listeners close, /readyz answers 503, every device is closed with 1001 once its
commands in flight are answered); then the others one at a time in reverse
order, so the core client waits for the calls still in flight and the store,
last, removes this instance's entries.

Every child is stopped even when another's stop fails (each failure is logged as it
happens); the root's stopService then fails with StopFailed, naming them all.

Under twistd, SIGTERM and SIGINT start that drain and the process exits 0 when it
is done (twistd itself would end with -SIGTERM); a second signal exits at once,
and a drain still running DRAIN_TIMEOUT_SEC + 1 s after the signal exits 1. twistd
exits 0 whatever the outcome of the stop it waited for, so a drain in which a
service failed to stop ends the process with 1, once the reactor has shut down.
"""

import gc
import os
import signal
import sys
import threading

from twisted.application import service
from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure

from chatgateway.auth.clientcredentials import ClientCredentials
from chatgateway.auth.devtokens import mint_token
from chatgateway.auth.tokens import TokenVerifier
from chatgateway.bus import make_bus
from chatgateway.bus.memory import MemoryHub
from chatgateway.console.admin import ADMIN_SCOPE
from chatgateway.console.resources import Console
from chatgateway.console.status import StatusSampler
from chatgateway.core.breaker import CircuitBreaker
from chatgateway.core.client import CoreClient
from chatgateway.edge.grpc import GrpcEdge
from chatgateway.edge.http import build_http_factory
from chatgateway.edge.websocket import DeviceFactory
from chatgateway.sessions.gateway import Gateway
from chatgateway.store import make_store
from chatgateway.telemetry.corecalls import InstrumentedCore
from chatgateway.telemetry.counts import GatewayCounts
from chatgateway.telemetry.logs import LogLevelService
from chatgateway.telemetry.providers import Telemetry, TelemetryService
from chatgateway.workers import BACKLOG, listen_shared


class _Lifecycle(service.Service):
    """Adapts an object with start()/stop() to a named child service."""

    def __init__(self, name, target, start="start", stop="stop"):
        # start=None: nothing to start (the target is ready when built).
        self.setName(name)
        self._target = target
        self._start = start
        self._stop = stop

    def startService(self):
        super().startService()
        if self._start:
            getattr(self._target, self._start)()

    def stopService(self):
        super().stopService()
        return defer.maybeDeferred(getattr(self._target, self._stop))


class _StoreService(service.Service):
    log = Logger()

    def __init__(self, store):
        self.setName("store")
        self.store = store

    def startService(self):
        super().startService()
        self.store.start().addErrback(lambda f: self.log.failure("store failed to start", f))

    def stopService(self):
        super().stopService()
        return self.store.stop()


# Allocations between two collections of the young generation (CPython's default: 700).
# A connect allocates some thousand objects that mostly live as long as the connection, and
# each young collection that finds them alive moves them towards the old generation, whose
# full collections walk every object of the process (docs/performance.md#garbage-collection).
GC_YOUNG_THRESHOLD = 50_000


class GarbageCollection(service.Service):
    """Tunes CPython's cyclic collector for a long-lived server: what exists once the
    process has started (modules, the service tree) is frozen out of every collection, and
    the young generation is collected every GC_YOUNG_THRESHOLD allocations. Undone on stop."""

    def __init__(self, young_threshold=GC_YOUNG_THRESHOLD):
        self.setName("garbage-collection")
        self._young = young_threshold
        self._before = None

    def startService(self):
        super().startService()
        self._before = gc.get_threshold()
        gc.collect()  # what startup left as garbage is not frozen with the rest
        gc.freeze()
        gc.set_threshold(self._young, *self._before[1:])

    def stopService(self):
        super().stopService()
        if self._before is not None:
            gc.set_threshold(*self._before)
            gc.unfreeze()
            self._before = None


class _Listener(service.Service):
    """Listens on a TCP port; fails startService at once when the port is taken."""

    log = Logger()

    def __init__(self, name, reactor, port, interface="", shared=False):
        self.setName(name)
        self._shared = shared  # SO_REUSEPORT: worker processes accept on the same port
        self._reactor = reactor
        self._port = port
        self._interface = interface
        self.factory = None
        self.on_listening = None  # called with the bound address
        self.listening = None

    def startService(self):
        super().startService()
        if self._shared:
            self.listening = listen_shared(self._reactor, self._port, self.factory, self._interface)
        else:
            # The same accept backlog as shared ports: Twisted's default of 50 drops SYNs in a connect storm.
            self.listening = self._reactor.listenTCP(
                self._port, self.factory, backlog=BACKLOG, interface=self._interface
            )
        address = self.listening.getHost()
        self.log.info("{name} listening on {host}:{port}", name=self.name, host=address.host, port=address.port)
        if self.on_listening is not None:
            self.on_listening(address)

    def stopService(self):
        super().stopService()
        listening, self.listening = self.listening, None
        return defer.maybeDeferred(listening.stopListening) if listening else defer.succeed(None)


class StopFailed(Exception):
    """Services whose stopService failed; ``failures`` lists (name, Failure) in stop order."""

    def __init__(self, failures):
        super().__init__("; ".join(f"{name}: {f.type.__name__}: {f.getErrorMessage()}" for name, f in failures))
        self.failures = failures


class _Root(service.MultiService):
    """The service tree's root; stops in two phases (see the module docstring).

    ``stop_error``: the StopFailed its last stop failed with, if it did.
    """

    log = Logger()
    gateway = None
    stop_error = None

    def stopService(self):
        service.Service.stopService(self)
        return defer.Deferred.fromCoroutine(self._stop())

    async def _stop(self):
        children = list(self)
        split = children.index(self.gateway) if self.gateway in children else len(children)
        together = [defer.Deferred.fromCoroutine(self._stop_child(child)) for child in reversed(children[split:])]
        failures = [failure for failure in await defer.gatherResults(together) if failure is not None]
        for child in reversed(children[:split]):
            failure = await self._stop_child(child)
            if failure is not None:
                failures.append(failure)
        if failures:
            self.stop_error = StopFailed(failures)
            raise self.stop_error

    async def _stop_child(self, child):
        """(name, Failure) when ``child`` failed to stop (logged here), else None."""
        try:
            await defer.maybeDeferred(child.stopService)
        except Exception:
            failure = Failure()
            self.log.failure("stopping {name} failed", failure, name=child.name)
            return child.name, failure
        return None


class _Signals(service.Service):
    """SIGTERM/SIGINT under twistd: drain, then exit 0; a second signal exits at once.

    A shutdown (signalled or not) in which ``tree`` failed to stop exits 1 instead,
    through ``exit`` (os._exit: twistd would exit 0 after it).
    """

    log = Logger()
    OVERDUE_MARGIN_SEC = 1.0
    STOP_FAILED_EXIT_CODE = 1

    def __init__(self, reactor, drain_timeout, tree, exit=os._exit):
        self.setName("signals")
        self._reactor = reactor
        self._drain_timeout = drain_timeout
        self._tree = tree
        self._exit = exit
        self._received = None
        self._watchdog = None

    def startService(self):
        super().startService()
        # After the reactor's own handlers, which would make twistd end with -SIGTERM.
        self._reactor.callWhenRunning(self._install)
        # "after": once every "before shutdown" stop, the tree's drain among them, has ended.
        self._reactor.addSystemEventTrigger("after", "shutdown", self._exit_if_stop_failed)

    def _install(self):
        for number in (signal.SIGTERM, signal.SIGINT):
            signal.signal(number, self._signalled)

    def _signalled(self, number, frame):
        if self._received is not None:
            os.write(2, f"chatgateway: second {signal.Signals(number).name}: exiting now\n".encode())
            signal.signal(number, signal.SIG_DFL)
            os.kill(os.getpid(), number)
            return
        self._received = number
        self._watchdog = threading.Timer(self._drain_timeout + self.OVERDUE_MARGIN_SEC, self._overdue)
        self._watchdog.daemon = True
        self._watchdog.start()
        self._reactor.callFromThread(self._drain, number)

    def _drain(self, number):
        self.log.info(
            "{signal}: draining (at most {timeout:g}s); send it again to exit at once",
            signal=signal.Signals(number).name,
            timeout=self._drain_timeout,
        )
        if self._reactor.running:
            self._reactor.stop()

    def _overdue(self):
        os.write(2, b"chatgateway: the drain did not end within DRAIN_TIMEOUT_SEC: exiting\n")
        self._exit(1)

    def _exit_if_stop_failed(self):
        error = self._tree.stop_error
        if error is None:
            return
        self.log.critical(
            "services failed to stop ({error}): exiting {code}", error=error, code=self.STOP_FAILED_EXIT_CODE
        )
        sys.stdout.flush()  # os._exit leaves Python's buffers unwritten
        sys.stderr.flush()
        self._exit(self.STOP_FAILED_EXIT_CODE)


def _kind(uri):
    return "memory" if uri == "memory://" else "redis"


def make_gateway_service(config, reactor, dev=False, shared_ports=False, handle_signals=False, workers_check=None):
    """The MultiService of one gateway process. With dev, the reference core runs in it.

    handle_signals (twistd): SIGTERM/SIGINT drain and exit 0, or 1 when a service
    failed to stop (see the module docstring).
    workers_check (--workers N > 1): the "workers" dependency of readiness (chatgateway.workers).
    """
    root = _Root()
    GarbageCollection().setServiceParent(root)  # first: it freezes what the others built
    LogLevelService(
        config.log_level, config.log_format, (config.jwt_secret, config.jwt_client_secret, config.resume_token_secret)
    ).setServiceParent(root)
    telemetry = Telemetry(config.gateway_id)  # the SDK's providers and exporters, per the OTEL_* environment
    counts = GatewayCounts(telemetry.instruments)  # the one everything below counts into
    telemetry.observe(counts)
    TelemetryService(telemetry, reactor).setServiceParent(root)  # stops last; flushes after the drain
    hub = MemoryHub(reactor)  # shared by the reference core of --dev: the bus and the membership cache
    store = make_store(config, reactor, counts)
    bus = make_bus(config, reactor, hub, counts)
    verifier = TokenVerifier(config, reactor)

    _StoreService(store).setServiceParent(root)
    # Stopped after the gateway's drain (started by the gateway): its connections end as a
    # stop, not as a loss to reconnect from.
    _Lifecycle("bus", bus, start=None).setServiceParent(root)
    _Lifecycle("verifier", verifier, start=None, stop="close").setServiceParent(root)
    target = config.chat_service_uri
    if dev:
        from chatgateway.devcore.service import CoreService

        core_service = CoreService(config, make_bus(config, reactor, hub, counts), reactor, port=0, verifier=verifier)
        core_service.setServiceParent(root)
        target = lambda: f"127.0.0.1:{core_service.port}"  # noqa: E731 - known once started
    breaker = CircuitBreaker(reactor, config.core_breaker_failures, config.core_breaker_cooldown_sec)
    service_token = None
    if config.oauth2_token_endpoint:
        service_token = ClientCredentials(
            config.oauth2_token_endpoint,
            config.jwt_client_id,
            config.jwt_client_secret,
            reactor,
            timeout=config.core_timeout_sec,
        )
    core = CoreClient(
        target,
        reactor,
        config.core_timeout_sec,
        config.core_threads,
        config.gateway_id,
        breaker=breaker,
        service_token=service_token,
    )
    telemetry.observe_core(core)  # its breaker state and calls in flight
    core = InstrumentedCore(core, counts)  # a span and rpc.client.call.duration per call
    _Lifecycle("core-client", core).setServiceParent(root)
    gateway = Gateway(config, reactor, verifier, core, bus, store, counts=counts)
    gateway.setName("gateway")
    gateway.setServiceParent(root)
    http = _Listener("http", reactor, config.http_port, config.http_interface, shared=shared_ports)

    def listening():
        if gateway.draining:
            return "draining"
        return http.listening is not None and gateway.running

    # Named by kind, so an operator sees e.g. "store:redis": "down".
    checks = {
        "listening": listening,
        f"store:{_kind(config.cache_uri)}": lambda: store.ready,
        f"bus:{_kind(config.events_uri)}": lambda: bus.ready,
        "core": core.readiness,
    }
    if workers_check is not None:
        checks["workers"] = workers_check
    http.on_listening = lambda address: gateway.addresses.append(f"http://{address.host}:{address.port}")
    mint = None
    if dev:

        def mint(profile_id, device_id, admin=False):
            return mint_token(
                config.jwt_secret,
                profile_id,
                device_id=device_id,
                issuer=config.oauth2_issuer,
                audience=config.oauth2_jwt_verify_audience,
                ttl=24 * 3600,
                extra={"scope": ADMIN_SCOPE} if admin else None,
            )

    devices = DeviceFactory(gateway)  # /ws
    console = None
    if config.console_enabled:
        sampler = StatusSampler(gateway, checks, store, reactor)
        sampler.setServiceParent(root)
        console = Console(verifier, sampler, dev=dev)
    http.factory = build_http_factory(
        gateway, checks, mint, clock=reactor, devices=devices, telemetry=telemetry, console=console
    )
    checks["capacity"] = lambda: "full" if devices.full else "up"  # MAX_CONNECTIONS
    http.setServiceParent(root)
    grpc_edge = GrpcEdge(gateway, reactor, config.grpc_port, config.grpc_interface, checks)
    grpc_edge.setServiceParent(root)  # stops first: its streams end with UNAVAILABLE (1001)
    if handle_signals:
        _Signals(reactor, config.drain_timeout_sec, root).setServiceParent(root)
    root.gateway = gateway
    root.http = http
    root.grpc = grpc_edge
    return root
