#!/usr/bin/env python3
"""An independent reference for taskfactory's schedule engine: the fire instants of cron schedules
across daylight-saving transitions, computed from Python's `zoneinfo` by scanning UTC minutes.

    scripts/tools.sh oracle                  # once: the pinned tz database (tzdata 2025.2 = tzdb 2025b)
    python3 scripts/dst_oracle.py            # JSON lines on stdout, a summary on stderr
    python3 scripts/dst_oracle.py --self-check   # also re-derive every DST corner the naive way

`services/taskfactory-model/tests/dst_oracle.rs` runs this script and demands that the Rust engine
(`taskfactory_model::schedule`) produces exactly the same instants for every case.

How it works, and why it is independent of the engine. The engine goes from wall time to UTC: it
iterates wall times with the `cron` crate and resolves each through chrono-tz (`from_local_datetime`).
This goes the other way, from UTC to wall time, the direction in which a zone is a plain function:

1. Offsets. For each zone, zoneinfo gives the UTC offset at the start of every UTC hour of the range;
   where two consecutive hours differ, every minute of that hour is asked, which pins each transition
   to its minute. The result is a list of runs: UTC minute intervals with one constant offset.
2. The scan. Walking the UTC minutes t of a run, each has the local reading t + offset. Within a run
   the readings advance one minute per minute, so the walk jumps straight from one reading that
   matches the cron expression to the next (the minutes in between would match nothing). Between
   two runs the readings jump: forward (spring) skips the wall minutes in between, the *gap*; backward
   (fall back) means the readings of the next run were already read, the *repeat*. A wall minute read
   by two runs is read twice: the earlier reading is its first instant, the later its last.
3. Policy. A wall time W matched by an expression whose hour field covers all 24 hours fires at every
   instant that reads W (both passes of a repeat, nothing in a gap), whatever the policies. Otherwise a
   W read once fires there; a W read twice fires at the first (FIRST), the last (LAST) or both (BOTH);
   a W never read (in a gap) is dropped (SKIP) or fires at the first minute after the jump
   (SHIFT_FORWARD). A W on an excluded local date never fires. The result is the set of instants.

The cron parser here is written from POSIX (crontab(5)): 5 fields, numbers, names, `*`, ranges, lists,
steps, 0 and 7 = Sunday, the @ macros, and day-of-month OR day-of-week when both are restricted
(neither starts with `*`).

Output: the first line is a header (tzdb version, zones, the transitions of each zone in the range);
every further line is one case: zone, expressions, policies, excluded dates, the UTC range [start, end)
in epoch seconds, the fire instants in epoch seconds, and how many matched wall times fell into a gap
or a repeat (so the test can check that the cases really exercise the DST corners).
"""

from __future__ import annotations

import argparse
import bisect
import json
import multiprocessing
import os
import sys
import time
from datetime import date, datetime

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TZDATA_DIR = os.path.join(ROOT, ".tools", "oracle")
TZDB_VERSION = "2025b"  # what chrono-tz 0.10.4 bundles; tzdata 2025.2 on PyPI

# Read time zones ONLY from the pinned tzdata package: never from /usr/share/zoneinfo, never from a
# tzdata some other environment happens to have installed.
sys.path.insert(0, TZDATA_DIR)
import zoneinfo  # noqa: E402

zoneinfo.reset_tzpath(to=[])


def fail(message: str) -> None:
    print(f"dst_oracle: {message}", file=sys.stderr)
    sys.exit(2)


def check_tzdata() -> None:
    try:
        import tzdata  # noqa: PLC0415
    except ImportError:
        fail(f"the pinned tz database is not installed in {TZDATA_DIR}: run `scripts/tools.sh oracle`")
    where = os.path.realpath(os.path.dirname(tzdata.__file__))
    if not where.startswith(os.path.realpath(TZDATA_DIR) + os.sep):
        fail(f"tzdata was imported from {where}, not from {TZDATA_DIR}: run `scripts/tools.sh oracle`")
    if tzdata.IANA_VERSION != TZDB_VERSION:
        fail(
            f"tzdata in {TZDATA_DIR} is tzdb {tzdata.IANA_VERSION}, expected {TZDB_VERSION}: "
            "run `scripts/tools.sh oracle`"
        )


