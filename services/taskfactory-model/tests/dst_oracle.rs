//! The schedule engine against an independent oracle.
//!
//! `scripts/dst_oracle.py` computes the fire instants of cron schedules with Python's `zoneinfo`
//! (tzdata 2025.2 = tzdb 2025b, the release chrono-tz 0.10.4 bundles), scanning UTC minutes and
//! reading each one's local wall time: a different language, a different time zone library, a
//! different cron parser and the opposite direction (UTC → wall, where the engine maps wall → UTC).
//! Every case it prints — zones × specs × gap/repeat policies over three decades — must come out of
//! `Schedule::occurrences_after` instant for instant. The oracle needs its pinned tz database:
//! `scripts/tools.sh oracle` installs it (`just test` does).

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

use chrono::{DateTime, Duration, NaiveDate, Offset, TimeZone, Utc};
use serde::Deserialize;
use taskfactory_model::schedule::{GapPolicy, RepeatPolicy, Schedule};

/// Coverage the oracle must keep: nobody can shrink it silently.
const MIN_ZONES: usize = 12;
const MIN_LONG_SPECS: usize = 15;
const MIN_YEARS: f64 = 30.0;
const REQUIRED_ZONES: [&str; 8] = [
    "America/New_York",
    "Europe/London",
    "Europe/Dublin",
    "Australia/Lord_Howe",
    "America/Santiago",
    "Asia/Kathmandu",
    "Pacific/Apia",
    "UTC",
];
/// The tz database chrono-tz 0.10.4 is built from; the oracle must read the same release.
const TZDB: &str = "2025b";
/// How much of a disagreement to show: instants and report lines per case, cases in full.
const SHOW_INSTANTS: usize = 6;
const SHOW_LINES: usize = 14;
const SHOW_CASES: usize = 12;

#[derive(Deserialize)]
struct Header {
    tzdb: String,
    zones: Vec<String>,
    /// Per zone: `[UTC instant, offset before, offset after]`, seconds.
    transitions: BTreeMap<String, Vec<[i64; 3]>>,
}

#[derive(Deserialize)]
struct Case {
    zone: String,
    exprs: Vec<String>,
    gap: String,
    repeat: String,
    exclude: Vec<String>,
    /// The UTC range `[start, end)` the oracle computed, epoch seconds.
    start: i64,
    end: i64,
    /// The fire instants, epoch seconds, ascending.
    fires: Vec<i64>,
    /// Matched wall times of fixed-hour expressions that fall into a gap / a repeat.
    gap_walls: u64,
    repeat_walls: u64,
    wild_gap_walls: u64,
    wild_repeat_walls: u64,
}

impl Case {
    fn title(&self) -> String {
        let exclude = if self.exclude.is_empty() {
            String::new()
        } else {
            format!(" exclude {}", self.exclude.join(","))
        };
        format!(
            "{} {:?} gap={} repeat={}{exclude} range [{}, {})",
            self.zone,
            self.exprs,
            self.gap,
            self.repeat,
            utc(self.start).format("%Y-%m-%d"),
            utc(self.end).format("%Y-%m-%d"),
        )
    }

    fn schedule(&self) -> Schedule {
        let gap = match self.gap.as_str() {
            "SHIFT_FORWARD" => GapPolicy::ShiftForward,
            "SKIP" => GapPolicy::Skip,
            other => panic!("oracle: unknown gap policy {other}"),
        };
        let repeat = match self.repeat.as_str() {
            "FIRST" => RepeatPolicy::First,
            "LAST" => RepeatPolicy::Last,
            "BOTH" => RepeatPolicy::Both,
            other => panic!("oracle: unknown repeat policy {other}"),
        };
        let exclude: Vec<NaiveDate> = self
            .exclude
            .iter()
            .map(|d| d.parse().expect("oracle: exclude dates are YYYY-MM-DD"))
            .collect();
        Schedule::new(&self.exprs, &self.zone, gap, repeat)
            .unwrap_or_else(|e| panic!("{}: the engine rejects the schedule: {e:?}", self.title()))
            .with_exclude_dates(exclude)
    }

    fn years(&self) -> f64 {
        (self.end - self.start) as f64 / (365.2425 * 86_400.0)
    }
}

fn utc(seconds: i64) -> DateTime<Utc> {
    DateTime::from_timestamp(seconds, 0).expect("an instant in chrono's range")
}

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// Runs the oracle; fails (never skips) when it cannot run.
fn run_oracle() -> (Header, Vec<Case>) {
    let root = repo_root();
    let tzdata = root.join(".tools/oracle/tzdata/__init__.py");
    assert!(
        tzdata.is_file(),
        "the DST oracle's pinned tz database is not installed ({} is missing): run `scripts/tools.sh oracle` \
         (it installs tzdata 2025.2 = tzdb {TZDB} into .tools/oracle; `just test` does it too)",
        tzdata.display()
    );
    let began = Instant::now();
    let output = Command::new("python3")
        .arg("scripts/dst_oracle.py")
        .current_dir(&root)
        .output()
        .unwrap_or_else(|e| panic!("cannot run python3 scripts/dst_oracle.py: {e}"));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "scripts/dst_oracle.py failed ({}); if the tz database is missing, run `scripts/tools.sh oracle`:\n{stderr}",
        output.status
    );
    eprintln!("{} [{:.1?}]", stderr.trim(), began.elapsed());
    let stdout = String::from_utf8(output.stdout).expect("the oracle prints UTF-8");
    let mut lines = stdout.lines();
    let header: Header =
        serde_json::from_str(lines.next().expect("the oracle prints a header line"))
            .expect("the oracle's header parses");
    let cases: Vec<Case> = lines
        .map(|line| serde_json::from_str(line).expect("an oracle case parses"))
        .collect();
    (header, cases)
}

