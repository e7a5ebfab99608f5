//! The schedule engine: POSIX cron on local wall-clock time, mapped to UTC instants under an
//! explicit daylight-saving policy.
//!
//! The `cron` crate parses fields; everything else is ours, because its own iteration gets DST
//! wrong (see `shared/STACK.md`). The method:
//!
//! 1. Translate POSIX input for the `cron` crate: 5 fields get a `0` seconds field; day-of-week
//!    numbers (0 and 7 = Sunday) become names; when both day-of-month and day-of-week are restricted
//!    (neither starts with `*`) the expression becomes the union of two (POSIX OR semantics).
//! 2. Iterate matches on the *wall clock*: a naive local time treated as UTC iterates cleanly, with
//!    no DST in sight.
//! 3. Map each wall time to instants with the zone's rules: a time that exists once maps to one
//!    instant; one in a gap (spring forward) shifts to the first instant after the gap
//!    (`SHIFT_FORWARD`) or is skipped (`SKIP`); one that happens twice (fall back) maps to the
//!    `FIRST`, the `LAST` or `BOTH` instants. Expressions whose hour field is a wildcard fire at every
//!    real instant that matches: repeated hours fire twice, skipped hours not at all.
//! 4. Emit instants strictly increasing: only `BOTH` can put a later wall time before an earlier
//!    one's second instant, so those wait in a small heap until nothing earlier can come.

use std::cmp::Reverse;
use std::collections::{BTreeSet, BinaryHeap};
use std::str::FromStr;

use chrono::{DateTime, Duration, LocalResult, NaiveDate, NaiveDateTime, Offset, TimeZone, Utc};
use chrono_tz::Tz;
use cron::TimeUnitSpec;

/// Where a wall time that does not exist (spring forward) goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum GapPolicy {
    /// Fire once at the first instant after the gap, as cron(8) does.
    #[default]
    ShiftForward,
    Skip,
}

/// Which instant a wall time that happens twice (fall back) fires at.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum RepeatPolicy {
    #[default]
    First,
    Last,
    Both,
}

/// Why a cron expression or a schedule is not valid. The message names the part that is wrong.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct ScheduleError {
    pub message: String,
}

impl ScheduleError {
    fn new(message: impl Into<String>) -> Self {
        Self {
            message: message.into(),
        }
    }
}

/// One parsed cron expression (possibly the union of two `cron` schedules, for POSIX OR).
#[derive(Clone, Debug)]
pub struct CronExpr {
    source: String,
    parts: Vec<CronPart>,
}

#[derive(Clone, Debug)]
struct CronPart {
    /// Shared by every schedule with the same expression ([`parsed_cron`]).
    schedule: std::sync::Arc<cron::Schedule>,
    wildcard_hour: bool,
}

/// A parsed cron expression, shared with every other schedule that uses the same one: a parsed
/// expression holds a set per field (a few KiB), and a trigger holds every live schedule's, so
/// 100,000 schedules on a few distinct expressions (the usual case) take the memory of a few.
/// Entries whose last user is gone are swept out as the table grows.
fn parsed_cron(source: &str) -> Result<std::sync::Arc<cron::Schedule>, cron::error::Error> {
    use std::sync::{Arc, PoisonError, Weak};
    let table = cron_table();
    if let Some(shared) = table
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .parsed
        .get(source)
        .and_then(Weak::upgrade)
    {
        return Ok(shared);
    }
    // Parsed outside the lock.
    let parsed = Arc::new(cron::Schedule::from_str(source)?);
    let mut table = table.lock().unwrap_or_else(PoisonError::into_inner);
    if let Some(shared) = table.parsed.get(source).and_then(Weak::upgrade) {
        return Ok(shared);
    }
    table
        .parsed
        .insert(source.to_owned(), Arc::downgrade(&parsed));
    if table.parsed.len() >= (2 * table.swept_at).max(1024) {
        table.parsed.retain(|_, weak| weak.strong_count() > 0);
        table.swept_at = table.parsed.len();
    }
    Ok(parsed)
}

/// The parsed expressions in use, by source ([`parsed_cron`]).
struct CronTable {
    parsed: std::collections::HashMap<String, std::sync::Weak<cron::Schedule>>,
    /// The table's size after its last sweep: the next comes when it has doubled.
    swept_at: usize,
}

fn cron_table() -> &'static std::sync::Mutex<CronTable> {
    static TABLE: std::sync::OnceLock<std::sync::Mutex<CronTable>> = std::sync::OnceLock::new();
    TABLE.get_or_init(|| {
        std::sync::Mutex::new(CronTable {
            parsed: std::collections::HashMap::new(),
            swept_at: 0,
        })
    })
}

const FIELD_NAMES_6: [&str; 6] = [
    "second",
    "minute",
    "hour",
    "day-of-month",
    "month",
    "day-of-week",
];

