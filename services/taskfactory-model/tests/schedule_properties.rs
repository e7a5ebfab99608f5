//! Properties of the schedule engine over random POSIX cron expressions, tricky zones, both DST
//! policies and start instants from 1970 to 2100, through the public API only.

use std::collections::BTreeSet;
use std::panic::{self, AssertUnwindSafe};

use chrono::{DateTime, Duration, NaiveDate, TimeZone, Utc};
use proptest::prelude::*;
use taskfactory_model::schedule::{CronExpr, GapPolicy, RepeatPolicy, Schedule};

const ZONES: [&str; 22] = [
    "America/New_York",
    "Europe/London",
    "Europe/Dublin",
    "Australia/Lord_Howe",
    "America/Santiago",
    "Asia/Kathmandu",
    "Pacific/Apia",
    "UTC",
    "Pacific/Chatham",
    "America/St_Johns",
    "America/Havana",
    "Africa/Casablanca",
    "Antarctica/Troll",
    "Asia/Tehran",
    "Pacific/Kiritimati",
    "Pacific/Pago_Pago",
    "America/Sao_Paulo",
    "Europe/Moscow",
    "Australia/Adelaide",
    "Asia/Kolkata",
    "America/Nuuk",
    "Pacific/Norfolk",
];

const MONTHS: [&str; 12] = [
    "JAN", "FEB", "MAR", "APR", "MAY", "JUN", "JUL", "AUG", "SEP", "OCT", "NOV", "DEC",
];
const DAYS: [&str; 7] = ["SUN", "Mon", "tue", "WED", "thu", "Fri", "sat"];

/// The shape of one cron field: its values, and the names that may stand for them.
#[derive(Clone, Copy)]
struct Field {
    lo: u32,
    hi: u32,
    names: &'static [&'static str],
    /// The value of `names[0]`.
    names_from: u32,
    /// Whether a range may mix a number and a name (the engine parses day-of-week itself).
    mixed_ranges: bool,
}

const SECOND: Field = Field {
    lo: 0,
    hi: 59,
    names: &[],
    names_from: 0,
    mixed_ranges: false,
};
const MINUTE: Field = SECOND;
const HOUR: Field = Field { hi: 23, ..SECOND };
const DAY_OF_MONTH: Field = Field {
    lo: 1,
    hi: 31,
    ..SECOND
};
const MONTH: Field = Field {
    lo: 1,
    hi: 12,
    names: &MONTHS,
    names_from: 1,
    mixed_ranges: false,
};
const DAY_OF_WEEK: Field = Field {
    lo: 0,
    hi: 7, // 0 and 7 are Sunday
    names: &DAYS,
    names_from: 0,
    mixed_ranges: true,
};

impl Field {
    fn name_of(self, value: u32) -> Option<&'static str> {
        value
            .checked_sub(self.names_from)
            .and_then(|i| self.names.get(i as usize))
            .copied()
    }

    fn render(self, value: u32, as_name: bool) -> String {
        match self.name_of(value) {
            Some(name) if as_name => name.to_owned(),
            _ => value.to_string(),
        }
    }

    /// One list item: a value, a range, a stepped range, or a value with a step (to the end).
    fn item(self) -> impl Strategy<Value = String> {
        let span = self.hi - self.lo;
        let value = self.lo..=self.hi;
        prop_oneof![
            3 => (value.clone(), any::<bool>()).prop_map(move |(v, n)| self.render(v, n)),
            3 => (value.clone(), value.clone(), any::<bool>(), any::<bool>(), proptest::option::of(1..=span.max(1)))
                .prop_map(move |(a, b, name_a, name_b, step)| {
                    let (a, b) = (a.min(b), a.max(b));
                    // The cron crate takes name-name or number-number ranges, not a mix.
                    let both_names = self.name_of(a).is_some() && self.name_of(b).is_some();
                    let (name_a, name_b) = if self.mixed_ranges {
                        (name_a, name_b)
                    } else {
                        (name_a && both_names, name_a && both_names)
                    };
                    let range = format!("{}-{}", self.render(a, name_a), self.render(b, name_b));
                    match step {
                        Some(s) => format!("{range}/{s}"),
                        None => range,
                    }
                }),
            1 => (value, 1..=span.max(1)).prop_map(|(v, s)| format!("{v}/{s}")),
        ]
    }

    /// A whole field: `*`, `*/n`, or a list of one to three items.
    fn strategy(self) -> BoxedStrategy<String> {
        let span = self.hi - self.lo;
        prop_oneof![
            2 => Just("*".to_owned()),
            1 => (1..=span.max(1)).prop_map(|s| format!("*/{s}")),
            4 => proptest::collection::vec(self.item(), 1..=3).prop_map(|items| items.join(",")),
        ]
        .boxed()
    }
}