# ---------------------------------------------------------------------------------------------------
# Cron expressions

MONTH_NAMES = ["jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec"]
DAY_NAMES = ["sun", "mon", "tue", "wed", "thu", "fri", "sat"]
MACROS = {
    "@yearly": "0 0 1 1 *",
    "@annually": "0 0 1 1 *",
    "@monthly": "0 0 1 * *",
    "@weekly": "0 0 * * 0",
    "@daily": "0 0 * * *",
    "@midnight": "0 0 * * *",
    "@hourly": "0 * * * *",
}


def parse_field(text: str, lo: int, hi: int, names: dict[str, int], star_hi: int | None = None) -> set[int]:
    """One cron field to the set of its values. `star_hi` bounds `*` when it is below `hi`."""

    def number(token: str) -> int:
        token = token.lower()
        if token in names:
            return names[token]
        if not token.isdigit():
            raise ValueError(f"{token!r} is not a number or a name")
        value = int(token)
        if not lo <= value <= hi:
            raise ValueError(f"{value} is outside {lo}-{hi}")
        return value

    values: set[int] = set()
    for item in text.split(","):
        step, stepped = 1, "/" in item
        if stepped:
            item, step_text = item.split("/", 1)
            if not step_text.isdigit() or int(step_text) == 0:
                raise ValueError(f"bad step {step_text!r}")
            step = int(step_text)
        if item == "*":
            first, last = lo, hi if star_hi is None else star_hi
        elif "-" in item:
            a, b = item.split("-", 1)
            first, last = number(a), number(b)
            if first > last:
                raise ValueError(f"range {item!r} runs backwards")
        else:
            first = number(item)
            last = hi if stepped else first  # `5/15`: from 5 to the end
        values.update(range(first, last + 1, step))
    return values


