"""Readiness of the gateway's dependencies, shared by /readyz and grpc.health.v1.

A check is a callable returning a bool, a state string ("up", "down",
"circuit open"...) or a Deferred of either. The gateway is ready when every
dependency is "up".
"""

from twisted.internet import defer
from twisted.logger import Logger

log = Logger()


async def dependency_states(checks):
    """{name: state} for ``checks`` ({name: callable}); a check that raises is "down"."""
    states = {}
    for name, check in checks.items():
        try:
            state = await defer.maybeDeferred(check)
        except Exception as e:
            log.debug("readiness of {name}: {error}", name=name, error=e)
            state = False
        states[name] = state if isinstance(state, str) else ("up" if state else "down")
    return states


def is_ready(states):
    return all(state == "up" for state in states.values())
