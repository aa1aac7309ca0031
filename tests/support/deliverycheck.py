"""The delivery check: every device holds every event of its rooms exactly once and in order.

Judges what support/fleet.py recorded (Fleet.dump: per device, per room, [epoch, offset, n]
in arrival order, and the gaps and errors it was told of) against what
support/corepublisher.py sent (its log: per room, the numbers the core confirmed and those
it did not). In order means by offset (one more each time, within an epoch) and by the
publisher's number. An uncertain number (a send the core did not confirm) is neither
required nor an error; held twice it is doubled like any other.

Devices named ``at_least_once`` (those resuming from a resume token or the gateway's record
alone, which may be up to a heartbeat behind after a gateway died: docs/protocol.md#acks)
may be given again what they hold: such repeats are dropped and counted (``redelivered``)
before they are judged like the others.
"""

from dataclasses import dataclass, field


@dataclass
class RoomFinding:
    """What is wrong with one device's events of one room (empty lists: nothing)."""

    missing: list = field(default_factory=list)  # numbers sent and not held
    doubled: list = field(default_factory=list)  # numbers (or offsets) held more than once
    out_of_order: list = field(default_factory=list)  # (index, what) where the order breaks
    unexpected: list = field(default_factory=list)  # numbers never sent

    def __bool__(self):
        return bool(self.missing or self.doubled or self.out_of_order or self.unexpected)


@dataclass
class Report:
    devices: int = 0
    events_expected: int = 0
    events_held: int = 0
    findings: dict = field(default_factory=dict)  # (profile, room) -> RoomFinding
    gaps: dict = field(default_factory=dict)  # profile -> gap events it was sent
    errors: dict = field(default_factory=dict)  # profile -> errors it was sent
    strays: dict = field(default_factory=dict)  # profile -> rooms it got events of and is not in
    histories: dict = field(default_factory=dict)  # profile -> its connections (fleet.py), faulty ones
    redelivered: int = 0  # repeats dropped for at_least_once devices

    @property
    def complete(self):
        """Nothing is missing (there may be other faults)."""
        return not any(f.missing for f in self.findings.values())

    @property
    def ok(self):
        return not (self.findings or self.gaps or self.errors or self.strays)

    def counts(self):
        found = self.findings.values()
        return {
            "devices": self.devices,
            "expected": self.events_expected,
            "held": self.events_held,
            "missing": sum(len(f.missing) for f in found),
            "doubled": sum(len(f.doubled) for f in found),
            "out_of_order": sum(len(f.out_of_order) for f in found),
            "unexpected": sum(len(f.unexpected) for f in found),
            "devices_missing": len({p for (p, _), f in self.findings.items() if f.missing}),
            "gaps": sum(len(g) for g in self.gaps.values()),
            "errors": sum(len(e) for e in self.errors.values()),
            "stray_rooms": sum(len(r) for r in self.strays.values()),
            "redelivered": self.redelivered,
        }

    def describe(self, limit=10, first=8):
        """Readable: the counts, then the first ``limit`` devices' faults (``first`` of each kind)."""
        lines = [f"delivery check: {self.counts()}"]
        for (profile, room), finding in list(self.findings.items())[:limit]:
            parts = [
                f"{name} {len(values)}: {_runs(values, first) if name == 'missing' else values[:first]}"
                for name, values in vars(finding).items()
                if values
            ]
            lines.append(f"  {profile} room {room}: " + "; ".join(parts))
            if profile in self.histories:
                lines.append(f"    its connections: {_history(self.histories[profile], room)}")
        for name, table in (("gaps", self.gaps), ("errors", self.errors), ("strays", self.strays)):
            for profile, values in list(table.items())[:limit]:
                lines.append(f"  {profile} {name}: {values[:first]}")
        return "\n".join(lines)