impl CronExpr {
    /// Parses POSIX cron: 5 fields (`min hour dom month dow`), 6 with seconds first, or one of
    /// `@yearly` `@annually` `@monthly` `@weekly` `@daily` `@midnight` `@hourly`.
    pub fn parse(input: &str) -> Result<Self, ScheduleError> {
        let trimmed = input.trim();
        let expanded = match trimmed.to_ascii_lowercase().as_str() {
            "@yearly" | "@annually" => "0 0 1 1 *",
            "@monthly" => "0 0 1 * *",
            "@weekly" => "0 0 * * 0",
            "@daily" | "@midnight" => "0 0 * * *",
            "@hourly" => "0 * * * *",
            other if other.starts_with('@') => {
                return Err(ScheduleError::new(format!(
                    "{trimmed:?} is not a known macro (use @yearly, @annually, @monthly, @weekly, @daily, @midnight or @hourly)"
                )));
            }
            _ => trimmed,
        };
        let fields: Vec<&str> = expanded.split_whitespace().collect();
        let fields: [&str; 6] = match fields.len() {
            5 => ["0", fields[0], fields[1], fields[2], fields[3], fields[4]],
            6 => [
                fields[0], fields[1], fields[2], fields[3], fields[4], fields[5],
            ],
            n => {
                return Err(ScheduleError::new(format!(
                    "{trimmed:?} has {n} fields; expected 5 (minute hour day-of-month month day-of-week) or 6 (second first)"
                )));
            }
        };
        for (field, name) in fields.iter().zip(FIELD_NAMES_6) {
            if let Some(bad) = field
                .chars()
                .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '*' | ',' | '-' | '/')))
            {
                return Err(ScheduleError::new(format!(
                    "{name} field {field:?} contains {bad:?}; POSIX cron allows numbers, names, '*', ',', '-' and '/'"
                )));
            }
        }
        // Check each field alone, so the error names the field.
        for (i, name) in FIELD_NAMES_6.iter().enumerate().take(5) {
            let mut probe = ["*"; 6];
            probe[i] = fields[i];
            if let Err(e) = cron::Schedule::from_str(&probe.join(" ")) {
                return Err(ScheduleError::new(format!(
                    "{name} field {:?} is not valid: {}",
                    fields[i],
                    cron_error_text(&e)
                )));
            }
        }
        let days_of_week = parse_day_of_week(fields[5])?;
        let dow_names = day_of_week_names(days_of_week);
        let dom_restricted = !fields[3].starts_with('*');
        let dow_restricted = !fields[5].starts_with('*');
        let [sec, min, hour, dom, month, _] = fields;
        let sources = if dom_restricted && dow_restricted {
            vec![
                format!("{sec} {min} {hour} {dom} {month} *"),
                format!("{sec} {min} {hour} * {month} {dow_names}"),
            ]
        } else {
            vec![format!("{sec} {min} {hour} {dom} {month} {dow_names}")]
        };
        let mut parts = Vec::with_capacity(sources.len());
        for source in sources {
            let schedule = parsed_cron(&source).map_err(|e| {
                ScheduleError::new(format!("{trimmed:?} is not valid: {}", cron_error_text(&e)))
            })?;
            let wildcard_hour = schedule.hours().is_all();
            parts.push(CronPart {
                schedule,
                wildcard_hour,
            });
        }
        Ok(Self {
            source: trimmed.to_owned(),
            parts,
        })
    }

    pub fn source(&self) -> &str {
        &self.source
    }

    /// Whether the wall time matches this expression.
    pub fn matches_wall(&self, wall: NaiveDateTime) -> bool {
        let as_utc = Utc.from_utc_datetime(&wall);
        self.parts.iter().any(|p| p.schedule.includes(as_utc))
    }
}

fn cron_error_text(e: &cron::error::Error) -> String {
    let text = e.to_string();
    text.strip_prefix("Invalid expression: ")
        .unwrap_or(&text)
        .to_owned()
}

/// POSIX day of week: numbers 0–7 (0 and 7 are Sunday), names, ranges, lists and steps.
/// Returns a bit set, bit 0 = Sunday.
fn parse_day_of_week(field: &str) -> Result<u8, ScheduleError> {
    let bad = |why: String| {
        ScheduleError::new(format!("day-of-week field {field:?} is not valid: {why}"))
    };
    let mut set = 0u8;
    for item in field.split(',') {
        let (range, step) = match item.split_once('/') {
            Some((range, step)) => {
                let step: u32 = step
                    .parse()
                    .map_err(|_| bad(format!("step {step:?} is not a number")))?;
                if step == 0 {
                    return Err(bad("a step must be at least 1".to_owned()));
                }
                (range, step)
            }
            None => (item, 1),
        };
        let (start, end) = if range == "*" {
            (0, 6)
        } else if let Some((a, b)) = range.split_once('-') {
            let (a, b) = (day_number(a).map_err(&bad)?, day_number(b).map_err(&bad)?);
            if a > b {
                return Err(bad(format!(
                    "range {range:?} runs backwards; write it as two ranges"
                )));
            }
            (a, b)
        } else {
            let day = day_number(range).map_err(&bad)?;
            if item.contains('/') {
                (day, 7)
            } else {
                (day, day)
            }
        };
        let mut day = start;
        while day <= end {
            set |= 1 << (day % 7);
            day += step;
        }
    }
    Ok(set)
}

fn day_number(token: &str) -> Result<u32, String> {
    if let Ok(n) = token.parse::<u32>() {
        return if n <= 7 {
            Ok(n)
        } else {
            Err(format!(
                "{n} is not a day of week (0–7, 0 and 7 are Sunday)"
            ))
        };
    }
    const NAMES: [&str; 7] = ["sun", "mon", "tue", "wed", "thu", "fri", "sat"];
    let lower = token.to_ascii_lowercase();
    NAMES
        .iter()
        .position(|n| lower.len() >= 3 && (lower == *n || n_full(n) == lower))
        .map(|p| p as u32)
        .ok_or_else(|| format!("{token:?} is not a day of week (SUN–SAT or 0–7)"))
}

fn n_full(short: &str) -> &'static str {
    match short {
        "sun" => "sunday",
        "mon" => "monday",
        "tue" => "tuesday",
        "wed" => "wednesday",
        "thu" => "thursday",
        "fri" => "friday",
        _ => "saturday",
    }
}

