"""Our Redis protocols encode commands byte for byte as txredisapi does (docs/performance.md#redis-commands)."""

import pytest
import txredisapi
from hypothesis import given
from hypothesis import strategies as st

from chatgateway.redisconn.protocols import RedisProtocol, SubscriberProtocol

arguments = st.one_of(
    st.text(),
    st.binary(),
    st.integers(),
    st.floats(allow_nan=False, allow_infinity=False),
    st.booleans(),
    st.binary().map(bytearray),
)


PAIRS = [(RedisProtocol, txredisapi.RedisProtocol), (SubscriberProtocol, txredisapi.SubscriberProtocol)]


@given(args=st.lists(arguments, max_size=12))
def test_commands_are_the_bytes_txredisapi_would_send(args):
    for ours, theirs in PAIRS:
        for charset in ("utf-8", None):
            assert ours(charset=charset)._build_command(*args) == theirs(charset=charset)._build_command(*args)


def test_a_string_that_cannot_be_encoded_is_refused_as_txredisapi_refuses_it():
    with pytest.raises(txredisapi.InvalidData, match="Error encoding unicode value"):
        RedisProtocol(charset="ascii")._build_command("SET", "k", "é")


def test_the_lean_encoder_is_the_one_used():
    assert RedisProtocol._build_command is not txredisapi.RedisProtocol._build_command
