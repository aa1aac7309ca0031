"""Signing a device in until its Session opens, the same for every stream edge (docs/architecture.md#websocket-contract).

An edge makes one Opening per connection and drives it with a few calls: the
token its handshake carried (``verify_handshake`` for an edge that answers the
handshake only once the token is verified, or ``start(token)``), ``start`` once
the transport can carry close codes, every request decoded before the session
exists (``receive``, or ``undecodable`` for one that did not decode), and
``gone`` once the connection closes or is gone. The Opening closes the edge's
transport (ISessionTransport) when the sign-in fails and hands the edge the
Session once it is open (``opened``).

The rules:

- a token of the handshake is verified first; without one, the first request
  must carry ``auth_token``, and AUTH_TIMEOUT_SEC runs until a token is
  verified; a late, missing or refused token is closed with 4401;
- a core that refuses the token closes with 4401, a core that cannot list the
  device's rooms with 1013 (chatgateway.sessions.gateway.open_session), its reason
  ending in a jittered reconnect hint (chatgateway.sessions.reconnect);
- requests that arrive while the token is verified and the session opens wait,
  at most MAX_PENDING_REQUESTS (more is abuse: 1008), and go to the new session
  in order, their auth_token cleared (it was consumed);
- what to resume from (chatgateway.sessions.resume) is the signing-in request's
  ``resume_token`` and ``positions``, else the handshake's token (``resume_token``);
  later requests' are ignored;
- a device that closes or goes away before its session is open leaves no
  session behind: the core is not asked for its rooms once its token is
  verified, and when the core answers for a device that has left, nothing is
  registered (no other connection of the device is replaced).
"""

import grpc
from twisted.internet import defer

from chatgateway.auth.tokens import AuthError
from chatgateway.core.client import CoreError
from chatgateway.sessions.reconnect import hinted, try_again_delay
from chatgateway.sessions.resume import ResumeRequest
from chatgateway.sessions.session import CloseCode

# Requests a device may send while its session is being opened; more is abuse.
MAX_PENDING_REQUESTS = 16

# The states of an Opening.
WAITING = "waiting for a token"
OPENING = "opening"  # the token is verified, then the core asked for the device's rooms
DONE = "done"  # the session is open, or the device is closed or gone


def bearer_token(value):
    """The token of an ``Authorization: Bearer <token>`` value, or None."""
    if value and value[:7].lower() == "bearer ":
        return value[7:].strip() or None
    return None


def first_param(params, name):
    """The first value of a query parameter (Autobahn's {name: [values]}), or None."""
    values = params.get(name) or [None]
    return values[0]


def replay(session, pending):
    """Hand a new session the requests that arrived while it opened (their auth token was consumed)."""
    for request in pending:
        request.ClearField("auth_token")
        session.handle(request)


def close_after_failed_open(transport, failure, log):
    """Close a device whose session could not be opened, saying why."""
    if failure.check(AuthError):
        transport.close(CloseCode.UNAUTHENTICATED, f"invalid token: {failure.value}")
    elif failure.check(CoreError) and failure.value.code == grpc.StatusCode.UNAUTHENTICATED:
        transport.close(CloseCode.UNAUTHENTICATED, f"core refused the token: {failure.value.message}")
    elif failure.check(CoreError):
        transport.close(
            CloseCode.TRY_AGAIN_LATER, hinted(f"core unavailable: {failure.value.message}", try_again_delay())
        )
    else:
        log.failure("opening a session failed", failure)
        transport.close(CloseCode.TRY_AGAIN_LATER, hinted("internal error", try_again_delay()))


class Reasons:
    """An edge's close reasons for a device that did not sign in: what the edge calls a
    request ("frame", "message"), and where else a token may come from, if the edge says so."""

    __slots__ = ("first", "no_token", "timeout", "too_many")

    def __init__(self, unit, elsewhere=None):
        self.first = f"the first {unit} must carry auth_token"
        self.no_token = self.first + (f" (or send {elsewhere})" if elsewhere else "")
        self.timeout = (
            "authentication timeout: send "
            + (f"{elsewhere} or " if elsewhere else "")
            + f"auth_token in the first {unit}"
        )
        self.too_many = f"too many {unit}s before connected"


