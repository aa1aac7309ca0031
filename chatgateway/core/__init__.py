"""Calls to the core chat service: the gRPC client, its threads and its circuit breaker.

ICoreClient is what the gateway and the service tree call. Its implementations:
chatgateway.core.client.CoreClient (gRPC), chatgateway.telemetry.corecalls.InstrumentedCore
(a CoreClient whose calls are measured) and the tests' fakes.
"""

from typing import Any

from twisted.internet.defer import Deferred
from zope.interface import Interface


class ICoreClient(Interface):
    def start() -> None:
        """Open the channel to the core (its address may be known only now)."""

    def stop() -> Deferred[None]:
        """Wait for the calls in flight (each bounded by its deadline), then close. Returns a Deferred."""

    def call(
        method: str,
        request: Any,
        token: str,
        device_id: str = "",
        traceparent: str | None = None,
        tracestate: str | None = None,
        timeout: float | None = None,
    ) -> Deferred[Any]:
        """Call ChatService ``method`` with a device's ``token``.

        Returns a Deferred firing with the response (a list of responses for a streaming
        method), or failing with chatgateway.core.client.CoreError. ``traceparent`` and
        ``tracestate`` carry the caller's trace context; ``timeout`` (seconds) shortens
        the deadline, e.g. to the caller's own.
        """

    def readiness() -> Deferred[str]:
        """A Deferred of the core's state for /readyz: "up", "down", or the open circuit."""
