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
    ] + [
        [
            "workers",
            None,
            None,
            "Processes sharing the ports (SO_REUSEPORT); default: the number of cores when both CACHE_URI and EVENTS_URI are Redis, else 1.",
        ],
        ["worker-index", None, None, "Internal: this process is worker N of a --workers parent."],
    ]

    def postOptions(self):
        overrides = {s.name: self[s.name.lower().replace("_", "-")] for s in configuration.SETTINGS}
        environ = dict(os.environ)
        if self["dev"]:
            environ = dev_environment(environ, overrides)
        try:
            self.config = configuration.load(environ, overrides)
        except configuration.ConfigError as e:
            raise configuration.InvalidConfiguration(e.problems) from None
        self.workers = self._workers()
        if self["worker-index"] is not None:
            self.config = self.config.replace(gateway_id=f"{self.config.gateway_id}-w{self['worker-index']}")

    def _workers(self):
        if self["worker-index"] is not None:
            return 1  # a worker never spawns workers of its own
        if self["workers"] is None:
            return 1 if self.config.in_memory or self["dev"] else (os.cpu_count() or 1)
        try:
            workers = int(self["workers"])
        except ValueError:
            raise configuration.InvalidConfiguration(
                [f"--workers {self['workers']!r}: must be a whole number"]
            ) from None
        if workers < 1:
            raise configuration.InvalidConfiguration(["--workers must be at least 1"])
        if workers > 1 and self["dev"]:
            raise configuration.InvalidConfiguration(
                [f"--workers {workers} cannot run with --dev: the reference core runs in the process (use --workers 1)"]
            )
        if workers > 1 and self.config.in_memory:
            # Both: a store per worker breaks MAX_CONNECTIONS_PER_DEVICE, a bus per worker delivery.
            names = self.config.in_memory
            verb = "is" if len(names) == 1 else "are"
            raise configuration.InvalidConfiguration(
                [
                    f"--workers {workers} needs the store and the bus on Redis: {' and '.join(names)} {verb} memory://, "
                    "which cannot span processes (use --workers 1)"
                ]
            )
        if workers > 1 and self.config.http_port == 0:
            raise configuration.InvalidConfiguration(
                ["--workers needs a fixed HTTP_PORT: every worker must bind the same port"]
            )
        return workers

    def worker_args(self):
        """The plugin arguments a worker runs with: the same overrides, one gateway id each."""
        args = []
        for setting in configuration.SETTINGS:
            option = setting.name.lower().replace("_", "-")
            if self[option] is not None and setting.name != "GATEWAY_ID":
                args += [f"--{option}", self[option]]
        return args + ["--gateway-id", self.config.gateway_id]


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
    default("CONSOLE_ENABLED", "true")
    return environ


def dev_banner(config):
    host = config.http_interface or "localhost"
    base = f"http://{host}:{config.http_port}"
    return "\n".join(
        [
            "",
            "chatgateway development mode: reference core in-process, in-memory store and bus.",
            f"  console:    {base}/console/  (chat)   {base}/console/operator  (operator)"
            if config.console_enabled
            else "  console:    off (CONSOLE_ENABLED=false)",
            f"  WebSocket:  ws://{host}:{config.http_port}/ws",
            f"  token:      curl '{base}/dev/token?profile=alice&device=laptop'",
            f"  CLI:        chatgateway-client --url ws://{host}:{config.http_port}/ws --as alice rooms create general",
            f"              chatgateway-client --url ws://{host}:{config.http_port}/ws --as alice tail ROOM_ID",
            f"  gRPC:       {host}:{config.grpc_port} (chat.v1.ChatService, health, reflection)",
            f"  health:     {base}/healthz  {base}/readyz",
            "",
        ]
    )


def shared_resume_secret(config, env):
    """(config, env) of a parent of workers: without a key of resume tokens to share (neither
    RESUME_TOKEN_SECRET nor JWT_SECRET), one drawn here for it and its workers, so a token
    resumes on any worker of the gateway (docs/protocol.md#resume-tokens)."""
    if config.resume_token_secret or config.jwt_secret:
        return config, env
    secret = secrets.token_hex(32)
    return config.replace(resume_token_secret=secret), {**env, "RESUME_TOKEN_SECRET": secret}


def makeService(options, reactor=None):
    if reactor is None:
        from twisted.internet import reactor
    from chatgateway.service import make_gateway_service

    config = options.config
    if options["dev"]:
        sys.stdout.write(dev_banner(config) + "\n")
        sys.stdout.flush()
    # The parent of workers, or a worker: it knows the workers' state, which readiness reports.
    workers = None
    if options.workers > 1:
        from chatgateway.workers import WorkerPool, stop_and_exit

        config, env = shared_resume_secret(config, dict(os.environ))
        workers = WorkerPool(
            reactor,
            options.workers,
            options.worker_args(),
            env,
            config.drain_timeout_sec + 5,
            give_up=lambda message: stop_and_exit(reactor, 1),
        )
    elif options["worker-index"] is not None:
        from chatgateway.workers import ParentWatch

        workers = ParentWatch(reactor)
    root = make_gateway_service(
        config,
        reactor,
        dev=options["dev"],
        shared_ports=workers is not None,
        handle_signals=True,  # SIGTERM/SIGINT: drain, exit 0 (docs/operations.md#stopping-the-drain)
        workers_check=workers.readiness if workers is not None else None,
    )
    if workers is not None:
        workers.setServiceParent(root)  # after the listeners: they are bound when it starts
    return root