class Opening:
    """The sign-in of one connection, from its handshake until its Session is open."""

    # One per connection while it signs in: slots keep it small.
    __slots__ = (
        "_gateway",
        "_transport",
        "_opened",
        "_reasons",
        "_log",
        "_fallback_device",
        "_resume",
        "_claims",
        "_token",
        "_refusal",
        "_pending",
        "_timer",
        "_state",
    )

    def __init__(self, gateway, transport, opened, reasons, log, fallback_device="", resume_token=""):
        self._gateway = gateway
        self._transport = transport  # the edge's ISessionTransport
        self._opened = opened  # opened(session): the edge takes the open session over
        self._reasons = reasons
        self._log = log
        self._fallback_device = fallback_device  # the device id of the handshake, if any
        self._resume = ResumeRequest(resume_token)  # the handshake's, until a request signs in
        self._claims = None
        self._token = None
        self._refusal = None  # why the handshake's token was refused, said once started
        self._pending = None  # requests that arrived while the session opened
        self._timer = None  # AUTH_TIMEOUT_SEC, while no token is verified
        self._state = WAITING

    # ------------------------------------------------------------ what the edge calls

    def verify_handshake(self, token):
        """Verify the handshake's token before the edge answers the handshake. A Deferred
        firing with None when it is accepted, or with the verifier's reason when it is
        refused (``start`` then closes with 4401, should the edge upgrade anyway)."""

        def refused(failure):
            failure.trap(AuthError)
            self._refusal = str(failure.value)
            return self._refusal

        return self._verify(token).addCallbacks(lambda _: None, refused)

    def start(self, token=None):
        """The transport is open: sign in with the handshake's token (verified already, or
        ``token`` now), or wait AUTH_TIMEOUT_SEC for a token in the first request."""
        if self._state is not WAITING:
            return
        if self._refusal is not None:
            self._close(CloseCode.UNAUTHENTICATED, f"invalid token: {self._refusal}")
        elif self._claims is not None:
            self._state, self._pending = OPENING, []
            self._open(self._fallback_device)
        elif token:
            self._state, self._pending = OPENING, []
            self._arm_timer()
            self._sign_in(token, self._fallback_device)
        else:
            self._arm_timer()

    def receive(self, request):
        """A StreamRequest that arrived before the session opened."""
        if self._state is OPENING:
            if len(self._pending) >= MAX_PENDING_REQUESTS:
                self._close(CloseCode.POLICY, self._reasons.too_many)
            else:
                self._pending.append(request)
        elif self._state is WAITING:
            if not request.auth_token:
                self._close(CloseCode.UNAUTHENTICATED, self._reasons.no_token)
                return
            self._state, self._pending = OPENING, [request]
            self._resume = ResumeRequest.of(request, self._resume.token)
            self._sign_in(request.auth_token, request.device_id or self._fallback_device)

    def undecodable(self, error):
        """A request that did not decode (codec.FrameError) before the session opened:
        the first must carry the token; one while the session opens is dropped."""
        if self._state is WAITING:
            self._close(CloseCode.UNAUTHENTICATED, f"{self._reasons.first} ({error})")

    def gone(self):
        """The connection is closing or gone: no session is opened for it."""
        self._finish()

    # ------------------------------------------------------------ signing in

    def _finish(self):
        """Nothing more to sign in: forget the token and what waited, stop the timer."""
        self._state = DONE
        self._pending = self._claims = self._token = self._resume = None
        self._cancel_timer()

    def _arm_timer(self):
        self._timer = self._gateway.clock.callLater(
            self._gateway.config.auth_timeout_sec, self._close, CloseCode.UNAUTHENTICATED, self._reasons.timeout
        )

    def _cancel_timer(self):
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None

    def _close(self, code, reason):
        self._finish()
        self._transport.close(code, reason)

    def _verify(self, token):
        def verified(claims):
            self._claims, self._token = claims, token
            return claims

        return self._gateway.verifier.verify(token).addCallback(verified)

    def _sign_in(self, token, device_id):
        d = self._verify(token)
        d.addCallback(self._verified, device_id)
        d.addErrback(self._failed)

    def _verified(self, claims, device_id):
        if self._state is OPENING:  # not closed nor gone while the token was verified
            self._open(device_id)

    def _open(self, device_id):
        self._cancel_timer()  # a token is verified in time
        claims, token = self._claims, self._token
        device_id = claims.device_id or device_id or "default"
        d = defer.Deferred.fromCoroutine(
            self._gateway.open_session(
                self._transport, claims, token, device_id, abandoned=self._abandoned, resume=self._resume
            )
        )
        d.addCallbacks(self._session_opened, self._failed)

    def _abandoned(self):
        return self._state is DONE

    def _session_opened(self, session):
        if session is None:
            return  # the device went away while the core was asked: nothing was registered
        if self._state is DONE:
            session.closed_by_transport()  # gone while the session was being registered
            return
        pending = self._pending or ()
        self._finish()
        self._opened(session)
        replay(session, pending)

    def _failed(self, failure):
        self._finish()
        close_after_failed_open(self._transport, failure, self._log)
