"""``twistd chatcore``: the reference core as a process of its own.

Settings come from the environment (chatgateway.config); options override them.
"""

from twisted.application import service
from twisted.python import usage

from chatgateway import config as configuration
from chatgateway.bus import make_bus
from chatgateway.devcore.service import CoreService


class Options(usage.Options):
    optParameters = [
        ["port", "p", None, "gRPC port (default: CORE_PORT, 7010; 0 picks a free one)."],
        ["interface", None, "127.0.0.1", "Address to listen on."],
        ["db", None, None, "SQLite file that keeps the data (default: CORE_DB; unset: in memory)."],
        ["jwt-secret", None, None, "HS256 secret for tokens (default: JWT_SECRET)."],
        ["issuer", None, None, "Expected iss claim (default: OAUTH2_ISSUER)."],
        ["audience", None, None, "Expected aud claim (default: OAUTH2_JWT_VERIFY_AUDIENCE)."],
    ]

    # The environment to read; None is os.environ (tests substitute a dict).
    environ = None

    _SETTING_OF = {
        "port": "CORE_PORT",
        "db": "CORE_DB",
        "jwt-secret": "JWT_SECRET",
        "issuer": "OAUTH2_ISSUER",
        "audience": "OAUTH2_JWT_VERIFY_AUDIENCE",
    }

    def postOptions(self):
        overrides = {setting: self[option] for option, setting in self._SETTING_OF.items()}
        try:
            self["config"] = configuration.load(self.environ, overrides)
        except configuration.ConfigError as e:
            raise configuration.InvalidConfiguration(e.problems, program="chatcore") from None


class BusService(service.Service):
    """Connects the bus the core publishes to, and releases it on stop."""

    def __init__(self, bus):
        self.bus = bus

    def startService(self):
        super().startService()
        self.bus.start(lambda channel, payload: None)  # the core publishes only

    def stopService(self):
        super().stopService()
        return self.bus.stop()


def makeService(options, reactor=None):
    if reactor is None:
        from twisted.internet import reactor
    config = options["config"]
    bus = make_bus(config, reactor)
    top = service.MultiService()
    BusService(bus).setServiceParent(top)
    CoreService(config, bus, reactor, config.core_port, options["interface"]).setServiceParent(top)
    return top
