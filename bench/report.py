"""bench/out/suite.json -> bench/RESULTS.md and PNG plots in bench/.

.venv/bin/python bench/report.py [--in bench/out/suite.json] [--no-plots]
"""

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

HERE = Path(__file__).resolve().parent


def plot_throughput(results, out):
    rooms = sorted({m for s in results["systems"].values() for m in s["fanout"]}, key=int)
    fig, axes = plt.subplots(1, len(rooms), figsize=(5 * len(rooms), 4), squeeze=False)
    for ax, members in zip(axes[0], rooms, strict=True):
        for name, runs in results["systems"].items():
            reps = runs["fanout"].get(members, [])
            if reps:
                rep = reps[len(reps) // 2]
                steps = sorted(rep["steps"] + rep.get("bisection", []), key=lambda s: s["publish_rate"])
                ax.plot(
                    [s["publish_rate"] for s in steps], [s["deliveries_per_second"] for s in steps], "o-", label=name
                )
        ax.set_title(f"room of {members}")
        ax.set_xscale("log")
        ax.set_xlabel("published messages/s")
        ax.set_ylabel("delivered messages/s")
        ax.legend()
    fig.tight_layout()
    fig.savefig(out)


def plot_latency(results, out):
    summary = results["summary"]
    labels, p50, p99 = [], [], []
    for name, entry in summary.items():
        for members, f in sorted(entry["fanout"].items(), key=lambda kv: int(kv[0])):
            labels.append(f"{name}\n{members}")
            p50.append(f["p50_ms_at_half"])
            p99.append(f["p99_ms_at_half"])
    fig, ax = plt.subplots(figsize=(max(6, len(labels) * 0.9), 4))
    xs = range(len(labels))
    ax.bar([x - 0.2 for x in xs], p50, width=0.4, label="p50")
    ax.bar([x + 0.2 for x in xs], p99, width=0.4, label="p99")
    ax.set_xticks(list(xs), labels, fontsize=7)
    ax.set_ylabel("delivery latency at half saturation (ms)")
    ax.set_yscale("log")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out)


def plot_rss(results, out):
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, entry in results["summary"].items():
        points = sorted(
            (int(c), f["kib_per_connection"])
            for c, f in entry["idle"].items()
            if f.get("kib_per_connection") is not None
        )
        if points:
            ax.plot([p[0] for p in points], [p[1] for p in points], "o-", label=name)
    ax.set_xlabel("idle connections")
    ax.set_ylabel("server RSS per connection (KiB)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out)


def _fmt(value, spec=""):
    return "—" if value is None else format(value, spec)


def tables(results):
    lines = [
        f"Load client: {results.get('client', 'python')}; p99 rate bisected {results.get('bisect', 0)} times "
        "past the doubling ladder."
    ]
    lines.append("")
    lines.append(
        "| system | room | saturation (deliveries/s) | ratio | × one worker | max rate with p99 ≤ 50 ms (msg/s) "
        "| first over (msg/s) | ratio | p50 / p99 / max at half saturation (ms) | server CPU µs/delivery "
        "| client CPU share |"
    )
    lines.append("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for name, entry in results["summary"].items():
        for members, f in sorted(entry["fanout"].items(), key=lambda kv: int(kv[0])):
            lines.append(
                f"| {name} | {members} | {_fmt(f['saturation_deliveries_per_second'], ',.0f')} "
                f"| {f.get('saturation_ratio', '—')} | {f.get('over_one_worker', '—')} "
                f"| {_fmt(f['max_rate_p99_under_50ms'])} | {_fmt(f.get('first_rate_over_50ms'))} "
                f"| {f.get('p99_50ms_rate_ratio', '—')} "
                f"| {f['p50_ms_at_half']} / {f['p99_ms_at_half']} / {f['max_ms_at_half']} "
                f"| {_fmt(f.get('server_cpu_us_per_delivery'))} | {f['client_cpu_share']} |"
            )
    lines.append("")
    lines.append(
        "| system | idle connections | RSS per connection (KiB) | over reference (KiB) | handshakes/s "
        "(to `connected`) | ratio | mean ms to HTTP 101 / to `connected` | server CPU ms/handshake | failed |"
    )
    lines.append("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for name, entry in results["summary"].items():
        for count, f in sorted(entry["idle"].items(), key=lambda kv: int(kv[0])):
            lines.append(
                f"| {name} | {int(count):,} | {f['kib_per_connection']} | {f.get('kib_over_reference', '—')} "
                f"| {f['handshakes_per_second']} | {f.get('handshake_ratio', '—')} "
                f"| {_fmt(f.get('ms_to_101_mean'))} / {_fmt(f.get('ms_to_connected_mean'))} "
                f"| {_fmt(f.get('server_cpu_ms_per_handshake'))} | {f.get('failed', 0)} |"
            )
    placements = [(name, runs.get("placement")) for name, runs in results["systems"].items() if runs.get("placement")]
    if placements:
        lines.append("")
        lines.append("| system | server processes (CPUs) | load clients | publisher | Redis | core |")
        lines.append("| --- | --- | --- | --- | --- | --- |")
        for name, p in placements:
            n = len(p["server"])
            servers = ", ".join(sorted(set(p["server"].values()))) + f" ({n} process{'es' if n > 1 else ''})"
            lines.append(f"| {name} | {servers} | {p['clients']} | {p['publisher']} | {p['redis']} | {p['core']} |")
    errors = [(name, e) for name, runs in results["systems"].items() for e in runs.get("errors", [])]
    if errors:
        lines.append("")
        lines.append("Errors (the step was skipped, the run went on):")
        lines.extend(f"- {name}, repeat {e['repeat']}, {e['phase']}: {e['error']}" for name, e in errors)
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--in", dest="path", default=str(HERE / "out" / "suite.json"))
    parser.add_argument("--no-plots", action="store_true", help="tables only (keep bench/*.png as they are)")
    args = parser.parse_args()
    results = json.loads(Path(args.path).read_text())
    if not args.no_plots:
        plot_throughput(results, HERE / "throughput.png")
        plot_latency(results, HERE / "latency.png")
        plot_rss(results, HERE / "rss.png")
    print(tables(results))


if __name__ == "__main__":
    main()
