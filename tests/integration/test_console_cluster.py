"""The operator status on a Redis Cluster (3 primaries, 3 replicas, started here): every
gateway is listed although their registry keys live in different slots (the entries are
read by a pipeline the cluster client splits by node, not by one MGET)."""

import json
import urllib.request

from chatgateway.auth.devtokens import mint_token
from chatgateway.console.admin import ADMIN_SCOPE
from support.processes import Twistd, free_port, until
from support.rediscluster import RedisCluster

SECRET = "console-cluster-test-secret-0123456789ab"


def status(port):
    admin = mint_token(SECRET, "operator", audience="service_chat_gateway", extra={"scope": ADMIN_SCOPE})
    request = urllib.request.Request(f"http://127.0.0.1:{port}/console/status.json")
    request.add_header("Authorization", f"Bearer {admin}")
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.loads(response.read())


def test_every_gateway_on_a_cluster_is_listed():
    redis = RedisCluster()
    core_port = free_port()
    env = {"JWT_SECRET": SECRET, "CACHE_URI": redis.uri, "OAUTH2_ISSUER": "", "LOG_LEVEL": "info"}
    core = Twistd("chatcore", ["--port", core_port], env=env, port=core_port)
    # Ids that fall in different slots, so one MGET of their entries would be refused (CROSSSLOT).
    ids = ["gw-console-a", "gw-console-b"]
    gateways = []
    for gateway_id in ids:
        port = free_port()
        gateway_env = {
            **env,
            "CHAT_SERVICE_URI": f"127.0.0.1:{core_port}",
            "HTTP_PORT": str(port),
            "GRPC_PORT": str(free_port()),
            "HTTP_INTERFACE": "127.0.0.1",
            "GATEWAY_ID": gateway_id,
            "HEARTBEAT_INTERVAL_SEC": "0.5",
            "CONSOLE_ENABLED": "true",
        }
        gateways.append(Twistd("chatgateway", ["--workers", "1"], env=gateway_env, port=port))
    try:
        core.start()
        for gateway in gateways:
            gateway.start()
        from chatgateway.redisconn.cluster import key_slot
        from chatgateway.store import instance_key

        assert len({key_slot(instance_key(g)) for g in ids}) == 2
        body = until(lambda: (lambda b: b if len(b["gateways"]) == 2 else None)(status(gateways[0].port)), 15)
        assert body is not None, status(gateways[0].port)
        assert sorted(g["gateway_id"] for g in body["gateways"]) == ids
        assert body["registry_error"] is None and body["store"] == "redis"
    finally:
        for gateway in gateways:
            gateway.stop()
        core.stop()
        redis.cleanup()
    for gateway in gateways:
        assert "Traceback (most recent call last)" not in gateway.log_text(), gateway.log_tail(60)
