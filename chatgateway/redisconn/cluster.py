"""A Redis Cluster behind RedisConnection's interface: one RedisConnection per node.

- The slot map comes from CLUSTER SLOTS, asked of any node that is ready (the seeds
  of the URI first); a connection is kept to every primary it names (and to the
  seeds, which may be replicas, to ask again).
- A command goes to the primary of its key's slot (chatgateway.redisconn.slots):
  ``execute`` routes by its first argument after the command name, ``eval`` by its
  first key (every key of a script must share a slot: checked here, before Redis
  would refuse it with CROSSSLOT), ``pipeline`` splits a batch by node and gives the
  replies back in the order of the batch.
- ``MOVED slot host:port``: the slot is mapped there at once, the whole map is read
  again, and the command is sent there. ``ASK slot host:port`` (a slot being
  migrated): ASKING and the command go to that node, the map is left alone.
- A primary's connection lost (killed, failed over): commands of its slots fail at
  once with ConnectionError, as on one Redis. The map is read again every
  CLUSTER_CHECK_INTERVAL_SEC while any slot's primary is not ready, so a replica
  promoted by the cluster is found within about a node timeout plus that interval.
- ``ready``: every slot has a primary and all their connections are ready. Each time
  it becomes ready after not being so, ``on_ready`` callbacks get ``resync=True``
  when a node's connection was lost or a call refused meanwhile (as RedisConnection).

A subscriber connection in pub/sub mode cannot ask CLUSTER SLOTS: such a
ClusterConnection follows another's map (``slots_from``, the bus's publisher),
connecting to the primaries it names and to no seed.

``prepare(protocol, node)`` runs on each new connection of a primary before it counts
as ready (the bus subscribes there the sharded channels of that node's slots);
``node`` is its "host:port".
"""

import re

from twisted.internet import defer, task
from twisted.logger import Logger

from chatgateway.redisconn.connection import REDIS_TIMEOUT_SEC, ConnectionError, RedisConnection, all_replies
from chatgateway.redisconn.protocols import RedisProtocol
from chatgateway.redisconn.slots import SLOTS, key_slot

# While a slot has no ready primary, the slot map is read again this often.
CLUSTER_CHECK_INTERVAL_SEC = 0.5
# A command redirected (MOVED or ASK) more often than this fails.
MAX_REDIRECTS = 5

_REDIRECT = re.compile(r"^(MOVED|ASK) (\d+) (\S+):(\d+)$")


class CrossSlotError(ValueError):
    """The keys of one script (or command) are in different slots of the cluster."""


def _redirect(failure):
    """("MOVED" or "ASK", slot, host, port) of a redirection error, else None."""
    message = failure.getErrorMessage() if hasattr(failure, "getErrorMessage") else str(failure)
    match = _REDIRECT.match(message.strip())
    if match is None:
        return None
    kind, slot, host, port = match.groups()
    return kind, int(slot), host, int(port)


