"""The HTTP surface on HTTP_PORT: /ws, the Connect protocol, /healthz, /readyz, /metrics,
(with CONSOLE_ENABLED) the web console at /console/, and /dev/token in development."""

import json
import re

from autobahn.twisted.resource import WebSocketResource
from twisted.internet import defer
from twisted.logger import Logger
from twisted.web import http, resource, server, util

from chatgateway.core.client import SERVICE
from chatgateway.edge.connect import ConnectService
from chatgateway.edge.limits import ConnectionLimits, Guard
from chatgateway.edge.router import EdgeRouter
from chatgateway.edge.websocket import DeviceFactory
from chatgateway.telemetry import readiness
from chatgateway.telemetry.exposition import MetricsResource

_SECRET_PARAMS = re.compile(r"((?:access_token|token)=)[^&\s\"]+")


def redacting_log_formatter(timestamp, request):
    """The combined access-log line, with tokens in query strings replaced."""
    return _SECRET_PARAMS.sub(r"\1REDACTED", http.combinedLogFormatter(timestamp, request))


def _json(request, status, body):
    request.setResponseCode(status)
    request.setHeader(b"content-type", b"application/json")
    request.setHeader(b"cache-control", b"no-store")
    return json.dumps(body, sort_keys=True).encode("utf-8") + b"\n"


class Healthz(resource.Resource):
    """Liveness: the process and its reactor answer."""

    isLeaf = True

    def render_GET(self, request):
        return _json(request, 200, {"status": "alive"})


class Readyz(resource.Resource):
    """Readiness: 200 when listening and every dependency answers, else 503."""

    isLeaf = True
    log = Logger()

    def __init__(self, checks):
        super().__init__()
        self._checks = checks  # name -> callable returning bool or Deferred[bool]

    def render_GET(self, request):
        d = defer.Deferred.fromCoroutine(self._states())

        def answer(states):
            ready = readiness.is_ready(states)
            body = {"status": "ready" if ready else "unavailable", "dependencies": states}
            if not request.finished and not request._disconnected:
                request.write(_json(request, 200 if ready else 503, body))
                request.finish()

        d.addCallback(answer)
        d.addErrback(lambda f: self.log.failure("readiness check failed", f))
        return server.NOT_DONE_YET

    def _states(self):
        return readiness.dependency_states(self._checks)


class DevToken(resource.Resource):
    """Development only: GET /dev/token?profile=alice&device=phone mints an HS256 token.

    ``&admin=1`` adds the console's admin scope (docs/console.md#the-admin-claim).
    """

    isLeaf = True

    def __init__(self, mint):
        super().__init__()
        self._mint = mint

    def render_GET(self, request):
        profile = (request.args.get(b"profile") or [b""])[0].decode("utf-8", "replace")
        device = (request.args.get(b"device") or [b""])[0].decode("utf-8", "replace") or None
        if not profile:
            return _json(request, 400, {"error": "profile is required"})
        admin = (request.args.get(b"admin") or [b""])[0] in (b"1", b"true")
        token = self._mint(profile, device, admin=True) if admin else self._mint(profile, device)
        return _json(request, 200, {"token": token, "profile_id": profile, "device_id": device})


class _Request(server.Request):
    """Tells the connection's Guard (chatgateway.edge.limits) that a request's headers are in."""

    def process(self):
        guard = getattr(self.channel, "transport", None)
        if isinstance(guard, Guard):
            # An upgrade (on any path under /ws) counts again at Autobahn's onConnect, and its
            # request never finishes: the handshake timer is not re-armed on it.
            guard.request_received()
            self.notifyFinish().addBoth(lambda _: guard.response_finished())
        super().process()


def build_http_factory(gateway, checks, mint=None, clock=None, devices=None, telemetry=None, console=None):
    """The factory of HTTP_PORT: the Site behind the per-connection limits.

    ``devices``: the DeviceFactory of /ws (made here when not given); ``telemetry``: the
    Telemetry whose metrics /metrics shows (503 without one); ``console``: the resource of
    /console/ (chatgateway.console.resources), when CONSOLE_ENABLED.
    """
    config = gateway.config
    site = build_site(gateway, checks, mint, devices, telemetry, console)
    return ConnectionLimits(
        EdgeRouter(site, site.devices, clock if clock is not None else gateway.clock),
        clock if clock is not None else gateway.clock,
        config.max_unauthenticated_per_address,
        config.handshake_timeout_sec,
    )


def build_site(gateway, checks, mint=None, devices=None, telemetry=None, console=None):
    root = resource.Resource()
    factory = devices if devices is not None else DeviceFactory(gateway)
    root.putChild(b"ws", WebSocketResource(factory))
    root.putChild(b"healthz", Healthz())
    root.putChild(b"readyz", Readyz(checks))
    root.putChild(b"metrics", MetricsResource(telemetry))  # Prometheus text format
    root.putChild(
        SERVICE.encode("ascii"), ConnectService(gateway)
    )  # Connect protocol: POST /chat.v1.ChatService/<Method>
    if console is not None:
        root.putChild(b"console", console)
        root.putChild(b"", util.Redirect(b"/console/"))  # a newcomer opens the bare URL
    if mint is not None:
        dev = resource.Resource()
        dev.putChild(b"token", DevToken(mint))
        root.putChild(b"dev", dev)
    site = server.Site(root, logFormatter=redacting_log_formatter)
    site.requestFactory = _Request
    site.devices = factory  # the WebSocket factory: its connections count toward MAX_CONNECTIONS
    site.noisy = False
    return site
