"""Figures of a real gateway's GET /metrics (Prometheus text) for tests and bench/."""

import urllib.request

from prometheus_client.parser import text_string_to_metric_families

CORE_CALLS = "rpc_client_call_duration_seconds_count"
ACTIVE = "chatgateway_server_active_connections"


def samples(port, host="127.0.0.1", timeout=5):
    """[(name, labels, value), ...] of the gateway's /metrics."""
    with urllib.request.urlopen(f"http://{host}:{port}/metrics", timeout=timeout) as answer:
        text = answer.read().decode()
    return [(s.name, s.labels, s.value) for family in text_string_to_metric_families(text) for s in family.samples]


def core_calls(port, host="127.0.0.1", by_status=False):
    """{method name (e.g. "SearchRooms"): calls the gateway made to the core so far}, over every
    status; ``by_status``: keyed "SearchRooms OK", "SearchRooms UNAVAILABLE"... (calls the gateway
    refused itself, with its circuit open or too many in flight, are counted too, UNAVAILABLE)."""
    calls = {}
    for name, labels, value in samples(port, host):
        if name == CORE_CALLS:
            key = labels.get("rpc_method", "").rsplit("/", 1)[-1]
            if by_status:
                key += " " + labels.get("rpc_response_status_code", "")
            calls[key] = calls.get(key, 0) + int(value)
    return calls


def active_connections(port, host="127.0.0.1"):
    return int(sum(value for name, _, value in samples(port, host) if name == ACTIVE))


def calls_between(after, before):
    """{method: calls made between two core_calls() readings}, methods with none left out."""
    return {m: n - before.get(m, 0) for m, n in after.items() if n != before.get(m, 0)}


CATCHUP_READS = "chatgateway_catchup_reads_total"
GAPS_SENT = "chatgateway_catchup_gaps_total"
FELL_BEHIND = "chatgateway_catchup_behind_total"


def catchup_reads(port, host="127.0.0.1"):
    """{"stream": READ_ROOM calls, "core": GetHistory pages} the gateway made to fill gaps and
    catch devices up, "gaps": gap events it sent, "behind": times a device fell behind
    (docs/architecture.md#catch-up)."""
    reads = {"stream": 0, "core": 0, "gaps": 0, "behind": 0}
    for name, labels, value in samples(port, host):
        if name == CATCHUP_READS:
            source = labels.get("chatgateway_catchup_source", "")
            reads[source] = reads.get(source, 0) + int(value)
        elif name == GAPS_SENT:
            reads["gaps"] += int(value)
        elif name == FELL_BEHIND:
            reads["behind"] += int(value)
    return reads