fn check_coverage(header: &Header, cases: &[Case]) {
    assert_eq!(
        header.tzdb, TZDB,
        "the oracle reads tzdb {} but chrono-tz 0.10.4 bundles {TZDB}: pin them to the same release",
        header.tzdb
    );
    let zones: BTreeSet<&str> = cases.iter().map(|c| c.zone.as_str()).collect();
    assert!(
        zones.len() >= MIN_ZONES,
        "the oracle covers {} zones, at least {MIN_ZONES} are required",
        zones.len()
    );
    for zone in REQUIRED_ZONES {
        assert!(zones.contains(zone), "the oracle must cover {zone}");
    }
    // Specs that run over at least 30 years, in every zone.
    let mut spec_zones: BTreeMap<(Vec<String>, Vec<String>), BTreeSet<&str>> = BTreeMap::new();
    for case in cases.iter().filter(|c| c.years() >= MIN_YEARS) {
        spec_zones
            .entry((case.exprs.clone(), case.exclude.clone()))
            .or_default()
            .insert(&case.zone);
    }
    let long_specs = spec_zones.values().filter(|z| **z == zones).count();
    assert!(
        long_specs >= MIN_LONG_SPECS,
        "the oracle runs {long_specs} specs over {MIN_YEARS} years in every zone, at least {MIN_LONG_SPECS} are required"
    );
    // In every zone with DST, every gap × repeat combination meets fixed-hour wall times in a gap
    // and in a repeat, and wildcard-hour wall times meet both too.
    for zone in &header.zones {
        let transitions = &header.transitions[zone];
        let springs = transitions.iter().any(|[_, before, after]| after > before);
        let falls = transitions.iter().any(|[_, before, after]| after < before);
        if !(springs && falls) {
            continue;
        }
        let in_zone: Vec<&Case> = cases.iter().filter(|c| &c.zone == zone).collect();
        for gap in ["SHIFT_FORWARD", "SKIP"] {
            for repeat in ["FIRST", "LAST", "BOTH"] {
                assert!(
                    in_zone.iter().any(|c| c.gap == gap
                        && c.repeat == repeat
                        && c.gap_walls > 0
                        && c.repeat_walls > 0),
                    "{zone}: no oracle case with {gap}/{repeat} meets both a gap and a repeat"
                );
            }
        }
        assert!(
            in_zone.iter().any(|c| c.wild_gap_walls > 0)
                && in_zone.iter().any(|c| c.wild_repeat_walls > 0),
            "{zone}: no oracle case has wildcard-hour wall times in a gap and in a repeat"
        );
    }
    eprintln!(
        "oracle coverage: {} zones, {long_specs} specs over ≥{MIN_YEARS} years in every zone, {} cases",
        zones.len(),
        cases.len()
    );
}

/// Both sides read the same tz database: every transition the oracle saw is one in chrono-tz too
/// (a clearer message than thousands of differing instants when the two drift apart).
fn check_transitions(header: &Header) {
    let mut count = 0;
    for zone in &header.zones {
        let tz = Schedule::new(
            &["@daily".to_owned()],
            zone,
            GapPolicy::ShiftForward,
            RepeatPolicy::First,
        )
        .expect("the oracle's zones are known to chrono-tz")
        .timezone();
        let offset = |t: i64| {
            tz.offset_from_utc_datetime(&utc(t).naive_utc())
                .fix()
                .local_minus_utc()
        };
        for &[at, before, after] in &header.transitions[zone] {
            assert_eq!(
                (offset(at - 1), offset(at)),
                (
                    i32::try_from(before).unwrap(),
                    i32::try_from(after).unwrap()
                ),
                "{zone}: zoneinfo and chrono-tz disagree about the transition at {}",
                utc(at).to_rfc3339()
            );
            count += 1;
        }
    }
    eprintln!("chrono-tz agrees with the oracle on {count} transitions");
}

/// What one case found: instants compared, start probes run, and a report if anything differs.
struct Outcome {
    case: usize,
    instants: usize,
    probes: usize,
    report: Option<String>,
}

