"""Who a device is: JWT verification, development tokens, the gateway's own OAuth2 token.

ITokenVerifier is what the edges, the sessions and the reference core call. Its
implementations: chatgateway.auth.tokens.TokenVerifier and the tests' fakes.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from twisted.internet.defer import Deferred
from zope.interface import Interface

if TYPE_CHECKING:
    from chatgateway.auth.tokens import Claims


class ITokenVerifier(Interface):
    def verify(token: str) -> Deferred[Claims]:
        """A Deferred of the token's chatgateway.auth.tokens.Claims.

        Fails with chatgateway.auth.tokens.AuthError only; never blocks the reactor.
        """

    def verify_blocking(token: str) -> Claims:
        """The token's Claims, or raises AuthError. For threads other than the reactor's."""

    def close() -> Deferred[None]:
        """Release what the verifier holds (e.g. a key-fetching thread). Returns a Deferred."""
