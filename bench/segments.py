"""TCP segments of a server's connections, from the kernel's per-socket counters (`ss -ti`).

Every send() on a TCP_NODELAY socket with an empty send queue leaves as its own
segment (on loopback the MSS is 64 KiB, so a joined burst is one segment), and each
segment the server sends is a wake-up, a read and an ACK for the reader. Counting them
needs no tracing, so the processes run at full speed: strace would stop the server at
every call, and `perf stat` on syscall tracepoints left attached processes "not counted"
on the development machine. Autocorking in the kernel may merge sends issued while
earlier segments wait in the device queue, so segments are a lower bound of sends.
"""

import re
import subprocess

FIELDS = ("data_segs_out", "bytes_sent", "segs_out")
_FIELD = re.compile(r"\b(data_segs_out|bytes_sent|segs_out):(\d+)")


def _sum(filter_):
    totals = dict.fromkeys(FIELDS, 0)
    sockets = 0
    try:
        out = subprocess.run(
            ["ss", "-tinH", "state", "established", filter_], capture_output=True, text=True, timeout=30, check=True
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    for line in out.splitlines():
        fields = dict(_FIELD.findall(line))
        if "data_segs_out" in fields or "segs_out" in fields:
            sockets += 1
            for name in FIELDS:
                totals[name] += int(fields.get(name, 0))
    totals["sockets"] = sockets
    return totals


def snapshot(ports):
    """{"server": sums over the server's side of ``ports``' connections, "peers": over the other side}."""
    server = [_sum(f"( sport = :{port} )") for port in ports]
    peers = [_sum(f"( dport = :{port} )") for port in ports]
    if None in server or None in peers:
        return None
    return {
        "server": {k: sum(s[k] for s in server) for k in server[0]},
        "peers": {k: sum(s[k] for s in peers) for k in peers[0]},
    }


def delta(before, after):
    if before is None or after is None:
        return None
    return {side: {k: after[side][k] - before[side][k] for k in FIELDS} for side in ("server", "peers")}
