"""What the operator page shows: this gateway's state, its rates, and every gateway's entry.

A ``StatusSampler`` reads the gateway's counts (chatgateway.telemetry.counts) every
SAMPLE_INTERVAL_SEC on the reactor's clock and keeps the rates of the last interval, so a
status request costs a few dictionary reads, whoever polls it and however often. The
other gateways come from the store's registry (``IConnectionStore.instances``: with Redis,
every live gateway; in memory, this one), read once per request; their connection counts
are as of their last heartbeat (HEARTBEAT_INTERVAL_SEC), this gateway's are live.
"""

from twisted.application import service
from twisted.internet import defer, task
from twisted.logger import Logger

from chatgateway.telemetry import readiness

SAMPLE_INTERVAL_SEC = 2.0


def totals(counts):
    """The cumulative counts the rates are made of, from a GatewayCounts."""
    sent = counts.sent_counts()
    return {
        "commands_received": sum(counts.received_counts().values()),
        "deliveries": sum(sent.values()),
        "messages_delivered": sent.get("message", 0),
        "closes": sum(counts.close_counts().values()),
        "rate_limited": counts.rate_limited_count(),
        "connects_refused": sum(counts.connects_refused_counts().values()),
        "deliveries_dropped": sum(counts.dropped_counts().values()),
        "dependency_errors": sum(counts.dependency_error_counts().values()),
    }


def rates(before, after, seconds):
    """{name: per second} between two ``totals`` readings ``seconds`` apart."""
    if seconds <= 0:
        return {name: 0.0 for name in after}
    return {name: round((after[name] - before.get(name, 0)) / seconds, 2) for name in after}


class StatusSampler(service.Service):
    """Samples ``gateway.counts`` every ``interval`` seconds; ``status()`` is the status page's JSON.

    ``checks``: the readiness checks of /readyz ({name: callable}); ``store``: the
    IConnectionStore whose registry lists the gateways.
    """

    log = Logger()

    def __init__(self, gateway, checks, store, clock, interval=SAMPLE_INTERVAL_SEC):
        self.setName("console-status")
        self._gateway = gateway
        self._checks = checks
        self._store = store
        self._clock = clock
        self._interval = interval
        self._started = None
        self._last = None  # (time, totals) of the last sample
        self._rates = rates({}, totals(gateway.counts), 0)
        self._loop = task.LoopingCall(self.sample)
        self._loop.clock = clock

    def startService(self):
        super().startService()
        self._started = self._clock.seconds()
        self._loop.start(self._interval, now=True)

    def stopService(self):
        super().stopService()
        if self._loop.running:
            self._loop.stop()

    def sample(self):
        now, current = self._clock.seconds(), totals(self._gateway.counts)
        if self._last is not None:
            self._rates = rates(self._last[1], current, now - self._last[0])
        self._last = (now, current)

    async def status(self):
        gateway, config = self._gateway, self._gateway.config
        states = await readiness.dependency_states(self._checks)
        try:
            gateways = await self._store.instances()
            registry_error = None
        except Exception as e:  # the store is down: say so, show this gateway alone
            gateways, registry_error = [], str(e) or type(e).__name__
        now = self._clock.seconds()
        # The registry holds each gateway's entry as of its last heartbeat; this one's is live.
        for entry in gateways:
            if entry.get("gateway_id") == config.gateway_id:
                entry.update(
                    connections=len(gateway.registry),
                    rooms=len(gateway.registry.room_ids()),
                    addresses=list(gateway.addresses),
                )
        return {
            "gateway": {
                "id": config.gateway_id,
                "uptime_sec": round(now - self._started, 1) if self._started is not None else 0,
                "addresses": list(gateway.addresses),
                "connections": len(gateway.registry),
                "connections_by_transport": gateway.counts.active_counts(),
                "rooms": len(gateway.registry.room_ids()),
                "draining": bool(gateway.draining),
                "ready": readiness.is_ready(states),
                "dependencies": states,
            },
            "rates": {"interval_sec": self._interval, "per_sec": self._rates},
            "totals": self._last[1] if self._last is not None else totals(gateway.counts),
            "store": "memory" if config.cache_uri == "memory://" else "redis",
            "gateways": gateways,
            "registry_error": registry_error,
            "time": now,
        }

    def status_deferred(self):
        return defer.Deferred.fromCoroutine(self.status())