def _history(history, room):
    """A device's connections, short: "open gw-1 resumed token @44; end 1001; ..." (@: the
    offset it sent for ``room``), times in seconds from its first."""
    if not history:
        return "none"
    start, out = history[0][0], []
    for entry in history:
        at = f"{entry[0] - start:.1f}s"
        if entry[1] == "open":
            _, _, gateway, resumed, token, positions = entry
            sent = ("token " if token else "") + (f"@{positions[room]}" if room in positions else "")
            out.append(f"{at} open {gateway}{' resumed' if resumed else ''} {sent}".rstrip())
        else:
            out.append(f"{at} end {entry[2] or 'no close'}")
    return "; ".join(out)


def _runs(numbers, first):
    """[3, 4, 5, 9] -> "3-5, 9" (the ``first`` runs): missing events come in runs."""
    out, start, prev = [], None, None
    for n in sorted(numbers):
        if start is None:
            start = prev = n
        elif n == prev + 1:
            prev = n
        else:
            out.append(f"{start}-{prev}" if prev != start else f"{start}")
            start = prev = n
    if start is not None:
        out.append(f"{start}-{prev}" if prev != start else f"{start}")
    return ", ".join(out[:first]) + (", ..." if len(out) > first else "")


def check_room(records, sent, uncertain=()):
    """The finding for one device's ``records`` ([epoch, offset, n] in arrival order) of a room
    whose confirmed numbers are ``sent`` (in order) and unconfirmed ones ``uncertain``."""
    finding = RoomFinding()
    sent_set, uncertain_set = set(sent), set(uncertain)
    seen_n, seen_position = set(), set()
    last = None  # (epoch, offset) of the previous record
    last_n = None
    for i, (epoch, offset, n) in enumerate(records):
        if (epoch, offset) in seen_position or (n >= 0 and n in seen_n):
            finding.doubled.append(n if n >= 0 else f"offset {offset}")
        seen_position.add((epoch, offset))
        if n >= 0:
            seen_n.add(n)
            if n not in sent_set and n not in uncertain_set:
                finding.unexpected.append(n)
            if last_n is not None and n <= last_n:
                finding.out_of_order.append((i, f"n {n} after {last_n}"))
            last_n = n
        if last is not None and epoch == last[0] and offset != last[1] + 1:
            what = "skipped" if offset > last[1] + 1 else "back"
            finding.out_of_order.append((i, f"offset {offset} after {last[1]} ({what})"))
        last = (epoch, offset)
    finding.missing = [n for n in sent if n not in seen_n]
    return finding


def without_repeats(records):
    """``records`` less each one whose position came before: (the rest, how many were dropped)."""
    seen, kept = set(), []
    for record in records:
        if (record[0], record[1]) not in seen:
            seen.add((record[0], record[1]))
            kept.append(record)
    return kept, len(records) - len(kept)


def check(expected_rooms, published, dump, at_least_once=()):
    """The Report for every device of ``expected_rooms`` ({profile: [room ids]}), given the
    publisher's log ``published`` and the fleet's ``dump``."""
    report = Report(devices=len(expected_rooms))
    at_least_once = set(at_least_once)
    sent, uncertain = published["sent"], published.get("uncertain", {})
    for profile, rooms in expected_rooms.items():
        device = dump.get(profile, {"rooms": {}, "gaps": [], "errors": []})
        held = device["rooms"]
        for room in rooms:
            records = held.get(room, [])
            if profile in at_least_once:
                records, repeats = without_repeats(records)
                report.redelivered += repeats
            report.events_expected += len(sent.get(room, ()))
            report.events_held += len(records)
            finding = check_room(records, sent.get(room, ()), uncertain.get(room, ()))
            if finding:
                report.findings[(profile, room)] = finding
                report.histories[profile] = device.get("history", [])
        strays = sorted(set(held) - set(rooms))
        if strays:
            report.strays[profile] = strays
        if device["gaps"]:
            report.gaps[profile] = device["gaps"]
        if device["errors"]:
            report.errors[profile] = device["errors"]
    return report
