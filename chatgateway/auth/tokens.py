"""JWT verification for the gateway and the reference core.

Two kinds of signing key, never mixed:

- HS256 with JWT_SECRET (development), only when the secret is set;
- RS256/RS384/RS512/PS256/ES256/ES384 with the issuer's JWKS (OAUTH2_JWKS_URI, or the
  ``jwks_uri`` of ``{OAUTH2_ISSUER}/.well-known/openid-configuration``; fetched and
  cached by chatgateway.auth.jwks).

The token's ``alg`` only picks which of the two is consulted; every decode names its
algorithms explicitly and uses a key of that family, so an HS256 token can never be
checked against an RSA public key and an RS256 token never against the secret.
``kid`` is a dictionary key into the cached JWKS and nothing else; ``jku``, ``x5u``,
``jwk`` and ``x5c`` headers are ignored. Time claims are checked against the injected
clock (PyJWT reads the wall clock itself), with JWT_LEEWAY_SEC of skew.

An HS256 token of the common shape is verified by chatgateway.auth.hs256, which
accepts only what PyJWT would; every other token goes through PyJWT. A token
verified before skips PyJWT's decoding and signature check
(chatgateway.auth.tokencache); its time claims are still checked on each use, and
its key must still be the one found for it.
"""

import base64
import binascii
import dataclasses
import json
import math
import re

import jwt
from jwt.algorithms import HMACAlgorithm
from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.logger import Logger
from zope.interface import implementer

from chatgateway.auth import ITokenVerifier, hs256
from chatgateway.auth.jwks import JWKS_ALGORITHMS, JwksKeys, SigningKey, fetch_url
from chatgateway.auth.tokencache import VerifiedTokens

HMAC_ALGORITHMS = frozenset({"HS256"})

ACCEPTED_TYPES = frozenset({"jwt", "at+jwt", "application/jwt", "application/at+jwt"})
MAX_TOKEN_BYTES = 16 * 1024

_PRINTABLE_ALG = re.compile(r"[A-Za-z0-9+\-]{1,16}\Z")


class AuthError(Exception):
    """A token was refused; ``str(e)`` is a short reason safe to show the client."""


@dataclasses.dataclass(frozen=True)
class Claims:
    profile_id: str
    device_id: str | None
    expires_at: float  # the token's exp
    # exp + JWT_LEEWAY_SEC: when the verifier starts refusing the token, and so when a
    # session it opened (or refreshed) is closed with 4401 - one rule for both.
    valid_until: float
    claims: dict


class _CheckedKeyHMAC(HMACAlgorithm):
    """HS256 that remembers the keys it has checked.

    PyJWT re-examines the HMAC secret on every decode (is it a PEM, DER or JWK in
    disguise? ~20 us, a fifth of a verification), though ours never changes.
    """

    MAX_KEYS = 4

    def __init__(self):
        super().__init__(HMACAlgorithm.SHA256)
        self._prepared = {}

    def prepare_key(self, key):
        prepared = self._prepared.get(key)
        if prepared is None:
            prepared = super().prepare_key(key)  # raises for a key PyJWT refuses: never remembered
            if len(self._prepared) < self.MAX_KEYS:
                self._prepared[key] = prepared
        return prepared


def _decoder(hs256):
    """A PyJWT of our own whose HS256 (``hs256``, a _CheckedKeyHMAC) remembers the checked secret."""
    decoder = jwt.PyJWT()
    # PyJWT takes no algorithms of its own; its PyJWS does (register_algorithm).
    decoder._jws.unregister_algorithm("HS256")
    decoder._jws.register_algorithm("HS256", hs256)
    return decoder


def _hmac_key(hs256, secret):
    """JWT_SECRET as the bytes HS256 signs with, if PyJWT accepts it as an HMAC key; else None."""
    if secret is None:
        return None
    try:
        return hs256.prepare_key(secret)
    except Exception:  # a PEM or JWK in disguise: PyJWT refuses it on every decode, and says why
        return None