class ClusterConnection:
    log = Logger()

    def __init__(
        self,
        address,
        reactor,
        name,
        charset="utf-8",
        protocol=RedisProtocol,
        timeout=REDIS_TIMEOUT_SEC,
        clock=None,
        prepare=None,
        on_message=None,
        counts=None,
        check_interval=CLUSTER_CHECK_INTERVAL_SEC,
        slots_from=None,
    ):
        self.address = address
        self.reactor = reactor
        self.clock = clock if clock is not None else reactor
        self.name = name
        self.prepare = prepare
        self._options = dict(
            charset=charset,
            protocol=protocol,
            timeout=timeout,
            clock=clock,
            on_message=on_message,
            counts=counts,
        )
        self._source = slots_from
        self._followers = []
        if slots_from is not None:
            slots_from._followers.append(self)
        self._seeds = {f"{a.host}:{a.port}" for a in address.seeds} if slots_from is None else set()
        self.nodes = {}  # "host:port" -> RedisConnection
        self._slots = [None] * SLOTS  # slot -> "host:port" of its primary
        self._ready = False
        self._ready_callbacks = []
        self._needs_resync = False
        self._refreshing = None
        self._started = False
        self.stopping = False
        self._batch = None
        self._check = task.LoopingCall(self._watch)
        self._check.clock = self.clock
        self._check_interval = check_interval

    # ------------------------------------------------------------ state

    @property
    def ready(self):
        return self._ready

    @property
    def needs_resync(self):
        return self._needs_resync or any(node.needs_resync for node in self.nodes.values())

    @needs_resync.setter
    def needs_resync(self, value):
        self._needs_resync = value
        if not value:
            for node in self.nodes.values():
                node.needs_resync = False

    @property
    def batch(self):
        return self._batch

    @batch.setter
    def batch(self, batch):
        self._batch = batch
        for node in self.nodes.values():
            node.batch = batch

    @property
    def last_message_at(self):
        return max((node.last_message_at for node in self.nodes.values()), default=float("-inf"))

    def on_ready(self, callback):
        self._ready_callbacks.append(callback)

    def primaries(self):
        """The "host:port" of every primary in the slot map."""
        return sorted({node for node in self._slots if node is not None})

    def node_of(self, slot):
        """The "host:port" of the primary of ``slot`` (None while unknown)."""
        return self._slots[slot]

    def connection_of(self, slot):
        """The RedisConnection to the primary of ``slot``, or None."""
        node = self._slots[slot]
        return self.nodes.get(node) if node is not None else None

    def start(self):
        if self._started:
            return
        self._started = True
        self.log.info("redis {name}: joining the cluster at {address}", name=self.name, address=self.address)
        for seed in self._seeds:
            self._connect(seed)
        if self._source is not None:
            self._adopt(list(self._source._slots))
        self._check.start(self._check_interval, now=False)

    def stop(self):
        if self.stopping:
            return defer.succeed(None)
        self.stopping = True
        self._ready = False
        if self._check.running:
            self._check.stop()
        return defer.gatherResults([node.stop() for node in self.nodes.values()], consumeErrors=True)

    # ------------------------------------------------------------ commands

    def execute(self, *args):
        """One command, routed by its key (its second argument); keyless ones go to any primary."""
        slot = key_slot(args[1]) if len(args) > 1 else None
        return self._send(slot, lambda node: node.execute(*args), args)

    def eval(self, script, keys=(), args=()):
        keys, args = list(keys), list(args)
        slot = self.slot_of(keys)
        return self._send(slot, lambda node: node.eval(script, keys, args), ("EVAL", script, len(keys), *keys, *args))

    def pipeline(self, commands):
        """The commands split by node, each part in one write; the replies in the order of ``commands``."""
        parts = {}
        for index, command in enumerate(commands):
            slot = key_slot(command[1]) if len(command) > 1 else 0
            parts.setdefault(self._slots[slot], []).append((index, command))
        replies = [None] * len(commands)
        sent = []
        for node, part in parts.items():
            conn = self.nodes.get(node) if node is not None else None
            if conn is None or not conn.ready:
                # Each command on its own: redirections and a down node are handled as for execute.
                sent += [self._placed(replies, i, self.execute(*command)) for i, command in part]
            else:
                d = conn.pipeline([command for _, command in part])
                d.addErrback(self._pipeline_redirected, part)
                sent.append(d.addCallback(self._place_all, replies, [i for i, _ in part]))
        return all_replies(sent).addCallback(lambda _: replies)

    @staticmethod
    def slot_of(keys):
        """The one slot of ``keys`` (None without keys); CrossSlotError if they span several."""
        slots = {key_slot(key) for key in keys}
        if len(slots) > 1:
            raise CrossSlotError(f"keys in {len(slots)} slots of the cluster: {sorted(keys)[:4]}")
        return slots.pop() if slots else None

    def _placed(self, replies, index, d):
        def place(reply):
            replies[index] = reply

        return d.addCallback(place)

    @staticmethod
    def _place_all(results, replies, indexes):
        for index, reply in zip(indexes, results, strict=True):
            replies[index] = reply

    def _pipeline_redirected(self, failure, part):
        if _redirect(failure) is None:
            return failure
        # A slot moved under a pipeline: send its commands again one by one (each follows its redirection).
        return all_replies([self.execute(*command) for _, command in part])

    def _send(self, slot, call, raw, redirects=0):
        try:
            node = self._node_for(slot)
        except Exception:
            return defer.fail()
        d = call(node)
        return d.addErrback(self._redirected, slot, call, raw, redirects)

    def _node_for(self, slot):
        name = self._slots[slot] if slot is not None else next(iter(self.primaries()), None)
        conn = self.nodes.get(name) if name is not None else None
        if conn is None:
            self._needs_resync = True
            raise ConnectionError(f"redis {self.name}: no node serves slot {slot} yet")
        return conn

    def _redirected(self, failure, slot, call, raw, redirects):
        redirect = _redirect(failure.value)
        if redirect is None:
            if failure.check(ConnectionError):
                self._refresh()
            return failure
        kind, moved_slot, host, port = redirect
        if redirects >= MAX_REDIRECTS:
            return failure
        target = f"{host}:{port}"
        conn = self._connect(target)
        if kind == "ASK":
            d = self._when_ready(conn).addCallback(lambda _: _asking(conn, raw))
            return d.addErrback(self._redirected, slot, call, raw, redirects + 1)
        self._slots[moved_slot] = target
        self._refresh()
        d = self._when_ready(conn).addCallback(lambda _: call(conn))
        return d.addErrback(self._redirected, slot, call, raw, redirects + 1)

    def _when_ready(self, conn, waited=0.0):
        """Fires once ``conn`` is ready, or fails with ConnectionError after the reply timeout."""
        if conn.ready:
            return defer.succeed(None)
        if waited >= conn.timeout:
            return defer.fail(ConnectionError(f"redis {self.name}: {conn.address} is not connected"))
        step = 0.05
        return task.deferLater(self.clock, step, lambda: None).addCallback(
            lambda _: self._when_ready(conn, waited + step)
        )

    # ------------------------------------------------------------ topology

    def _connect(self, node):
        conn = self.nodes.get(node)
        if conn is not None:
            return conn
        host, _, port = node.rpartition(":")
        conn = RedisConnection(
            self.address.template.at(host, int(port)),
            self.reactor,
            f"{self.name}@{node}",
            prepare=(lambda protocol: self.prepare(protocol, node)) if self.prepare is not None else None,
            **self._options,
        )
        if self._batch is not None:
            conn.batch = self._batch
        conn.on_ready(lambda resync: self._node_ready(node, resync))
        self.nodes[node] = conn
        if not self.stopping:
            conn.start()
        return conn

    def _node_ready(self, node, resync):
        if resync:
            self._needs_resync = True
        if node in self._seeds or not any(self._slots):
            self._refresh()
        self._update_ready()

    def _watch(self):
        """While some slot lacks a ready primary: read the map again (a failover promotes a replica)."""
        self._update_ready()
        if not self._ready:
            self._refresh()

    def _refresh(self):
        """Read CLUSTER SLOTS from a ready node (one read at a time)."""
        if self._source is not None:
            self._source._refresh()
            return
        if self._refreshing is not None or self.stopping:
            return
        asked = [c for c in self.nodes.values() if c.ready]
        if not asked:
            return
        self._refreshing = d = self._ask_slots(asked)
        d.addCallback(self._apply_slots)
        d.addErrback(
            lambda f: self.log.warn(
                "redis {name}: reading the slot map failed: {e}", name=self.name, e=f.getErrorMessage()
            )
        )
        d.addBoth(self._refreshed)

    def _ask_slots(self, asked):
        # Ask the seeds and the nodes in turn until one answers.
        conn, rest = asked[0], asked[1:]
        d = conn.execute("CLUSTER", "SLOTS").addCallback(lambda reply: (conn.address.host, reply))
        if rest:
            d.addErrback(lambda _: self._ask_slots(rest))
        return d

    def _refreshed(self, _):
        self._refreshing = None
        self._update_ready()

    def _apply_slots(self, answer):
        asked, reply = answer
        slots = [None] * SLOTS
        for entry in reply:
            start, end, primary = int(entry[0]), int(entry[1]), entry[2]
            host = primary[0].decode() if isinstance(primary[0], bytes) else str(primary[0] or "")
            # An unknown endpoint ("" or "?"): the node is reached where it was asked (CLUSTER SLOTS).
            host = asked if host in ("", "?") else host
            node = f"{host}:{int(primary[1])}"
            for slot in range(start, end + 1):
                slots[slot] = node
        self._adopt(slots)
        for follower in self._followers:
            follower._adopt(list(slots))

    def _adopt(self, slots):
        if self.stopping or not self._started:
            return
        if slots != self._slots:
            old = set(self.primaries())
            self._slots = slots
            new = set(self.primaries())
            if old and new != old:
                self.log.info(
                    "redis {name}: primaries now {new} (were {old})", name=self.name, new=sorted(new), old=sorted(old)
                )
                self._needs_resync = True
            for node in new:
                self._connect(node)
            self._update_ready()
            for node in old - new - self._seeds:
                conn = self.nodes.pop(node, None)
                if conn is not None:
                    conn.stop()

    def _update_ready(self):
        was = self._ready
        self._ready = (
            not self.stopping
            and all(self._slots)
            and all(node in self.nodes and self.nodes[node].ready for node in self.primaries())
        )
        if self._ready and not was:
            resync = self.needs_resync
            self.needs_resync = False
            self.log.info(
                "redis {name}: cluster ready ({count} primaries)", name=self.name, count=len(self.primaries())
            )
            for callback in list(self._ready_callbacks):
                try:
                    callback(resync)
                except Exception:
                    self.log.failure("redis {name}: ready callback failed", name=self.name)
        elif was and not self._ready:
            self._needs_resync = True


def _asking(conn, raw):
    """ASKING and the command in one write on ``conn``; the command's reply."""
    return conn.pipeline([("ASKING",), tuple(raw)]).addCallback(lambda replies: replies[1])