/// A valid POSIX cron expression: 5 fields, 6 with seconds first, or a macro.
fn cron_expr() -> impl Strategy<Value = String> {
    let five = (
        MINUTE.strategy(),
        HOUR.strategy(),
        DAY_OF_MONTH.strategy(),
        MONTH.strategy(),
        DAY_OF_WEEK.strategy(),
    )
        .prop_map(|(mi, h, dom, mo, dow)| format!("{mi} {h} {dom} {mo} {dow}"));
    prop_oneof![
        6 => five.clone(),
        2 => (SECOND.strategy(), five).prop_map(|(s, rest)| format!("{s} {rest}")),
        1 => prop::sample::select(vec![
            "@yearly", "@annually", "@monthly", "@weekly", "@daily", "@midnight", "@hourly", "@DAILY",
        ])
        .prop_map(str::to_owned),
    ]
}

/// Mostly any expression; sometimes one that fires daily in the small hours, where most DST
/// transitions are, at an arbitrary minute.
fn expr() -> impl Strategy<Value = String> {
    prop_oneof![
        3 => cron_expr(),
        1 => (0u32..60, prop::sample::select(vec!["0", "1", "2", "3", "23", "0-3", "1,2"]))
            .prop_map(|(m, h)| format!("{m} {h} * * *")),
    ]
}

fn policies() -> impl Strategy<Value = (GapPolicy, RepeatPolicy)> {
    (
        prop::sample::select(vec![GapPolicy::ShiftForward, GapPolicy::Skip]),
        prop::sample::select(vec![
            RepeatPolicy::First,
            RepeatPolicy::Last,
            RepeatPolicy::Both,
        ]),
    )
}

/// 1970-01-01 .. 2100-01-01: uniform (with a fraction of a second), or a whole second in the months
/// most DST transitions happen in (so that 200 occurrences of a daily schedule meet one).
fn start_instant() -> impl Strategy<Value = DateTime<Utc>> {
    prop_oneof![
        (0i64..4_102_444_800, 0u32..1_000_000_000)
            .prop_map(|(s, ns)| DateTime::from_timestamp(s, ns).expect("in range")),
        (
            1970i32..2100,
            prop::sample::select(vec![3u32, 4, 9, 10, 11]),
            1u32..=28,
            0i64..86_400,
        )
            .prop_map(|(y, m, d, s)| {
                Utc.with_ymd_and_hms(y, m, d, 0, 0, 0).unwrap() + Duration::seconds(s)
            }),
    ]
}

fn config(cases: u32) -> ProptestConfig {
    ProptestConfig {
        // No regression files next to the tests: a failure prints its minimal input.
        failure_persistence: None,
        ..ProptestConfig::with_cases(cases)
    }
}

fn schedule(exprs: &[String], zone: &str, (gap, repeat): (GapPolicy, RepeatPolicy)) -> Schedule {
    Schedule::new(exprs, zone, gap, repeat)
        .unwrap_or_else(|e| panic!("valid POSIX cron {exprs:?} in {zone} was rejected: {e:?}"))
}

