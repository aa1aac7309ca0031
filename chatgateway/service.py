"""The gateway's service tree: store, bus, (reference core), core client, gateway, listeners.

MultiService starts children in the order added and stops them in reverse,
so the listeners close first and the store last.
"""

from twisted.application import service
from twisted.internet import defer
from twisted.logger import Logger

from chatgateway.auth import TokenVerifier, mint_token
from chatgateway.bus import make_bus
from chatgateway.bus.memory import MemoryHub
from chatgateway.core import CoreClient
from chatgateway.edge.http import build_site
from chatgateway.gateway import Gateway
from chatgateway.logconfig import LogLevelService
from chatgateway.store import make_store


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


class _Listener(service.Service):
    """Listens on a TCP port; fails startService at once when the port is taken."""

    log = Logger()

    def __init__(self, name, reactor, port, interface=""):
        self.setName(name)
        self._reactor = reactor
        self._port = port
        self._interface = interface
        self.factory = None
        self.on_listening = None  # called with the bound address
        self.listening = None

    def startService(self):
        super().startService()
        self.listening = self._reactor.listenTCP(self._port, self.factory, interface=self._interface)
        address = self.listening.getHost()
        self.log.info("{name} listening on {host}:{port}", name=self.name, host=address.host, port=address.port)
        if self.on_listening is not None:
            self.on_listening(address)

    def stopService(self):
        super().stopService()
        listening, self.listening = self.listening, None
        return defer.maybeDeferred(listening.stopListening) if listening else defer.succeed(None)


def _kind(uri):
    return "memory" if uri == "memory://" else "redis"


def make_gateway_service(config, reactor, dev=False):
    """The MultiService of one gateway process. With dev, the reference core runs in it."""
    root = service.MultiService()
    LogLevelService(config.log_level).setServiceParent(root)
    hub = MemoryHub()
    store = make_store(config, reactor)
    bus = make_bus(config, reactor, hub)
    verifier = TokenVerifier(config, reactor)

    _StoreService(store).setServiceParent(root)
    _Lifecycle("verifier", verifier, start=None, stop="close").setServiceParent(root)
    target = config.chat_service_uri
    if dev:
        from chatgateway.devcore.service import CoreService

        core_service = CoreService(config, make_bus(config, reactor, hub), reactor, port=0, verifier=verifier)
        core_service.setServiceParent(root)
        target = lambda: f"127.0.0.1:{core_service.port}"  # noqa: E731 - known once started
    core = CoreClient(target, reactor, config.core_timeout_sec, config.core_threads, config.gateway_id)
    _Lifecycle("core-client", core).setServiceParent(root)
    gateway = Gateway(config, reactor, verifier, core, bus, store)
    gateway.setName("gateway")
    gateway.setServiceParent(root)
    http = _Listener("http", reactor, config.http_port, config.http_interface)

    def listening():
        return http.listening is not None and gateway.running

    # Named by kind, so an operator sees e.g. "store:redis": "down".
    checks = {
        "listening": listening,
        f"store:{_kind(config.cache_uri)}": lambda: store.ready,
        f"bus:{_kind(config.events_uri)}": lambda: bus.ready,
        "core": core.ping,
    }
    http.on_listening = lambda address: gateway.addresses.append(f"http://{address.host}:{address.port}")
    mint = None
    if dev:
        def mint(profile_id, device_id):
            return mint_token(
                config.jwt_secret,
                profile_id,
                device_id=device_id,
                issuer=config.oauth2_issuer,
                audience=config.oauth2_jwt_verify_audience,
                ttl=24 * 3600,
            )
    http.factory = build_site(gateway, checks, mint)
    http.setServiceParent(root)
    root.gateway = gateway
    root.http = http
    return root
