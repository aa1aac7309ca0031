"""Forwarded calls that arrive outside a stream: gRPC unary RPCs and Connect HTTP.

The stream surfaces (WebSocket, gRPC ``Connect``) forward through their Session;
these surfaces have only a bearer token per call. ``forward`` verifies it as a
device's token is verified (a bad token never costs a call to the core), then
goes through ``Gateway.forward`` with a Caller standing in for the Session, so
membership re-scoping and PUBLISH_FORWARDED_EVENTS apply exactly as for a
stream's ``call`` command.
"""

import dataclasses

import grpc

from chatgateway.auth.tokens import AuthError
from chatgateway.core.client import METHODS, CoreError
from chatgateway.sessions.sharedlimits import LimitExceeded


@dataclasses.dataclass(frozen=True)
class Caller:
    """What Gateway.forward reads of a Session, for a call without one."""

    token: str
    profile_id: str
    device_id: str
    # Extra keyword arguments of CoreClient.call: traceparent, tracestate, timeout.
    call_options: dict


async def verified(gateway, token):
    """The claims of a call's bearer token; CoreError UNAUTHENTICATED without a valid one."""
    if not token:
        raise CoreError(grpc.StatusCode.UNAUTHENTICATED, "missing bearer token")
    try:
        return await gateway.verifier.verify(token)
    except AuthError as e:
        raise CoreError(grpc.StatusCode.UNAUTHENTICATED, f"invalid token: {e}") from None


async def forward(
    gateway, method, request, token, device_id="", traceparent=None, tracestate=None, timeout=None, arrived=None
):
    """The core's response to ``method`` called with ``token``; CoreError on failure.

    ``arrived`` is when the request arrived (gateway clock seconds; None: now) and
    ``timeout`` the caller's own deadline in seconds from then (None: none). The call's
    deadline is fixed at the arrival: the time the token's verification takes is spent
    from it, and the core is given what is left.
    """
    if arrived is None:
        arrived = gateway.clock.seconds()
    deadline = arrived + (
        gateway.config.core_timeout_sec if timeout is None else min(timeout, gateway.config.core_timeout_sec)
    )
    if method not in METHODS:
        raise CoreError(grpc.StatusCode.UNIMPLEMENTED, f"unknown method {method!r}")
    claims = await verified(gateway, token)
    options = {"timeout": deadline - gateway.clock.seconds()}
    if traceparent:
        options["traceparent"] = traceparent
        if tracestate:
            options["tracestate"] = tracestate
    try:
        await gateway.limits.admit_call(claims.profile_id, method, request)
    except LimitExceeded as e:
        raise CoreError(e.code, e.message, meta=e.meta) from None
    caller = Caller(
        token=token, profile_id=claims.profile_id, device_id=claims.device_id or device_id or "", call_options=options
    )
    return await gateway.forward(caller, method, request)
