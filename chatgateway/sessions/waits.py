"""Waiting for a Deferred, but not for longer than a bound."""

from twisted.internet import defer


def at_most(clock, d, seconds):
    """A Deferred firing (with None) when ``d`` fires or after ``seconds``, whichever comes
    first. ``d`` is neither cancelled nor consumed: its result passes on to its other callbacks."""
    done = defer.Deferred()
    timer = clock.callLater(max(0.0, seconds), lambda: done.called or done.callback(None))

    def fired(result):
        if timer.active():
            timer.cancel()
        if not done.called:
            done.callback(None)
        return result

    d.addBoth(fired)
    return done