fn day_of_week_names(set: u8) -> String {
    const NAMES: [&str; 7] = ["SUN", "MON", "TUE", "WED", "THU", "FRI", "SAT"];
    if set == 0x7f {
        return "*".to_owned();
    }
    let names: Vec<&str> = (0..7)
        .filter(|d| set & (1 << d) != 0)
        .map(|d| NAMES[d])
        .collect();
    names.join(",")
}

/// A complete schedule: one or more expressions (their union), a zone, a DST policy and bounds.
#[derive(Clone, Debug)]
pub struct Schedule {
    exprs: Vec<CronExpr>,
    tz: Tz,
    gap: GapPolicy,
    repeat: RepeatPolicy,
    start_at: Option<DateTime<Utc>>,
    end_at: Option<DateTime<Utc>>,
    exclude_dates: BTreeSet<NaiveDate>,
}

/// One computed fire time.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Occurrence {
    /// The UTC instant it fires at (`scheduled_for`).
    pub at: DateTime<Utc>,
    /// The wall-clock time in the schedule's zone that matched the expression.
    pub wall: NaiveDateTime,
    /// Set when a DST rule moved, doubled or chose this fire.
    pub dst_note: Option<String>,
    /// Its wall date is in `excludeDates`: it does not fire. Only iterators made with
    /// [`Occurrences::including_excluded`] yield these.
    pub excluded: bool,
}

impl Occurrence {
    /// The local time of the instant, with its zone abbreviation, e.g. `2026-03-08 03:00:00 EDT`.
    pub fn local_time(&self, tz: Tz) -> String {
        self.at
            .with_timezone(&tz)
            .format("%Y-%m-%d %H:%M:%S %Z")
            .to_string()
    }
}

impl Schedule {
    /// Parses every expression and the zone; errors name the expression (by index) and the zone.
    pub fn new(
        exprs: &[String],
        timezone: &str,
        gap: GapPolicy,
        repeat: RepeatPolicy,
    ) -> Result<Self, Vec<(String, ScheduleError)>> {
        let mut errors = Vec::new();
        if exprs.is_empty() {
            errors.push((
                "cron".to_owned(),
                ScheduleError::new("at least one cron expression is required"),
            ));
        }
        let mut parsed = Vec::new();
        for (i, e) in exprs.iter().enumerate() {
            match CronExpr::parse(e) {
                Ok(p) => parsed.push(p),
                Err(err) => errors.push((format!("cron[{i}]"), err)),
            }
        }
        let tz = match parse_timezone(timezone) {
            Ok(tz) => Some(tz),
            Err(err) => {
                errors.push(("timezone".to_owned(), err));
                None
            }
        };
        if !errors.is_empty() {
            return Err(errors);
        }
        Ok(Self {
            exprs: parsed,
            tz: tz.expect("no errors means the zone parsed"),
            gap,
            repeat,
            start_at: None,
            end_at: None,
            exclude_dates: BTreeSet::new(),
        })
    }

    pub fn with_bounds(
        mut self,
        start_at: Option<DateTime<Utc>>,
        end_at: Option<DateTime<Utc>>,
    ) -> Self {
        self.start_at = start_at;
        self.end_at = end_at;
        self
    }

    pub fn with_exclude_dates(mut self, dates: impl IntoIterator<Item = NaiveDate>) -> Self {
        self.exclude_dates = dates.into_iter().collect();
        self
    }

    pub fn timezone(&self) -> Tz {
        self.tz
    }

    /// Fire times strictly after `after`, in increasing order.
    pub fn occurrences_after(&self, after: DateTime<Utc>) -> Occurrences<'_> {
        let after = match self.start_at {
            Some(start) if start > after => start - Duration::nanoseconds(1),
            _ => after,
        };
        // Local readings must stay inside chrono's range: schedules live within years 2..9998.
        let (earliest, latest) = time_limits();
        let exhausted = after >= latest;
        let after = after.clamp(earliest, latest);
        // Instants after `after` can carry wall readings earlier than its own when the offset falls
        // soon after it; start the wall-clock walk early enough to see them.
        let swing = offset_swing_near(self.tz, after);
        let local = after.with_timezone(&self.tz).naive_local();
        let wall_start = local - swing - Duration::seconds(1);
        let streams = self
            .exprs
            .iter()
            .flat_map(|e| e.parts.iter())
            .map(|part| WallStream {
                iter: Box::new(
                    part.schedule
                        .after_owned(Utc.from_utc_datetime(&wall_start))
                        .map(|d| d.naive_utc()),
                ),
                peeked: None,
                wildcard_hour: part.wildcard_hour,
            })
            .collect();
        Occurrences {
            schedule: self,
            after,
            streams,
            pending: BinaryHeap::new(),
            frontier: None,
            exhausted,
            last_emitted: None,
            include_excluded: false,
        }
    }

    /// The next fire time strictly after `after`, if the schedule has one.
    pub fn next_after(&self, after: DateTime<Utc>) -> Option<Occurrence> {
        self.occurrences_after(after).next()
    }

    /// Maps one matching wall time to its instants under the DST policy.
    fn instants_for(&self, wall: NaiveDateTime, wildcard_hour: bool) -> Vec<Occurrence> {
        match self.tz.from_local_datetime(&wall) {
            LocalResult::Single(t) => vec![Occurrence {
                at: t.with_timezone(&Utc),
                wall,
                dst_note: None,
                excluded: false,
            }],
            LocalResult::Ambiguous(first, second) => {
                let first_abbr = first.format("%Z").to_string();
                let second_abbr = second.format("%Z").to_string();
                let make = |t: DateTime<Tz>, note: String| Occurrence {
                    at: t.with_timezone(&Utc),
                    wall,
                    dst_note: Some(note),
                    excluded: false,
                };
                let repeated = format!("{wall} happens twice in {} (DST fall-back)", self.tz);
                if wildcard_hour {
                    return vec![
                        make(
                            first,
                            format!(
                                "{repeated}; wildcard hour fires at both, this is the first ({first_abbr})"
                            ),
                        ),
                        make(
                            second,
                            format!(
                                "{repeated}; wildcard hour fires at both, this is the second ({second_abbr})"
                            ),
                        ),
                    ];
                }
                match self.repeat {
                    RepeatPolicy::First => vec![make(
                        first,
                        format!("{repeated}; repeat policy FIRST fired the first ({first_abbr})"),
                    )],
                    RepeatPolicy::Last => vec![make(
                        second,
                        format!("{repeated}; repeat policy LAST fired the second ({second_abbr})"),
                    )],
                    RepeatPolicy::Both => vec![
                        make(
                            first,
                            format!(
                                "{repeated}; repeat policy BOTH, this is the first ({first_abbr})"
                            ),
                        ),
                        make(
                            second,
                            format!(
                                "{repeated}; repeat policy BOTH, this is the second ({second_abbr})"
                            ),
                        ),
                    ],
                }
            }
            LocalResult::None => {
                if wildcard_hour || self.gap == GapPolicy::Skip {
                    return Vec::new();
                }
                let Some(after_gap) = first_instant_after_gap(self.tz, wall) else {
                    return Vec::new();
                };
                let local = after_gap.with_timezone(&self.tz);
                vec![Occurrence {
                    at: after_gap,
                    wall,
                    dst_note: Some(format!(
                        "{wall} does not exist in {} (DST gap); shifted forward to {}",
                        self.tz,
                        local.format("%H:%M:%S %Z")
                    )),
                    excluded: false,
                }]
            }
        }
    }
}

