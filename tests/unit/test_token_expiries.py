"""chatgateway.sessions.session.TokenExpiries: every session's token expiry on one timer."""

from twisted.internet import task

from chatgateway.sessions.session import CloseCode, TokenExpiries


class FakeSession:
    def __init__(self, name):
        self.name = name
        self._expires_at = None
        self.closed_with = None

    def close(self, code, reason):
        self.closed_with = (code, reason)


def setup(count, ttl=60.0):
    clock = task.Clock()
    clock.advance(1000)
    expiries = TokenExpiries(clock)
    sessions = [FakeSession(f"s{i}") for i in range(count)]
    for i, session in enumerate(sessions):
        expiries.schedule(session, clock.seconds() + ttl + i)
    return clock, expiries, sessions


def test_one_timer_for_every_session_each_closed_on_time():
    clock, expiries, sessions = setup(100)
    assert len(clock.getDelayedCalls()) == 1 and len(expiries) == 100
    clock.advance(60)
    assert sessions[0].closed_with == (CloseCode.UNAUTHENTICATED, "token expired")
    assert sessions[1].closed_with is None
    clock.advance(0.5)
    assert sessions[1].closed_with is None
    clock.advance(0.5)
    assert sessions[1].closed_with is not None and sessions[2].closed_with is None
    clock.advance(98)
    assert all(s.closed_with is not None for s in sessions)


def test_a_fresher_token_moves_the_expiry():
    clock, expiries, [session] = setup(1)
    expiries.schedule(session, clock.seconds() + 600)
    clock.advance(120)
    assert session.closed_with is None
    clock.advance(480)
    assert session.closed_with[0] == CloseCode.UNAUTHENTICATED


def test_an_earlier_expiry_rearms_the_timer():
    clock, expiries, [late] = setup(1, ttl=600)
    early = FakeSession("early")
    expiries.schedule(early, clock.seconds() + 5)
    clock.advance(5)
    assert early.closed_with is not None and late.closed_with is None


def test_forgotten_sessions_are_not_closed_and_leave_no_timer():
    clock, expiries, sessions = setup(3)
    for session in sessions:
        expiries.forget(session)
    assert clock.getDelayedCalls() == [] and len(expiries) == 0
    clock.advance(3600)
    assert all(s.closed_with is None for s in sessions)


def test_closed_sessions_are_not_kept_until_their_expiry():
    clock, expiries, sessions = setup(1000, ttl=86400)
    for session in sessions[1:]:
        expiries.forget(session)
    assert len(expiries._heap) < 2 * TokenExpiries.COMPACT_ABOVE + 2
    clock.advance(86400)
    assert sessions[0].closed_with is not None