def _unverified_header(token):
    """The JOSE header of a compact token, unverified: only to choose the key.

    PyJWT's get_unverified_header would decode and check the whole token, which
    jwt.decode then does again (strictly: whatever this lets through, it refuses).
    """
    if isinstance(token, bytes):
        token = token.decode("ascii")
    segment, dot, _ = token.partition(".")
    if not dot:
        raise ValueError("not a compact JWS")
    header = json.loads(base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4)))
    if not isinstance(header, dict):
        raise ValueError("the header is not a JSON object")
    if "kid" in header and not isinstance(header["kid"], str):
        raise ValueError("kid is not a string")
    return header


def _number(value):
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


@implementer(ITokenVerifier)
class TokenVerifier:
    """Verifies bearer tokens into Claims; see the module docstring for the rules."""

    log = Logger()

    def __init__(self, config, reactor=None, clock=None, fetch=None):
        if reactor is None:
            from twisted.internet import reactor
        self._clock = clock if clock is not None else reactor
        self._secret = config.jwt_secret or None
        self._issuer = config.oauth2_issuer or None
        self._audience = config.oauth2_jwt_verify_audience or None
        self._leeway = float(config.jwt_leeway_sec)
        if self._secret is not None and len(self._secret.encode()) < 32:
            self.log.warn("JWT_SECRET is shorter than 32 bytes; use a longer random secret")
        self._jwks = JwksKeys(
            reactor,
            self._clock,
            fetch if fetch is not None else fetch_url,
            jwks_uri=config.oauth2_jwks_uri or None,
            issuer=self._issuer,
            cooldown=float(config.jwks_refetch_cooldown_sec),
            timeout=float(config.core_timeout_sec),
        )
        hs256 = _CheckedKeyHMAC()
        self._decoder = _decoder(hs256)
        self._hmac_key = _hmac_key(hs256, self._secret)
        self._verified = VerifiedTokens()

    # -- public API ------------------------------------------------------------------

    def verify(self, token: str) -> Deferred[Claims]:
        """Deferred[Claims]; fails with AuthError only. Never blocks the reactor."""
        try:
            header, alg = self._inspect(token)
            if alg in HMAC_ALGORITHMS:
                return defer.succeed(self._decode(token, self._secret, alg))
            return self._verify_jwks(token, header, alg)
        except AuthError as e:
            return defer.fail(e)
        except Exception:
            self.log.failure("token verification failed unexpectedly")
            return defer.fail(AuthError("invalid token"))

    def verify_blocking(self, token):
        """Claims, or raises AuthError. For threads other than the reactor's: may fetch inline."""
        header, alg = self._inspect(token)
        if alg in HMAC_ALGORITHMS:
            return self._decode(token, self._secret, alg)
        kid = header.get("kid")
        keys = self._jwks.keys_for_blocking(kid, alg)
        return self._decode(token, _signing_key(keys, kid, alg), alg)

    def close(self):
        """Stop the JWKS fetch thread (after a fetch in flight ends). Returns a Deferred."""
        return self._jwks.close()

    # -- checks that need no key -------------------------------------------------------

    def _inspect(self, token):
        """The unverified header and alg of ``token``, if a key of ours could accept it."""
        if isinstance(token, str):
            token = token.strip()
        if not token:
            raise AuthError("missing token")
        if not isinstance(token, (str, bytes)):
            raise AuthError("malformed token")
        if len(token) > MAX_TOKEN_BYTES:
            raise AuthError("token too large")
        try:
            header = _unverified_header(token)
        except (ValueError, binascii.Error, RecursionError):  # UnicodeError and JSONDecodeError are ValueErrors
            raise AuthError("malformed token") from None
        alg = header.get("alg")
        if not isinstance(alg, str) or not alg:
            raise AuthError("missing algorithm")
        if alg.lower() == "none":
            raise AuthError("unsupported algorithm none")
        typ = header.get("typ")
        if typ is not None and (not isinstance(typ, str) or typ.lower() not in ACCEPTED_TYPES):
            raise AuthError("unsupported token type")
        if alg in HMAC_ALGORITHMS and self._secret is not None:
            return header, alg
        if alg in JWKS_ALGORITHMS and self._jwks.enabled:
            return header, alg
        if _PRINTABLE_ALG.match(alg):
            raise AuthError(f"unsupported algorithm {alg}")
        raise AuthError("unsupported algorithm")

    # -- signature and claims ------------------------------------------------------------

    def _decode(self, token, key, alg):
        if isinstance(key, SigningKey) and alg not in key.algorithms:
            raise AuthError("algorithm does not match the signing key")
        payload = self._verified.recall(token, key)
        if payload is None:
            payload = self._signature_and_claims(token, key.key if isinstance(key, SigningKey) else key, alg)
            self._verified.remember(token, key, payload)
        try:
            return self._claims(payload)
        except AuthError:
            self._verified.forget(token)  # expired or not yet valid: verified afresh if it comes again
            raise

    def _signature_and_claims(self, token, key, alg):
        """PyJWT's checks: signature, algorithm, audience, issuer, required claims. Returns the payload."""
        if alg == "HS256" and key is self._secret and self._hmac_key is not None:
            payload = hs256.verified_payload(token, self._hmac_key, self._audience, self._issuer)
            if payload is not None:
                return payload  # PyJWT would accept it as it is: no need to ask it
        try:
            payload = self._decoder.decode(
                token,
                key,
                algorithms=[alg],
                audience=self._audience,
                issuer=self._issuer,
                options={
                    "require": ["exp", "sub"],
                    # Time claims are checked in _claims, against our clock (on every use).
                    "verify_exp": False,
                    "verify_nbf": False,
                    "verify_iat": False,
                },
            )
        except jwt.MissingRequiredClaimError as e:
            raise AuthError(f"missing {e.claim} claim") from None
        except jwt.InvalidAudienceError:
            raise AuthError("wrong audience") from None
        except jwt.InvalidIssuerError:
            raise AuthError("wrong issuer") from None
        except jwt.InvalidSignatureError:
            raise AuthError("invalid signature") from None
        except jwt.InvalidAlgorithmError:
            raise AuthError("algorithm does not match the signing key") from None
        except jwt.exceptions.InvalidSubjectError:
            raise AuthError("invalid sub claim") from None
        except jwt.DecodeError:
            raise AuthError("malformed token") from None
        except Exception as e:  # a key PyJWT cannot use, an odd claim type...
            self.log.debug("token refused: {error_type}", error_type=type(e).__name__)
            raise AuthError("invalid token") from None
        return payload

    def _claims(self, payload):
        now = self._clock.seconds()
        exp = payload["exp"]
        if not _number(exp):
            raise AuthError("invalid exp claim")
        if exp <= now - self._leeway:
            raise AuthError("token expired")
        for name in ("nbf", "iat"):
            value = payload.get(name)
            if value is None:
                continue
            if not _number(value):
                raise AuthError(f"invalid {name} claim")
            if value > now + self._leeway:
                raise AuthError("token not yet valid")
        sub = payload["sub"]
        if not isinstance(sub, str) or not sub:
            raise AuthError("invalid sub claim")
        device_id = payload.get("device_id")
        if device_id is not None and (not isinstance(device_id, str) or not device_id):
            raise AuthError("invalid device_id claim")
        return Claims(
            profile_id=sub,
            device_id=device_id,
            expires_at=float(exp),
            valid_until=float(exp) + self._leeway,
            claims=payload,
        )

    # -- keys from the issuer's JWKS ---------------------------------------------------------

    def _verify_jwks(self, token, header, alg):
        kid = header.get("kid")
        keys = self._jwks.keys_for(kid, alg)
        if isinstance(keys, defer.Deferred):  # fetched first
            return keys.addCallback(lambda fetched: self._decode(token, _signing_key(fetched, kid, alg), alg))
        return defer.succeed(self._decode(token, _signing_key(keys, kid, alg), alg))


def _signing_key(keys, kid, alg):
    """The key of the JWKS ``keys`` (a KeySet, None before any good fetch) for the token; AuthError if none."""
    if keys is None:
        raise AuthError("signing keys unavailable")
    key = keys.find(kid, alg)
    if key is None:
        raise AuthError("unknown signing key")
    return key