/// Parses an IANA zone name. `UTC` is allowed; an empty or unknown name is an error.
pub fn parse_timezone(name: &str) -> Result<Tz, ScheduleError> {
    if name.trim().is_empty() {
        return Err(ScheduleError::new(
            "is required: an IANA zone name such as Europe/Berlin, or UTC",
        ));
    }
    Tz::from_str(name).map_err(|_| {
        ScheduleError::new(format!(
            "{name:?} is not a known IANA time zone (for example Europe/Berlin, America/New_York, UTC)"
        ))
    })
}

/// The instants schedules iterate between: a margin inside chrono's range, so local readings and
/// the DST look-around never overflow.
fn time_limits() -> (DateTime<Utc>, DateTime<Utc>) {
    let at = |y, m, d| {
        NaiveDate::from_ymd_opt(y, m, d)
            .and_then(|d| d.and_hms_opt(0, 0, 0))
            .map(|t| Utc.from_utc_datetime(&t))
            .expect("a valid date")
    };
    (at(2, 1, 1), at(9998, 12, 31))
}

/// How far the zone's UTC offset moves within two days of `at` (zero away from transitions).
fn offset_swing_near(tz: Tz, at: DateTime<Utc>) -> Duration {
    let mut min = i32::MAX;
    let mut max = i32::MIN;
    // Checked: near chrono's limits the window shrinks instead of overflowing.
    let window = Duration::hours(49);
    let mut probe = at.checked_sub_signed(window).unwrap_or(at);
    let end = at.checked_add_signed(window).unwrap_or(at);
    loop {
        let offset = tz
            .offset_from_utc_datetime(&probe.naive_utc())
            .fix()
            .local_minus_utc();
        min = min.min(offset);
        max = max.max(offset);
        match probe.checked_add_signed(Duration::hours(1)) {
            Some(next) if next <= end => probe = next,
            _ => break,
        }
    }
    Duration::seconds(i64::from(max - min))
}

/// The first instant whose wall reading is past the gap that swallowed `wall`.
fn first_instant_after_gap(tz: Tz, wall: NaiveDateTime) -> Option<DateTime<Utc>> {
    let exists = |w: NaiveDateTime| !matches!(tz.from_local_datetime(&w), LocalResult::None);
    // Walk forward in 15-minute steps to a wall time that exists (gaps are at most a day long),
    // then bisect to the second.
    let mut missing = wall;
    let mut present = None;
    for _ in 0..=(26 * 4) {
        let probe = missing + Duration::minutes(15);
        if exists(probe) {
            present = Some(probe);
            break;
        }
        missing = probe;
    }
    let mut present = present?;
    // Whole seconds: transitions and cron times are on whole seconds, so the result is exactly
    // the transition instant.
    while present - missing > Duration::seconds(1) {
        let mid = missing + Duration::seconds((present - missing).num_seconds() / 2);
        if exists(mid) {
            present = mid;
        } else {
            missing = mid;
        }
    }
    tz.from_local_datetime(&present)
        .earliest()
        .map(|t| t.with_timezone(&Utc))
}

struct WallStream {
    iter: Box<dyn Iterator<Item = NaiveDateTime> + Send>,
    peeked: Option<NaiveDateTime>,
    wildcard_hour: bool,
}

impl WallStream {
    fn peek(&mut self) -> Option<NaiveDateTime> {
        if self.peeked.is_none() {
            self.peeked = self.iter.next();
        }
        self.peeked
    }
}