proptest! {
    #![proptest_config(config(192))]

    /// (a) Fire times strictly increase, and all come after the start.
    #[test]
    fn fire_times_strictly_increase(
        exprs in proptest::collection::vec(expr(), 1..=3),
        zone in prop::sample::select(ZONES.to_vec()),
        policies in policies(),
        start in start_instant(),
    ) {
        let schedule = schedule(&exprs, zone, policies);
        let mut last = start;
        for occurrence in schedule.occurrences_after(start).take(200) {
            prop_assert!(
                occurrence.at > last,
                "{exprs:?} in {zone}: {} does not come after {}", occurrence.at, last
            );
            last = occurrence.at;
        }
    }

    /// (b) Each occurrence matches one of the expressions on its wall time, is not on an excluded
    /// date, and unless a DST rule moved it, its instant reads exactly that wall time in the zone.
    #[test]
    fn occurrences_match_the_spec(
        exprs in proptest::collection::vec(expr(), 1..=3),
        zone in prop::sample::select(ZONES.to_vec()),
        policies in policies(),
        start in start_instant(),
        excluded_days in proptest::collection::vec(0i64..60, 0..4),
    ) {
        let parsed: Vec<CronExpr> = exprs
            .iter()
            .map(|e| CronExpr::parse(e).expect("generated expressions are valid"))
            .collect();
        let today = start.date_naive();
        let exclude: BTreeSet<NaiveDate> =
            excluded_days.iter().map(|d| today + Duration::days(*d)).collect();
        let schedule = schedule(&exprs, zone, policies).with_exclude_dates(exclude.clone());
        let tz = schedule.timezone();
        for occurrence in schedule.occurrences_after(start).take(200) {
            prop_assert!(
                parsed.iter().any(|e| e.matches_wall(occurrence.wall)),
                "{exprs:?} in {zone}: wall {} of {} matches no expression", occurrence.wall, occurrence.at
            );
            prop_assert!(
                !occurrence.excluded && !exclude.contains(&occurrence.wall.date()),
                "{exprs:?} in {zone}: {} fired on an excluded date", occurrence.wall
            );
            let reading = occurrence.at.with_timezone(&tz).naive_local();
            if occurrence.dst_note.is_none() {
                prop_assert_eq!(
                    reading, occurrence.wall,
                    "{:?} in {}: {} reads {} but no DST note explains it", exprs, zone, occurrence.at, reading
                );
            } else {
                // Shifted forward out of a gap, or one pass of a repeat: never earlier.
                prop_assert!(reading >= occurrence.wall, "{exprs:?} in {zone}: {occurrence:?} reads {reading}");
            }
        }
    }


    /// Asking for the excluded occurrences too adds only occurrences marked `excluded` on the
    /// excluded dates; the others are exactly what fires.
    #[test]
    fn including_excluded_only_adds_marked_occurrences(
        exprs in proptest::collection::vec(expr(), 1..=2),
        zone in prop::sample::select(ZONES.to_vec()),
        policies in policies(),
        start in start_instant(),
        excluded_days in proptest::collection::vec(0i64..30, 1..4),
    ) {
        let today = start.date_naive();
        let exclude: BTreeSet<NaiveDate> =
            excluded_days.iter().map(|d| today + Duration::days(*d)).collect();
        let schedule = schedule(&exprs, zone, policies).with_exclude_dates(exclude.clone());
        let all: Vec<_> = schedule.occurrences_after(start).including_excluded().take(150).collect();
        for occurrence in &all {
            prop_assert_eq!(occurrence.excluded, exclude.contains(&occurrence.wall.date()));
        }
        let kept: Vec<_> = all.iter().filter(|o| !o.excluded).cloned().collect();
        let fired: Vec<_> = schedule.occurrences_after(start).take(kept.len()).collect();
        prop_assert_eq!(kept, fired, "{:?} in {}", exprs, zone);
    }
}

proptest! {
    #![proptest_config(config(384))]

    /// Cron has one-second resolution: every fire time is a whole second, also when a DST gap
    /// shifts it forward (to the transition instant itself).
    #[test]
    fn fire_times_are_whole_seconds(
        exprs in proptest::collection::vec(expr(), 1..=2),
        zone in prop::sample::select(ZONES.to_vec()),
        policies in policies(),
        start in start_instant(),
    ) {
        let schedule = schedule(&exprs, zone, policies);
        for occurrence in schedule.occurrences_after(start).take(200) {
            prop_assert_eq!(
                occurrence.at.timestamp_subsec_nanos(), 0,
                "{:?} in {}: fires at {} (wall {}, {:?})", exprs, zone, occurrence.at, occurrence.wall, occurrence.dst_note
            );
        }
    }
}

