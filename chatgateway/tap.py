"""``twistd chatgateway``: options and makeService.

Every setting of chatgateway.config is also an option (``--http-port 8080``
for HTTP_PORT) that overrides the environment. ``--dev`` runs the reference
core in-process on the embedded store and bus, with a generated HS256
secret, and prints how to connect.
"""

import os
import secrets
import sys

from twisted.python import usage

from chatgateway import config as configuration

DEV_ISSUER = "chatgateway-dev"
DEV_HTTP_PORT = "8080"


class Options(usage.Options):
    optFlags = [["dev", None, "Development mode: reference core in-process, generated secret, port 8080."]]
    optParameters = [
        [s.name.lower().replace("_", "-"), None, None, f"{s.help} [env {s.name}, default {s.default or 'unset'}]"]
        for s in configuration.SETTINGS
    ]

    def postOptions(self):
        overrides = {s.name: self[s.name.lower().replace("_", "-")] for s in configuration.SETTINGS}
        environ = dict(os.environ)
        if self["dev"]:
            environ = dev_environment(environ, overrides)
        try:
            self.config = configuration.load(environ, overrides)
        except configuration.ConfigError as e:
            raise usage.UsageError("invalid configuration:\n  " + "\n  ".join(e.problems)) from None


def dev_environment(environ, overrides):
    """Development defaults, each only where the operator set nothing."""
    environ = dict(environ)

    def default(name, value):
        if not environ.get(name) and overrides.get(name) is None:
            environ[name] = value

    default("JWT_SECRET", secrets.token_urlsafe(32))
    default("OAUTH2_ISSUER", DEV_ISSUER)
    default("HTTP_PORT", DEV_HTTP_PORT)
    default("HTTP_INTERFACE", "127.0.0.1")
    default("CACHE_URI", "memory://")
    return environ


def dev_banner(config):
    host = config.http_interface or "localhost"
    base = f"http://{host}:{config.http_port}"
    return "\n".join(
        [
            "",
            "chatgateway development mode: reference core in-process, in-memory store and bus.",
            f"  WebSocket:  ws://{host}:{config.http_port}/ws",
            f"  token:      curl '{base}/dev/token?profile=alice&device=laptop'",
            f"  CLI:        chatgateway-client --url ws://{host}:{config.http_port}/ws --as alice rooms create general",
            f"              chatgateway-client --url ws://{host}:{config.http_port}/ws --as alice tail ROOM_ID",
            f"  health:     {base}/healthz  {base}/readyz",
            "",
        ]
    )


def makeService(options, reactor=None):
    if reactor is None:
        from twisted.internet import reactor
    from chatgateway.service import make_gateway_service

    config = options.config
    if options["dev"]:
        sys.stdout.write(dev_banner(config) + "\n")
        sys.stdout.flush()
    return make_gateway_service(config, reactor, dev=options["dev"])