/// Iterator over fire times; see [`Schedule::occurrences_after`].
pub struct Occurrences<'a> {
    schedule: &'a Schedule,
    after: DateTime<Utc>,
    streams: Vec<WallStream>,
    /// Instants computed but not yet emitted, smallest first.
    pending: BinaryHeap<Reverse<PendingOccurrence>>,
    /// The earliest instant of the most recently pulled wall time: nothing later pulled can map
    /// before it, so pending instants up to it are final.
    frontier: Option<DateTime<Utc>>,
    exhausted: bool,
    last_emitted: Option<DateTime<Utc>>,
    include_excluded: bool,
}

#[derive(PartialEq, Eq)]
struct PendingOccurrence(Occurrence);

impl Ord for PendingOccurrence {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.0
            .at
            .cmp(&other.0.at)
            // At one instant a firing occurrence wins over an excluded one.
            .then(self.0.excluded.cmp(&other.0.excluded))
            .then(self.0.wall.cmp(&other.0.wall))
    }
}

impl PartialOrd for PendingOccurrence {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Occurrences<'_> {
    /// Also yields the occurrences that `excludeDates` suppresses, marked `excluded` (for
    /// previews and the decision ledger).
    pub fn including_excluded(mut self) -> Self {
        self.include_excluded = true;
        self
    }

    /// The next wall time from the union of all expressions, with whether any expression that
    /// matched it has a wildcard hour.
    fn next_wall(&mut self) -> Option<(NaiveDateTime, bool)> {
        let mut min: Option<NaiveDateTime> = None;
        for stream in &mut self.streams {
            if let Some(w) = stream.peek()
                && min.is_none_or(|m| w < m)
            {
                min = Some(w);
            }
        }
        let min = min?;
        let mut wildcard = false;
        for stream in &mut self.streams {
            if stream.peek() == Some(min) {
                wildcard |= stream.wildcard_hour;
                stream.peeked = None;
            }
        }
        Some((min, wildcard))
    }

    fn pull(&mut self) {
        let Some((wall, wildcard)) = self.next_wall() else {
            self.exhausted = true;
            return;
        };
        let excluded = self.schedule.exclude_dates.contains(&wall.date());
        if excluded && !self.include_excluded {
            return;
        }
        let mut instants = self.schedule.instants_for(wall, wildcard);
        for instant in &mut instants {
            instant.excluded = excluded;
        }
        // The earliest instant this wall time could have under any policy: wall times pulled
        // later never map before it, whichever expression (wildcard or not) they come from.
        let earliest = match self.schedule.tz.from_local_datetime(&wall) {
            LocalResult::Single(t) => Some(t.with_timezone(&Utc)),
            LocalResult::Ambiguous(first, _) => Some(first.with_timezone(&Utc)),
            LocalResult::None => first_instant_after_gap(self.schedule.tz, wall),
        };
        if earliest.is_some() {
            self.frontier = earliest;
        }
        for occurrence in instants {
            if occurrence.at > self.after {
                self.pending.push(Reverse(PendingOccurrence(occurrence)));
            }
        }
    }
}