class Expr:
    """A parsed 5-field expression, reduced to sets."""

    def __init__(self, text: str):
        self.text = text
        expanded = MACROS.get(text.strip().lower(), text)
        fields = expanded.split()
        if len(fields) != 5:
            raise ValueError(f"{text!r}: expected 5 fields")
        minute, hour, dom, month, dow = fields
        self.minutes = sorted(parse_field(minute, 0, 59, {}))
        self.hours = sorted(parse_field(hour, 0, 23, {}))
        self.doms = parse_field(dom, 1, 31, {})
        self.months = parse_field(month, 1, 12, {n: i + 1 for i, n in enumerate(MONTH_NAMES)})
        self.dows = {d % 7 for d in parse_field(dow, 0, 7, {n: i for i, n in enumerate(DAY_NAMES)}, star_hi=6)}
        # POSIX: a day matches day-of-month OR day-of-week when both are restricted, else both.
        self.either = not dom.startswith("*") and not dow.startswith("*")
        self.wildcard_hour = len(self.hours) == 24
        # Minutes of the day that match, ascending.
        self.day_minutes = [h * 60 + m for h in self.hours for m in self.minutes]
        self.minute_set = frozenset(self.day_minutes)
        self._days: tuple[int, bytearray] | None = None

    def day_matches(self, day: int) -> bool:
        """`day`: days since 1970-01-01 (a local date)."""
        d = date.fromordinal(EPOCH_ORDINAL + day)
        if d.month not in self.months:
            return False
        dom_ok = d.day in self.doms
        dow_ok = (day + 4) % 7 in self.dows  # 1970-01-01 was a Thursday; 0 = Sunday
        return (dom_ok or dow_ok) if self.either else (dom_ok and dow_ok)

    def prepare_days(self, first_day: int, last_day: int) -> None:
        self._days = (first_day, bytearray(self.day_matches(d) for d in range(first_day, last_day + 1)))

    def walls_in(self, lo: int, hi: int) -> list[int]:
        """Matching wall minutes (minutes since 1970-01-01 00:00 local) in [lo, hi), ascending."""
        assert self._days is not None
        first_day, ok = self._days
        out: list[int] = []
        for day in range(lo // 1440, (hi - 1) // 1440 + 1):
            if not ok[day - first_day]:
                continue
            base = day * 1440
            if lo <= base and base + 1440 <= hi:
                out.extend(base + m for m in self.day_minutes)
            else:
                out.extend(base + m for m in self.day_minutes if lo <= base + m < hi)
        return out


EPOCH_ORDINAL = date(1970, 1, 1).toordinal()


def day_of(iso: str) -> int:
    return date.fromisoformat(iso).toordinal() - EPOCH_ORDINAL


def minute_of(iso: str) -> int:
    """A UTC date (midnight) as minutes since the epoch."""
    return day_of(iso) * 1440


# ---------------------------------------------------------------------------------------------------
# What is compared

ZONES = [
    "America/New_York",
    "Europe/London",
    "Europe/Dublin",  # negative DST in tzdb: IST is standard time, winter GMT is "DST" −1 h
    "Australia/Lord_Howe",  # 30-minute DST
    "America/Santiago",  # transitions at 24:00
    "Asia/Kathmandu",  # +05:45, no DST in the range
    "Pacific/Apia",  # skipped 2011-12-30 entirely (−10 → +14)
    "UTC",
    "Pacific/Chatham",  # +12:45/+13:45
    "America/St_Johns",  # −03:30; until 2011 transitions at 00:01 (the repeat spans midnight)
    "America/Havana",  # transitions at midnight
    "Africa/Casablanca",  # DST suspended for Ramadan; since 2018 negative DST during Ramadan
    "Antarctica/Troll",  # 2-hour DST
    "Asia/Tehran",  # +03:30/+04:30, transitions at 24:00 on fixed dates, DST until 2022
]

FULL_RANGE = ("1996-01-01", "2027-01-01")
# Wall dates around the 2021 transitions of most zones (US, EU, southern hemisphere, Tehran), and
# 2011-12-31 in Apia: its 30 December did not exist, so those wall times shift onto the excluded 31st
# (they still fire: the exclusion is about the wall date that matched).
EXCLUDES = [
    "2000-02-29",
    "2011-12-31",
    "2021-03-14",
    "2021-03-28",
    "2021-04-04",
    "2021-09-21",
    "2021-10-31",
    "2021-11-07",
]


def spec(exprs, exclude=(), start=FULL_RANGE[0], end=FULL_RANGE[1], all_combos=False):
    """`all_combos`: run under all six gap × repeat policy combinations in every zone, not just one."""
    return {
        "exprs": [exprs] if isinstance(exprs, str) else list(exprs),
        "exclude": list(exclude),
        "range": (start, end),
        "all_combos": all_combos,
    }


SPECS = [
    spec("30 2 * * *"),
    spec("0 2 * * *"),
    spec("15,45 1 * * *"),
    spec("0 0 * * *"),
    spec("@daily"),
    spec("45 23 * * *"),
    spec("0 1-3 * * *"),
    spec("30 1 * * SUN"),
    spec("0 2 1 * MON"),  # the 1st OR a Monday
    spec("0 12 29 2 *"),
    spec("5 4 * * 1-5"),
    spec("0,30 2 * 3,10 *"),
    spec("15,45 1,2 * MAR-APR,OCT-NOV sun"),
    spec("45 2 1-7,25-31 * *"),
    spec("50 2,3 * * 0,6"),
    spec("40 23,0 * * 7"),
    spec(["*/30 * * 3,10 SUN", "30 1,2 * * SUN"]),  # union: where both match, the wildcard hour wins
    # Several wall times, one instant (02:10, 02:50 and 03:00 are all 03:00 when 02:xx is skipped):
    # it fires once.
    spec(["10,50 2 * 3,4,9-11 SUN", "0 3 * 3,4,9-11 SUN"], all_combos=True),
    spec(["30 0-3,23 * * SAT,SUN", "30 0,23 20-23 3,9 *"], exclude=EXCLUDES),
    spec("30 0-23 * 3,10 SUN"),  # wildcard hour spelled 0-23
    spec("15 */1 * 4,9,11 0"),  # wildcard hour spelled */1
    spec("@weekly"),
    spec("@monthly"),
    spec("@yearly"),
    # Apia's 2011-12-30 did not exist: under SHIFT_FORWARD its 12:00 fires at the start of 2011-12-31,
    # which is excluded (the exclusion is about the matched wall date); 2011-12-31 12:00 does not fire.
    spec("0 12 30,31 12 *", exclude=["2011-12-31"], all_combos=True),
    # Every gap × repeat combination against real corners in every DST zone (St John's 00:01 rule and
    # its 2011 change, Apia's DST, Casablanca's and Tehran's transitions are all in these years).
    spec("0,30 0-3,23 * * SAT,SUN", start="2008-01-01", end="2012-01-01", all_combos=True),
    # Dense wildcard-hour schedules over shorter ranges.
    spec("*/15 * * * *", start="2011-07-01", end="2012-01-01"),  # Apia's lost day, St John's change
    spec("0 * * * *", start="2008-01-01", end="2009-01-01"),
    spec("@hourly", start="2020-09-01", end="2021-06-01"),  # Apia's last DST
]

COMBOS = [(g, r) for g in ("SHIFT_FORWARD", "SKIP") for r in ("FIRST", "LAST", "BOTH")]


# ---------------------------------------------------------------------------------------------------
# Zones: runs of constant offset

SCAN_MARGIN = 3 * 1440  # minutes scanned beyond every case's range, so edges see both sides of a jump


def offset_minutes(zone: zoneinfo.ZoneInfo, utc_seconds: int) -> int:
    delta = datetime.fromtimestamp(utc_seconds, tz=zone).utcoffset()
    seconds = delta.days * 86400 + delta.seconds
    if seconds % 60:
        raise AssertionError(f"{zone.key}: offset {delta} at {utc_seconds} is not whole minutes")
    return seconds // 60


def zone_runs(name: str, lo: int, hi: int) -> list[tuple[int, int, int]]:
    """Runs (a, b, offset) covering UTC minutes [lo, hi): offset constant on [a, b). `lo` and `hi` are
    whole hours."""
    zone = zoneinfo.ZoneInfo(name)
    runs = []
    start, current = lo, offset_minutes(zone, lo * 60)
    for hour in range(lo, hi, 60):
        end_offset = offset_minutes(zone, (hour + 60) * 60)
        if end_offset == current:
            continue
        # The offset changed during this hour: ask every minute.
        for minute in range(hour + 1, hour + 61):
            offset = offset_minutes(zone, minute * 60)
            if offset != current:
                # Transitions fall on whole minutes: one second earlier still has the old offset.
                assert offset_minutes(zone, minute * 60 - 1) == current, (name, minute)
                runs.append((start, minute, current))
                start, current = minute, offset
    runs.append((start, hi, current))
    return runs


def local_interval(run: tuple[int, int, int]) -> tuple[int, int]:
    a, b, offset = run
    return a + offset, b + offset


# ---------------------------------------------------------------------------------------------------
# The scan

FIRST_PASS, LAST_PASS, GAP = 1, 2, 3


def scan(runs, exprs: list[Expr], excluded: set[int]) -> tuple[list[int], list[tuple[int, int, bool]]]:
    """Reads the matching wall minutes along the UTC runs. Returns the instants of wall minutes read
    exactly once (ascending), and the DST corners as (instant, kind, wildcard_hour): the first or the
    last reading of a wall minute read twice, or a wall minute never read (GAP: the instant is then
    the first minute after the forward jump that skipped it)."""
    locals_ = [local_interval(r) for r in runs]

    def readers(w: int) -> list[int]:
        return [j for j, (lo, hi) in enumerate(locals_) if lo <= w < hi]

    def matches(lo: int, hi: int) -> list[tuple[int, bool]]:
        merged: dict[int, bool] = {}
        for e in exprs:
            for w in e.walls_in(lo, hi):
                if w // 1440 not in excluded:
                    merged[w] = merged.get(w, False) or e.wildcard_hour
        return sorted(merged.items())

    singles: list[int] = []
    corners: list[tuple[int, int, bool]] = []
    for k, (a, _b, offset) in enumerate(runs):
        lo, hi = locals_[k]
        # The readings of this run that another run also reads: in practice a stretch at either end
        # (a fall-back repeat); every reading strictly between them is read once.
        shared = [(max(lo, lo2), min(hi, hi2)) for j, (lo2, hi2) in enumerate(locals_) if j != k and lo2 < hi and lo < hi2]
        inner_lo = max([e for s, e in shared if s == lo], default=lo)
        inner_hi = min([s for s, e in shared if e == hi], default=hi)
        assert all(e <= inner_lo or s >= inner_hi for s, e in shared), (runs[k], shared)
        for w, wild in matches(lo, hi):
            if inner_lo <= w < inner_hi:
                singles.append(w - offset)
                continue
            who = readers(w)
            if len(who) == 1:
                singles.append(w - offset)
            elif len(who) == 2:
                corners.append((w - offset, FIRST_PASS if k == who[0] else LAST_PASS, wild))
            else:
                raise AssertionError(f"wall minute {w} is read {len(who)} times")
        if k > 0:
            gap_lo, gap_hi = locals_[k - 1][1], lo
            if gap_hi > gap_lo:  # the readings jumped forward at minute a
                corners.extend((a, GAP, wild) for w, wild in matches(gap_lo, gap_hi) if not readers(w))
    return singles, corners


def fires(scanned, gap: str, repeat: str, lo: int, hi: int) -> list[int]:
    singles, corners = scanned
    out = set(singles[bisect.bisect_left(singles, lo) : bisect.bisect_left(singles, hi)])
    for t, kind, wild in corners:
        if not lo <= t < hi:
            continue
        if kind == GAP:
            if not wild and gap == "SHIFT_FORWARD":
                out.add(t)
        elif wild or repeat == "BOTH" or repeat == ("FIRST" if kind == FIRST_PASS else "LAST"):
            out.add(t)
    return sorted(out)


def corner_counts(scanned, lo: int, hi: int) -> dict[str, int]:
    """How many matched wall minutes in the range fall into a gap or a repeat, by wildcard-ness."""
    counts = {"gap_walls": 0, "repeat_walls": 0, "wild_gap_walls": 0, "wild_repeat_walls": 0}
    for t, kind, wild in scanned[1]:
        if lo <= t < hi and kind in (GAP, FIRST_PASS):
            counts[("wild_" if wild else "") + ("gap_walls" if kind == GAP else "repeat_walls")] += 1
    return counts


# ---------------------------------------------------------------------------------------------------
# Cases


def scan_bounds() -> tuple[int, int]:
    lo = min(minute_of(s["range"][0]) for s in SPECS) - SCAN_MARGIN
    hi = max(minute_of(s["range"][1]) for s in SPECS) + SCAN_MARGIN
    return lo - lo % 60, hi + (-hi) % 60


EXPRS: list[list[Expr]] = []


def prepare() -> None:
    lo, hi = scan_bounds()
    for s in SPECS:
        exprs = [Expr(e) for e in s["exprs"]]
        for e in exprs:
            e.prepare_days(lo // 1440 - 2, hi // 1440 + 2)
        EXPRS.append(exprs)


def zone_cases(args: tuple[int, str, bool]):
    """All cases of one zone: (transitions, [case line, ...], fire instants, self-checked windows)."""
    zone_index, name, check = args
    lo, hi = scan_bounds()
    runs = zone_runs(name, lo, hi)
    scans = []
    for s, exprs in zip(SPECS, EXPRS):
        excluded = {day_of(d) for d in s["exclude"]}
        start, end = minute_of(s["range"][0]), minute_of(s["range"][1])
        events = scan(runs, exprs, excluded)
        scans.append((events, start, end, corner_counts(events, start, end)))
    # Policies: the specs whose fixed-hour wall times hit both a gap and a repeat in this zone get the
    # six gap × repeat combinations in turn (so each combination meets real DST corners); the others
    # rotate through them.
    both = [i for i, (_, _, _, c) in enumerate(scans) if c["gap_walls"] and c["repeat_walls"] and not SPECS[i]["all_combos"]]
    combo_of = {i: COMBOS[(i + zone_index) % len(COMBOS)] for i in range(len(SPECS))}
    for n, i in enumerate(both):
        combo_of[i] = COMBOS[(n + zone_index) % len(COMBOS)]
    lines, total = [], 0
    for i, (s, (events, start, end, counts)) in enumerate(zip(SPECS, scans)):
        for gap, repeat in COMBOS if s["all_combos"] else [combo_of[i]]:
            instants = fires(events, gap, repeat, start, end)
            total += len(instants)
            case = {
                "zone": name,
                "exprs": s["exprs"],
                "gap": gap,
                "repeat": repeat,
                "exclude": s["exclude"],
                "start": start * 60,
                "end": end * 60,
                "fires": [t * 60 for t in instants],
                **counts,
            }
            lines.append(json.dumps(case, separators=(",", ":")))
    transitions = [[b * 60, o1 * 60, o2 * 60] for (_, b, o1), (_, _, o2) in zip(runs, runs[1:])]
    windows = self_check(name, runs, lines) if check else 0
    return transitions, lines, total, windows


# ---------------------------------------------------------------------------------------------------
# Self-check: the same answers from a literal minute-by-minute walk around every transition


def naive_fires(readings: list[tuple[int, int]], exprs: list[Expr], excluded: set[int], gap: str, repeat: str) -> set[int]:
    """The fire instants of consecutive UTC minutes and their readings [(t, local), ...], from first
    principles: a wall minute read several times was repeated, one skipped between two consecutive
    readings was in a gap."""
    read_at: dict[int, list[int]] = {}
    for t, w in readings:
        read_at.setdefault(w, []).append(t)
    skipped = [(w, t) for (_, w0), (t, w1) in zip(readings, readings[1:]) for w in range(w0 + 1, w1) if w not in read_at]

    def matched(w: int) -> tuple[bool, bool]:
        hits = [e for e in exprs if w % 1440 in e.minute_set and e.day_matches(w // 1440)]
        return bool(hits), any(e.wildcard_hour for e in hits)

    out = set()
    for w, ts in read_at.items():
        ok, wild = matched(w)
        if not ok or w // 1440 in excluded:
            continue
        if wild or repeat == "BOTH" or len(ts) == 1:
            out.update(ts)
        else:
            out.add(ts[0] if repeat == "FIRST" else ts[-1])
    for w, t in skipped:
        ok, wild = matched(w)
        if ok and w // 1440 not in excluded and not wild and gap == "SHIFT_FORWARD":
            out.add(t)
    return out


def self_check(name: str, runs, lines: list[str]) -> int:
    """Re-derives every case of a zone within a day of each transition, asking zoneinfo about every
    single minute; returns how many (case, transition) windows agree, raises on the first that does not."""
    zone = zoneinfo.ZoneInfo(name)
    windows = []
    for (_, at, _), _ in zip(runs, runs[1:]):
        lo, hi = at - 26 * 60, at + 26 * 60
        windows.append((at, [(t, t + offset_minutes(zone, t * 60)) for t in range(lo, hi)]))
    checked = 0
    spec_of = {json.dumps(s["exprs"]): i for i, s in enumerate(SPECS)}
    for line in lines:
        case = json.loads(line)
        exprs = EXPRS[spec_of[json.dumps(case["exprs"])]]
        excluded = {day_of(d) for d in case["exclude"]}
        start, end = case["start"] // 60, case["end"] // 60
        fired = [t // 60 for t in case["fires"]]
        for at, readings in windows:
            if readings[0][0] < start or readings[-1][0] >= end:
                continue
            inner = (at - 24 * 60, at + 24 * 60)  # far from the window's edges
            want = {t for t in naive_fires(readings, exprs, excluded, case["gap"], case["repeat"]) if inner[0] <= t < inner[1]}
            got = {t for t in fired if inner[0] <= t < inner[1]}
            if want != got:
                raise AssertionError(
                    f"self-check: {name} {case['exprs']} {case['gap']}/{case['repeat']} near {at * 60}: "
                    f"the scan has {sorted(t * 60 for t in got - want)} extra, {sorted(t * 60 for t in want - got)} missing"
                )
            checked += 1
    return checked


# ---------------------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="worker processes")
    parser.add_argument("--self-check", action="store_true", help="re-derive every DST corner minute by minute")
    opts = parser.parse_args()
    check_tzdata()
    began = time.monotonic()
    prepare()
    context = multiprocessing.get_context("fork")
    with context.Pool(opts.jobs) as pool:
        results = pool.map(zone_cases, [(i, z, opts.self_check) for i, z in enumerate(ZONES)], chunksize=1)
    check_coverage(results)
    lo, hi = minute_of(FULL_RANGE[0]) * 60, minute_of(FULL_RANGE[1]) * 60
    header = {
        "oracle": "scripts/dst_oracle.py",
        "tzdb": TZDB_VERSION,
        "zones": ZONES,
        "specs": len(SPECS),
        # [UTC instant, offset before, offset after] in seconds, for the transitions in FULL_RANGE
        "transitions": {z: [t for t in r[0] if lo <= t[0] < hi] for z, r in zip(ZONES, results)},
    }
    out = sys.stdout
    out.write(json.dumps(header, separators=(",", ":")) + "\n")
    for _, lines, _, _ in results:
        for line in lines:
            out.write(line + "\n")
    out.flush()
    cases = sum(len(r[1]) for r in results)
    instants = sum(r[2] for r in results)
    windows = sum(r[3] for r in results)
    elapsed = time.monotonic() - began
    check = f"; self-check: {windows} (case, transition) windows agree minute by minute" if opts.self_check else ""
    print(
        f"dst_oracle: tzdb {TZDB_VERSION}, {len(ZONES)} zones, {len(SPECS)} specs, {cases} cases, "
        f"{instants} fire instants in {elapsed:.1f} s{check}",
        file=sys.stderr,
    )


def check_coverage(results) -> None:
    """Every zone with DST in the range meets every gap × repeat combination in a case whose
    fixed-hour wall times fall both into a gap and into a repeat, and wildcard-hour wall times in both."""
    problems = []
    for zone, (transitions, lines, _, _) in zip(ZONES, results):
        if not any(after > before for _, before, after in transitions) or not any(after < before for _, before, after in transitions):
            continue
        met, wild_gap, wild_repeat = set(), 0, 0
        for line in lines:
            case = json.loads(line)
            if case["gap_walls"] and case["repeat_walls"]:
                met.add((case["gap"], case["repeat"]))
            wild_gap += case["wild_gap_walls"]
            wild_repeat += case["wild_repeat_walls"]
        for combo in COMBOS:
            if combo not in met:
                problems.append(f"{zone}: no case with {combo[0]}/{combo[1]} hits both a gap and a repeat")
        if not wild_gap or not wild_repeat:
            problems.append(f"{zone}: no wildcard-hour wall time falls into a gap or a repeat")
    if problems:
        fail("the specs no longer cover the DST corners:\n  " + "\n  ".join(problems))


if __name__ == "__main__":
    main()
