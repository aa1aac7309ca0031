"""A real Redis Cluster for integration tests: primaries and replicas of ``redis-server
--cluster-enabled yes`` on free ports, joined by ``redis-cli --cluster create``."""

import shutil
import subprocess
import time

import redis

from support.processes import free_port
from support.redis import RedisServer

# A primary that does not answer its peers for this long is failed over to its replica.
NODE_TIMEOUT_MS = 1000


class RedisCluster:
    """``primaries`` primaries, each with ``replicas`` replicas, on 127.0.0.1."""

    def __init__(self, primaries=3, replicas=1):
        self.nodes = []
        for _ in range(primaries * (1 + replicas)):
            extra = [
                "--cluster-enabled",
                "yes",
                "--cluster-config-file",
                "nodes.conf",
                "--cluster-node-timeout",
                str(NODE_TIMEOUT_MS),
                "--cluster-port",
                str(free_port()),
            ]
            self.nodes.append(RedisServer(extra=extra))
        cli = shutil.which("redis-cli")
        if cli is None:
            raise RuntimeError("redis-cli is not on PATH: the Redis Cluster tests need it")
        addresses = [f"127.0.0.1:{node.port}" for node in self.nodes]
        if primaries == 1 and replicas == 0:
            # redis-cli --cluster create wants 3 primaries: one node takes every slot itself.
            with self.nodes[0].client() as c:
                c.execute_command("CLUSTER", "ADDSLOTSRANGE", 0, 16383)
        else:
            subprocess.run(
                [cli, "--cluster", "create", *addresses, "--cluster-replicas", str(replicas), "--cluster-yes"],
                check=True,
                capture_output=True,
                timeout=60,
            )
        self.wait_healthy()

    @property
    def uri(self):
        return "redis+cluster://" + ",".join(f"127.0.0.1:{node.port}" for node in self.nodes[:2])

    def client(self):
        """A blocking redis-py cluster client (for assertions)."""
        return redis.RedisCluster(host="127.0.0.1", port=self.running()[0].port, decode_responses=True)

    def running(self):
        return [node for node in self.nodes if node.running]

    def info(self, node):
        with node.client(socket_timeout=2) as c:
            return c.execute_command("CLUSTER", "INFO")

    def primaries(self):
        """The running primaries, by their node."""
        found = []
        for node in self.running():
            with node.client(socket_timeout=2) as c:
                if c.execute_command("ROLE")[0] == "master":
                    found.append(node)
        return found

    def node_of_slot(self, slot):
        """The running node serving ``slot`` as primary."""
        with self.running()[0].client(socket_timeout=2) as c:
            for start, end, primary, *_ in c.execute_command("CLUSTER", "SLOTS"):
                if start <= slot <= end:
                    port = int(primary[1])
                    return next(node for node in self.nodes if node.port == port)
        raise LookupError(slot)

    def wait_healthy(self, timeout=30):
        """Every running node says cluster_state:ok and agrees on who serves every slot."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                states = [self.info(node) for node in self.running()]
                if all(_state(s) == "ok" for s in states) and self._agree() and self._replicas_synced():
                    return
            except redis.RedisError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"the cluster is not healthy after {timeout} s")
            time.sleep(0.1)

    def _replicas_synced(self):
        """Every running replica's link to its primary is up (a replica never synced does not take over)."""
        for node in self.running():
            with node.client(socket_timeout=2) as c:
                info = c.info("replication")
            if info.get("role") == "slave" and info.get("master_link_status") != "up":
                return False
        return True

    def _agree(self):
        maps = []
        for node in self.running():
            with node.client(socket_timeout=2) as c:
                slots = c.execute_command("CLUSTER", "SLOTS")
            maps.append(sorted((s[0], s[1], int(s[2][1])) for s in slots))
        running = {node.port for node in self.running()}
        return all(m == maps[0] for m in maps) and all(port in running for _, _, port in maps[0])

    def kill_primary_of(self, slot):
        """SIGKILL the primary of ``slot`` (its replica takes over within a few node timeouts)."""
        node = self.node_of_slot(slot)
        node.stop(kill=True)
        return node

    def cleanup(self):
        for node in self.nodes:
            node.cleanup()


def _state(info):
    if isinstance(info, dict):
        return info.get("cluster_state")
    for line in str(info).splitlines():
        if line.startswith("cluster_state:"):
            return line.split(":", 1)[1].strip()
    return None
