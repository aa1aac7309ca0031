"""The txredisapi protocols of our connections: reading promptly, with judged reply timeouts."""

import contextlib

import txredisapi

from chatgateway.redisconn.replywatch import JudgedReplyTimeouts


class PromptReader:
    """Mixin for txredisapi protocols: every complete reply of a read is handled in that read.

    txredisapi hands the bytes that follow each bulk string to a callLater(0) and
    pauses the transport until then: one bulk string per reactor turn, so a pub/sub
    message takes three turns and, while the reactor is busy (a fan-out), the socket
    is not read and Redis's output buffer for us grows (past
    client-output-buffer-limit pubsub, Redis drops the subscriber). Here those bytes
    are parsed at once, in a loop (not recursively: a read holds hundreds of bulks).

    Reads are fed in pieces of READ_PIECE bytes: txredisapi copies what is left of
    its buffer at every line and bulk, so a whole 64 KiB read would cost a copy of
    tens of KiB per reply.
    """

    READ_PIECE = 4096
    _rest = None

    def setLineMode(self, extra=b""):
        self.line_mode = 1
        if extra:
            self._rest = extra

    def dataReceived(self, data, unpause=False):
        piece = self.READ_PIECE
        for start in range(0, max(len(data), 1), piece):
            super().dataReceived(data[start : start + piece], unpause)
            while self._rest is not None:
                rest, self._rest = self._rest, None
                super().dataReceived(rest)


class LeanCommands:
    """Mixin for txredisapi protocols: commands encoded as txredisapi encodes them, in one pass.

    txredisapi makes each argument and its length go through its generic encoder and a
    bytearray: ~0.7 us per argument, ~12 us for a connect's ``open_connection`` script.
    Here str, bytes and int arguments (all the gateway sends) are formatted at once;
    anything else still goes through txredisapi's encoder, errors included.
    """

    def _build_command(self, *args, **kwargs):
        parts = [b"*%d\r\n" % len(args)]
        charset, errors, encode = self.charset, self.errors, self._encode_value
        for arg in args:
            kind = type(arg)
            if kind is bytes:
                data = arg
            elif kind is str and charset is not None:
                try:
                    data = arg.encode(charset, errors)
                except UnicodeEncodeError:
                    data = encode(arg)  # raises txredisapi's InvalidData, with its message
            elif kind is int:
                data = b"%d" % arg
            else:
                data = encode(arg)
            parts.append(b"$%d\r\n%s\r\n" % (len(data), data))
        return b"".join(parts)


class ReportsLoss:
    """Mixin for txredisapi protocols: the reason a connection was lost is handed to its
    RedisConnection (txredisapi drops it), so a TLS handshake refused is logged as such."""

    def connectionLost(self, reason):
        owner = getattr(self.factory, "owner", None)
        if owner is not None:
            owner.lost_because(self, reason)
        return super().connectionLost(reason)


class RedisProtocol(ReportsLoss, JudgedReplyTimeouts, PromptReader, LeanCommands, txredisapi.RedisProtocol):
    """txredisapi's protocol, reading promptly, with judged reply timeouts."""


class SubscriberProtocol(ReportsLoss, JudgedReplyTimeouts, PromptReader, LeanCommands, txredisapi.SubscriberProtocol):
    """Hands every pub/sub message to the connection's ``on_message``, the messages of one
    read inside one ``batch()`` (the connection's: the gateway's cork, sessions.corking)."""

    batch = contextlib.nullcontext

    def dataReceived(self, data, unpause=False):
        with self.batch():
            super().dataReceived(data, unpause)

    def messageReceived(self, pattern, channel, message):
        owner = self.factory.owner
        owner.last_message_at = owner.clock.seconds()
        owner.on_message(channel, message)


class ShardedSubscriberProtocol(SubscriberProtocol):
    """Sharded pub/sub (Redis 7: SSUBSCRIBE, ``smessage``), one connection per primary of a cluster.

    Redis confirms SSUBSCRIBE/SUNSUBSCRIBE per channel, as SUBSCRIBE; it also sends a
    ``sunsubscribe`` nobody asked for when the channel's slot leaves this node (the node
    became a replica, or the slot moved): that goes to ``on_dropped(channel)``.
    """

    on_dropped = staticmethod(lambda channel: None)

    def replyReceived(self, reply):
        if isinstance(reply, list) and len(reply) == 3:
            kind = reply[0]
            if kind in (b"smessage", "smessage"):
                self.messageReceived(None, reply[1], reply[2])
                return
            if kind in (b"sunsubscribe", "sunsubscribe") and not self.replyQueue.waiting:
                self.on_dropped(reply[1])
                return
        super().replyReceived(reply)