/// Arbitrary text, and text made of cron's own characters with huge numbers and odd field counts.
fn junk() -> impl Strategy<Value = String> {
    prop_oneof![
        any::<String>(),
        "[0-9*,/ \\t?LW#A-Za-z@-]{0,40}",
        proptest::collection::vec(
            prop_oneof![
                "[0-9]{1,30}",
                "-?[0-9]{1,12}-[0-9]{1,12}(/[0-9]{0,12})?",
                "\\*/[0-9]{1,25}",
                "[A-Za-z]{1,12}",
                Just(String::new()),
                Just("*".to_owned()),
                any::<String>(),
            ],
            0..12
        )
        .prop_map(|fields| fields.join(" ")),
    ]
}

proptest! {
    #![proptest_config(config(512))]

    /// (c) Parsing anything returns Ok or Err; it never panics.
    #[test]
    fn parsing_arbitrary_input_never_panics(input in junk()) {
        let _ = CronExpr::parse(&input);
    }

    #[test]
    fn building_a_schedule_from_arbitrary_input_never_panics(
        exprs in proptest::collection::vec(junk(), 0..3),
        zone in prop_oneof![any::<String>(), prop::sample::select(ZONES.to_vec()).prop_map(str::to_owned)],
        policies in policies(),
    ) {
        if let Ok(schedule) = Schedule::new(&exprs, &zone, policies.0, policies.1) {
            let _ = schedule.occurrences_after(Utc::now()).take(3).count();
        }
    }
}

/// Instants at the edges: chrono's limits, the years 1 and 9999, the cron crate's 1970 and 2100.
fn extreme_instants() -> Vec<DateTime<Utc>> {
    let ymd = |y, m, d, h, mi, s| Utc.with_ymd_and_hms(y, m, d, h, mi, s).unwrap();
    vec![
        DateTime::<Utc>::MIN_UTC,
        DateTime::<Utc>::MIN_UTC + Duration::days(1),
        ymd(1, 1, 1, 0, 0, 0),
        ymd(1969, 12, 31, 23, 59, 59),
        DateTime::UNIX_EPOCH,
        ymd(2100, 12, 31, 23, 59, 59),
        ymd(2101, 1, 1, 0, 0, 0),
        ymd(9999, 12, 31, 23, 59, 59),
        DateTime::<Utc>::MAX_UTC - Duration::days(1),
        DateTime::<Utc>::MAX_UTC,
    ]
}

proptest! {
    #![proptest_config(config(48))]

    /// (c) Iterating a valid schedule from extreme instants never panics.
    #[test]
    fn iterating_from_extreme_instants_never_panics(
        exprs in proptest::collection::vec(expr(), 1..=2),
        zone in prop::sample::select(ZONES.to_vec()),
        policies in policies(),
        nudge in 1i64..200_000,
    ) {
        let schedule = schedule(&exprs, zone, policies);
        let mut panicked = Vec::new();
        for edge in extreme_instants() {
            let nudged = [
                edge.checked_sub_signed(Duration::seconds(nudge)),
                Some(edge),
                edge.checked_add_signed(Duration::seconds(nudge)),
            ];
            for start in nudged.into_iter().flatten() {
                let outcome = panic::catch_unwind(AssertUnwindSafe(|| {
                    let mut last = start;
                    for occurrence in schedule.occurrences_after(start).take(20) {
                        assert!(occurrence.at > last, "{} does not come after {last}", occurrence.at);
                        last = occurrence.at;
                    }
                    schedule.next_after(start)
                }));
                if outcome.is_err() {
                    panicked.push(start);
                }
            }
        }
        prop_assert!(panicked.is_empty(), "{exprs:?} in {zone}: iterating panics from {panicked:?}");
    }
}