impl Iterator for Occurrences<'_> {
    type Item = Occurrence;

    fn next(&mut self) -> Option<Occurrence> {
        loop {
            let ready = match self.pending.peek() {
                Some(Reverse(PendingOccurrence(head))) => {
                    self.exhausted || self.frontier.is_some_and(|f| f > head.at)
                }
                None => self.exhausted,
            };
            if !ready {
                self.pull();
                continue;
            }
            let Reverse(PendingOccurrence(occurrence)) = self.pending.pop()?;
            if let Some(end) = self.schedule.end_at
                && occurrence.at > end
            {
                self.pending.clear();
                self.exhausted = true;
                return None;
            }
            if self.last_emitted.is_some_and(|last| occurrence.at <= last) {
                continue; // a shifted-forward time that landed on one already fired
            }
            self.last_emitted = Some(occurrence.at);
            return Some(occurrence);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn utc(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
    }

    fn times(schedule: &Schedule, after: &str, n: usize) -> Vec<String> {
        schedule
            .occurrences_after(utc(after))
            .take(n)
            .map(|o| o.at.to_rfc3339())
            .collect()
    }

    fn schedule(cron: &str, tz: &str) -> Schedule {
        Schedule::new(
            &[cron.to_owned()],
            tz,
            GapPolicy::ShiftForward,
            RepeatPolicy::First,
        )
        .unwrap()
    }

    #[test]
    fn five_field_weekday_schedule_in_berlin() {
        let s = schedule("0 9 * * MON-FRI", "Europe/Berlin");
        // Friday 2026-11-27 → next is Monday 2026-11-30 09:00 CET = 08:00 UTC.
        assert_eq!(
            times(&s, "2026-11-27T09:00:00Z", 2),
            ["2026-11-30T08:00:00+00:00", "2026-12-01T08:00:00+00:00"]
        );
    }

    #[test]
    fn posix_day_numbers_zero_and_seven_are_sunday() {
        let sunday = schedule("0 12 * * 0", "UTC");
        let seven = schedule("0 12 * * 7", "UTC");
        let first = times(&sunday, "2026-11-30T00:00:00Z", 1);
        assert_eq!(first, ["2026-12-06T12:00:00+00:00"]);
        assert_eq!(times(&seven, "2026-11-30T00:00:00Z", 1), first);
        // 1 is Monday.
        assert_eq!(
            times(&schedule("0 12 * * 1", "UTC"), "2026-11-30T13:00:00Z", 1),
            ["2026-12-07T12:00:00+00:00"]
        );
    }

    #[test]
    fn day_of_month_or_day_of_week_when_both_restricted() {
        // The 1st of the month OR any Friday.
        let s = schedule("0 0 1 * FRI", "UTC");
        assert_eq!(
            times(&s, "2026-11-30T00:00:00Z", 3),
            [
                "2026-12-01T00:00:00+00:00",
                "2026-12-04T00:00:00+00:00",
                "2026-12-11T00:00:00+00:00"
            ]
        );
    }

    #[test]
    fn six_fields_fire_every_second() {
        let s = schedule("* * * * * *", "UTC");
        assert_eq!(
            times(&s, "2026-11-30T00:00:00Z", 2),
            ["2026-11-30T00:00:01+00:00", "2026-11-30T00:00:02+00:00"]
        );
    }

    #[test]
    fn spring_forward_shifts_a_daily_time_once() {
        let s = schedule("30 2 * * *", "America/New_York");
        let got: Vec<Occurrence> = s
            .occurrences_after(utc("2026-03-07T12:00:00Z"))
            .take(3)
            .collect();
        // 2026-03-08 02:30 does not exist; fire at 03:00 EDT = 07:00 UTC.
        assert_eq!(got[0].at, utc("2026-03-08T07:00:00Z"));
        assert!(
            got[0]
                .dst_note
                .as_deref()
                .unwrap()
                .contains("shifted forward")
        );
        assert_eq!(got[1].at, utc("2026-03-09T06:30:00Z"));
        assert_eq!(got[1].dst_note, None);
    }

    #[test]
    fn a_shifted_time_lands_exactly_on_the_transition_and_fires_once() {
        // 02:50 does not exist on 2026-03-08 in New York; it shifts to 03:00 EDT, which the
        // second expression also names: one fire, on the whole second (found by the DST oracle).
        let s = Schedule::new(
            &["50 2 * * *".to_owned(), "0 3 * * *".to_owned()],
            "America/New_York",
            GapPolicy::ShiftForward,
            RepeatPolicy::First,
        )
        .unwrap();
        let got: Vec<String> = s
            .occurrences_after(utc("2026-03-08T06:00:00Z"))
            .take(2)
            .map(|o| o.at.to_rfc3339())
            .collect();
        assert_eq!(
            got,
            ["2026-03-08T07:00:00+00:00", "2026-03-09T06:50:00+00:00"]
        );
    }

    #[test]
    fn iterating_near_the_ends_of_time_does_not_panic() {
        let s = schedule("0 * * * *", "Australia/Lord_Howe");
        let _ = s
            .occurrences_after(DateTime::<Utc>::MIN_UTC)
            .take(3)
            .count();
        assert_eq!(s.occurrences_after(DateTime::<Utc>::MAX_UTC).next(), None);
    }

    #[test]
    fn spring_forward_skip_policy_drops_the_day() {
        let s = Schedule::new(
            &["30 2 * * *".to_owned()],
            "America/New_York",
            GapPolicy::Skip,
            RepeatPolicy::First,
        )
        .unwrap();
        assert_eq!(
            times(&s, "2026-03-07T12:00:00Z", 1),
            ["2026-03-09T06:30:00+00:00"]
        );
    }

    #[test]
    fn fall_back_repeat_policies() {
        let make = |repeat| {
            Schedule::new(
                &["30 1 * * *".to_owned()],
                "America/New_York",
                GapPolicy::ShiftForward,
                repeat,
            )
            .unwrap()
        };
        // 2026-11-01 01:30 happens at 05:30Z (EDT) and 06:30Z (EST).
        let after = "2026-10-31T12:00:00Z";
        assert_eq!(
            times(&make(RepeatPolicy::First), after, 1),
            ["2026-11-01T05:30:00+00:00"]
        );
        assert_eq!(
            times(&make(RepeatPolicy::Last), after, 1),
            ["2026-11-01T06:30:00+00:00"]
        );
        assert_eq!(
            times(&make(RepeatPolicy::Both), after, 3),
            [
                "2026-11-01T05:30:00+00:00",
                "2026-11-01T06:30:00+00:00",
                "2026-11-02T06:30:00+00:00"
            ]
        );
    }

    #[test]
    fn wildcard_hour_fires_every_real_quarter_hour_in_order_across_fall_back() {
        let s = schedule("*/15 * * * *", "America/New_York");
        let got = times(&s, "2026-11-01T04:50:00Z", 10);
        assert_eq!(
            got,
            [
                "2026-11-01T05:00:00+00:00", // 01:00 EDT
                "2026-11-01T05:15:00+00:00",
                "2026-11-01T05:30:00+00:00",
                "2026-11-01T05:45:00+00:00",
                "2026-11-01T06:00:00+00:00", // 01:00 EST
                "2026-11-01T06:15:00+00:00",
                "2026-11-01T06:30:00+00:00",
                "2026-11-01T06:45:00+00:00",
                "2026-11-01T07:00:00+00:00", // 02:00 EST
                "2026-11-01T07:15:00+00:00",
            ]
        );
    }

    #[test]
    fn starting_inside_the_repeated_hour_still_sees_the_second_pass() {
        let s = Schedule::new(
            &["30 1 * * *".to_owned()],
            "America/New_York",
            GapPolicy::ShiftForward,
            RepeatPolicy::Both,
        )
        .unwrap();
        // 05:40Z is 01:40 EDT, after the first 01:30; the second 01:30 (06:30Z) is still ahead.
        assert_eq!(
            times(&s, "2026-11-01T05:40:00Z", 1),
            ["2026-11-01T06:30:00+00:00"]
        );
    }

    #[test]
    fn a_last_policy_expression_and_a_wildcard_hour_expression_merge_in_order() {
        let s = Schedule::new(
            &["*/30 * * * *".to_owned(), "15 1 * * *".to_owned()],
            "America/New_York",
            GapPolicy::ShiftForward,
            RepeatPolicy::Last,
        )
        .unwrap();
        assert_eq!(
            times(&s, "2026-11-01T04:50:00Z", 6),
            [
                "2026-11-01T05:00:00+00:00", // 01:00 EDT (wildcard hour: both passes)
                "2026-11-01T05:30:00+00:00", // 01:30 EDT
                "2026-11-01T06:00:00+00:00", // 01:00 EST
                "2026-11-01T06:15:00+00:00", // 01:15, LAST: the EST pass
                "2026-11-01T06:30:00+00:00", // 01:30 EST
                "2026-11-01T07:00:00+00:00", // 02:00 EST
            ]
        );
    }

    #[test]
    fn wildcard_hour_invents_nothing_in_the_spring_gap() {
        let s = schedule("0 * * * *", "America/New_York");
        // 01:00 EST (06:00Z), then 03:00 EDT (07:00Z): 02:00 does not exist.
        assert_eq!(
            times(&s, "2026-03-08T05:30:00Z", 2),
            ["2026-03-08T06:00:00+00:00", "2026-03-08T07:00:00+00:00"]
        );
    }

    #[test]
    fn invalid_expressions_name_the_field() {
        let err = CronExpr::parse("61 * * * *").unwrap_err().to_string();
        assert!(err.contains("minute field"), "{err}");
        let err = CronExpr::parse("0 9 * * MON-XYZ").unwrap_err().to_string();
        assert!(err.contains("day-of-week"), "{err}");
        let err = CronExpr::parse("0 9 * *").unwrap_err().to_string();
        assert!(err.contains("4 fields"), "{err}");
        let err = CronExpr::parse("0 9 ? * *").unwrap_err().to_string();
        assert!(err.contains("day-of-month"), "{err}");
        let err = CronExpr::parse("@reboot").unwrap_err().to_string();
        assert!(err.contains("macro"), "{err}");
    }

    #[test]
    fn unknown_timezone_is_rejected() {
        let err = Schedule::new(
            &["@daily".to_owned()],
            "Mars/Olympus",
            GapPolicy::ShiftForward,
            RepeatPolicy::First,
        )
        .unwrap_err();
        assert_eq!(err[0].0, "timezone");
        assert!(err[0].1.message.contains("Mars/Olympus"));
    }

    #[test]
    fn macros_expand() {
        let s = schedule("@hourly", "UTC");
        assert_eq!(
            times(&s, "2026-11-30T10:10:00Z", 1),
            ["2026-11-30T11:00:00+00:00"]
        );
    }

    #[test]
    fn bounds_and_exclusions() {
        let s = schedule("0 12 * * *", "UTC")
            .with_bounds(
                Some(utc("2026-12-02T00:00:00Z")),
                Some(utc("2026-12-05T12:00:00Z")),
            )
            .with_exclude_dates([NaiveDate::from_ymd_opt(2026, 12, 3).unwrap()]);
        assert_eq!(
            times(&s, "2026-11-30T00:00:00Z", 10),
            [
                "2026-12-02T12:00:00+00:00",
                "2026-12-04T12:00:00+00:00",
                "2026-12-05T12:00:00+00:00"
            ]
        );
    }

    #[test]
    fn excluded_occurrences_are_shown_marked_when_asked_for() {
        let s = schedule("0 12 * * *", "UTC")
            .with_exclude_dates([NaiveDate::from_ymd_opt(2026, 12, 3).unwrap()]);
        let all: Vec<_> = s
            .occurrences_after(utc("2026-12-01T13:00:00Z"))
            .including_excluded()
            .take(3)
            .map(|o| (o.at.to_rfc3339(), o.excluded))
            .collect();
        assert_eq!(
            all,
            [
                ("2026-12-02T12:00:00+00:00".to_owned(), false),
                ("2026-12-03T12:00:00+00:00".to_owned(), true),
                ("2026-12-04T12:00:00+00:00".to_owned(), false),
            ]
        );
    }

    #[test]
    fn at_one_instant_a_firing_occurrence_wins_over_an_excluded_one() {
        // Apia skipped 2011-12-30: its midnight shifts forward onto 2011-12-31 00:00, which is
        // also the next day's own midnight. Excluding the 30th must not hide the 31st.
        let s = schedule("0 0 * * *", "Pacific/Apia")
            .with_exclude_dates([NaiveDate::from_ymd_opt(2011, 12, 30).unwrap()]);
        let shown: Vec<_> = s
            .occurrences_after(utc("2011-12-29T12:00:00Z"))
            .including_excluded()
            .take(1)
            .collect();
        let fired: Vec<_> = s
            .occurrences_after(utc("2011-12-29T12:00:00Z"))
            .take(1)
            .collect();
        assert_eq!(shown[0].at, fired[0].at);
        assert!(!shown[0].excluded);
    }

    #[test]
    fn union_of_expressions_is_sorted_and_deduplicated() {
        let s = Schedule::new(
            &["0 9 * * *".to_owned(), "0 9,17 * * *".to_owned()],
            "UTC",
            GapPolicy::ShiftForward,
            RepeatPolicy::First,
        )
        .unwrap();
        assert_eq!(
            times(&s, "2026-11-30T00:00:00Z", 3),
            [
                "2026-11-30T09:00:00+00:00",
                "2026-11-30T17:00:00+00:00",
                "2026-12-01T09:00:00+00:00"
            ]
        );
    }
}

/// The deterministic jitter of one occurrence: a delay in `[0, jitter)` derived from the activity
/// and the occurrence, so every replica and every restart picks the same, and never reaching the
/// next occurrence.
pub fn jitter_delay(
    activity_key: &str,
    at: DateTime<Utc>,
    jitter: std::time::Duration,
    next: Option<DateTime<Utc>>,
) -> std::time::Duration {
    use sha2::Digest;
    let mut limit = jitter;
    if let Some(next) = next
        && let Ok(gap) = (next - at).to_std()
    {
        // Leave a little room so a jittered fire still happens before the next occurrence.
        limit = limit.min(gap.mul_f64(0.9));
    }
    let limit_nanos = limit.as_nanos();
    if limit_nanos == 0 {
        return std::time::Duration::ZERO;
    }
    let digest = sha2::Sha256::digest(format!("{activity_key}\0{}", at.timestamp_micros()));
    let mut bytes = [0u8; 16];
    bytes.copy_from_slice(&digest[..16]);
    let nanos = u128::from_le_bytes(bytes) % limit_nanos;
    std::time::Duration::from_nanos(u64::try_from(nanos).unwrap_or(u64::MAX))
}

#[cfg(test)]
mod shared_parse_tests {
    use super::*;

    #[test]
    fn expressions_written_alike_share_one_parse_and_others_do_not() {
        let a = CronExpr::parse("7 */5 * * * *").expect("valid");
        let b = CronExpr::parse("  7 */5 * * * * ").expect("valid");
        let c = CronExpr::parse("8 */5 * * * *").expect("valid");
        assert!(std::sync::Arc::ptr_eq(
            &a.parts[0].schedule,
            &b.parts[0].schedule
        ));
        assert!(!std::sync::Arc::ptr_eq(
            &a.parts[0].schedule,
            &c.parts[0].schedule
        ));
        // Shared, the parse still answers for each.
        let at = Utc.with_ymd_and_hms(2026, 1, 1, 0, 5, 7).unwrap();
        assert!(a.matches_wall(at.naive_utc()) && b.matches_wall(at.naive_utc()));
        assert!(!c.matches_wall(at.naive_utc()));
    }

    #[test]
    fn a_parse_nobody_uses_any_more_is_swept_out() {
        for i in 0..3000 {
            let expr = CronExpr::parse(&format!("{} {} 1 * * *", i % 60, i / 60)).expect("valid");
            drop(expr);
        }
        let size = cron_table()
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .parsed
            .len();
        // Swept when it reached 1,024 and 2,048 (other tests parse meanwhile, so not exact).
        assert!(size < 2500, "{size} parses kept for 3,000 no longer used");
        let kept = CronExpr::parse("1 2 3 * * *").expect("valid");
        let again = CronExpr::parse("1 2 3 * * *").expect("valid");
        assert!(std::sync::Arc::ptr_eq(
            &kept.parts[0].schedule,
            &again.parts[0].schedule
        ));
    }
}

#[cfg(test)]
mod jitter_tests {
    use super::*;

    #[test]
    fn jitter_is_deterministic_bounded_and_before_the_next_fire() {
        let at = DateTime::parse_from_rfc3339("2026-11-30T09:00:00Z")
            .unwrap()
            .with_timezone(&Utc);
        let jitter = std::time::Duration::from_secs(30);
        let a = jitter_delay("x", at, jitter, None);
        assert_eq!(a, jitter_delay("x", at, jitter, None));
        assert!(a < jitter);
        assert_ne!(a, jitter_delay("y", at, jitter, None));
        let next = at + Duration::seconds(10);
        for key in ["a", "b", "c", "d", "e", "f"] {
            assert!(jitter_delay(key, at, jitter, Some(next)) < std::time::Duration::from_secs(9));
        }
        assert_eq!(
            jitter_delay("x", at, std::time::Duration::ZERO, None),
            std::time::Duration::ZERO
        );
    }
}

#[cfg(test)]
mod properties {
    use super::*;
    use proptest::prelude::*;

    const EXPRS: [&str; 10] = [
        "*/15 * * * *",
        "30 1 * * *",
        "30 2 * * *",
        "0 * * * *",
        "15,45 0-3 * * *",
        "0 9 * * MON-FRI",
        "0 0 1 * FRI",
        "*/20 * * * * *",
        "0 2 29 2 *",
        "@daily",
    ];
    const ZONES: [&str; 8] = [
        "America/New_York",
        "Europe/London",
        "Europe/Dublin",
        "Australia/Lord_Howe",
        "America/Santiago",
        "Asia/Kathmandu",
        "Pacific/Apia",
        "UTC",
    ];

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]
        #[test]
        fn fire_times_strictly_increase(
            picks in proptest::collection::vec(0..EXPRS.len(), 1..3),
            zone in 0..ZONES.len(),
            gap_skip in any::<bool>(),
            repeat in 0..3u8,
            start in 1_300_000_000i64..1_900_000_000i64,
        ) {
            let exprs: Vec<String> = picks.iter().map(|i| EXPRS[*i].to_owned()).collect();
            let gap = if gap_skip { GapPolicy::Skip } else { GapPolicy::ShiftForward };
            let repeat = match repeat { 0 => RepeatPolicy::First, 1 => RepeatPolicy::Last, _ => RepeatPolicy::Both };
            let schedule = Schedule::new(&exprs, ZONES[zone], gap, repeat).unwrap();
            let after = DateTime::from_timestamp(start, 0).unwrap();
            let mut last = after;
            for occurrence in schedule.occurrences_after(after).take(150) {
                prop_assert!(occurrence.at > last, "{} not after {}", occurrence.at, last);
                last = occurrence.at;
            }
        }
    }
}