fn compare(case: &Case, transitions: &[[i64; 3]]) -> Outcome {
    let schedule = case.schedule();
    let tz = schedule.timezone();
    let local = |t: DateTime<Utc>| {
        t.with_timezone(&tz)
            .format("%Y-%m-%d %H:%M:%S%.f %Z (%:z)")
            .to_string()
    };
    let end = utc(case.end);
    // Exact instants: a fire a fraction of a second off is a different instant.
    let oracle: Vec<DateTime<Utc>> = case.fires.iter().map(|t| utc(*t)).collect();
    let engine: Vec<DateTime<Utc>> = schedule
        .occurrences_after(utc(case.start - 1))
        .map(|o| o.at)
        .take_while(|t| *t < end)
        .collect();
    let mut report = String::new();
    if engine != oracle {
        let ours: BTreeSet<DateTime<Utc>> = engine.iter().copied().collect();
        let theirs: BTreeSet<DateTime<Utc>> = oracle.iter().copied().collect();
        let mut differing: Vec<(DateTime<Utc>, &str)> = ours
            .difference(&theirs)
            .map(|t| (*t, "engine only"))
            .chain(theirs.difference(&ours).map(|t| (*t, "oracle only")))
            .collect();
        differing.sort_unstable();
        let _ = writeln!(
            report,
            "{}\n  engine {} instants, oracle {}, {} differ{}; the first:",
            case.title(),
            engine.len(),
            oracle.len(),
            differing.len(),
            if differing.is_empty() {
                " (same set, different order or duplicates)"
            } else {
                ""
            }
        );
        for (t, side) in differing.iter().take(SHOW_INSTANTS) {
            let _ = write!(report, "    {side}: {} = {}", t.to_rfc3339(), local(*t));
            if *side == "engine only"
                && let Some(o) = schedule
                    .occurrences_after(*t - Duration::nanoseconds(1))
                    .next()
            {
                let _ = write!(report, " (wall {}, note {:?})", o.wall, o.dst_note);
            }
            report.push('\n');
        }
    }
    // Starting points around each transition: half-way through the skipped or repeated stretch
    // before it, just before it, at it, and half-way after it. From any start the engine must yield
    // exactly the oracle's next instants.
    let mut probes = 0;
    for &[at, before, after] in transitions {
        let half = (after - before).abs() / 2;
        for start in [at - half, at - 1, at, at + half] {
            if start < case.start || start >= case.end {
                continue;
            }
            probes += 1;
            let start = utc(start);
            let next = oracle.partition_point(|t| *t <= start);
            let want: Vec<DateTime<Utc>> = oracle[next..].iter().copied().take(3).collect();
            let got: Vec<DateTime<Utc>> = schedule
                .occurrences_after(start)
                .map(|o| o.at)
                .take_while(|t| *t < end)
                .take(3)
                .collect();
            if got != want && report.lines().count() < SHOW_LINES {
                let show = |ts: &[DateTime<Utc>]| {
                    ts.iter().map(|t| local(*t)).collect::<Vec<_>>().join(", ")
                };
                let _ = writeln!(
                    report,
                    "{}\n  after {} ({}): engine [{}], oracle [{}]",
                    case.title(),
                    start.to_rfc3339(),
                    local(start),
                    show(&got),
                    show(&want)
                );
            }
        }
    }
    Outcome {
        case: 0,
        instants: oracle.len(),
        probes,
        report: (!report.is_empty()).then_some(report),
    }
}

#[test]
fn the_engine_agrees_with_the_independent_dst_oracle() {
    let (header, cases) = run_oracle();
    check_coverage(&header, &cases);
    check_transitions(&header);

    let began = Instant::now();
    let next = AtomicUsize::new(0);
    let threads = std::thread::available_parallelism().map_or(2, |n| n.get().min(8));
    let mut outcomes: Vec<Outcome> = std::thread::scope(|scope| {
        let workers: Vec<_> = (0..threads)
            .map(|_| {
                scope.spawn(|| {
                    let mut mine = Vec::new();
                    loop {
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        let Some(case) = cases.get(i) else {
                            return mine;
                        };
                        mine.push(Outcome {
                            case: i,
                            ..compare(case, &header.transitions[&case.zone])
                        });
                    }
                })
            })
            .collect();
        workers
            .into_iter()
            .flat_map(|w| w.join().expect("a comparison thread panicked"))
            .collect()
    });
    outcomes.sort_by_key(|o| o.case);
    let instants: usize = outcomes.iter().map(|o| o.instants).sum();
    let probes: usize = outcomes.iter().map(|o| o.probes).sum();
    let failures: Vec<(usize, &String)> = outcomes
        .iter()
        .filter_map(|o| Some((o.case, o.report.as_ref()?)))
        .collect();
    eprintln!(
        "compared {} cases, {instants} fire instants and {probes} start probes in {:.1?}",
        cases.len(),
        began.elapsed()
    );
    if !failures.is_empty() {
        let mut text = String::new();
        for (i, _) in &failures {
            let _ = writeln!(text, "  {}", cases[*i].title());
        }
        let _ = writeln!(text, "In detail (local times in the case's zone):");
        for (_, report) in failures.iter().take(SHOW_CASES) {
            text.push_str(report);
        }
        panic!(
            "the engine disagrees with the DST oracle in {} of {} cases:\n{text}",
            failures.len(),
            cases.len()
        );
    }
}
