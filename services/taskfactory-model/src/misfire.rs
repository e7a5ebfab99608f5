//! Deciding occurrences: every occurrence a schedule computes gets exactly one decision, in
//! order, and this module says which.
//!
//! On time ([`on_time`]): an occurrence fires, unless its date is in `excludeDates`.
//!
//! Missed ([`plan`]) — the trigger service was down, the activity paused or disabled, or a fire
//! could not be recorded for longer than the misfire threshold — the misfire policy decides:
//!
//! - `MISFIRE_SKIP`: nothing fires; the schedule continues from now.
//! - `MISFIRE_LATEST` (the default): one fire, carrying the newest missed `scheduled_for`; the
//!   older ones are coalesced into it.
//! - `MISFIRE_ALL`: every missed time in order, at most `maxCatchup` (the newest ones); the older
//!   ones are missed.
//!
//! Only occurrences within `catchupWindow` of now count (default one hour); older ones are missed
//! for good, whatever the policy.
//!
//! Decisions that are not fires come as ranges of consecutive occurrences with the same decision
//! (`(after, through]`), so a week-long outage of an every-second schedule is a handful of rows,
//! not half a million; the ledger expands a range by recomputing the schedule.

use std::collections::VecDeque;

use chrono::{DateTime, Utc};
use taskfactory_proto::v1::{MisfirePolicy, ScheduleTrigger};

use crate::schedule::{Occurrence, Schedule};
use crate::spec::std_duration;

pub const DEFAULT_CATCHUP_WINDOW: std::time::Duration = std::time::Duration::from_secs(3600);
pub const DEFAULT_MAX_CATCHUP: u32 = 100;
/// Occurrences examined in one plan at most; a plan that stops there is `complete: false` and the
/// caller plans the rest from the new watermark (never a silent stop).
const SCAN_LIMIT: usize = 1_000_000;
/// Occurrences before the catch-up window counted at most (the ledger says "more than" beyond).
const COUNT_LIMIT: u64 = 10_000;

/// Why occurrences did not fire.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Missed {
    /// Older than the catch-up window.
    BeforeWindow,
    /// `MISFIRE_LATEST`: folded into the fire of the newest missed occurrence.
    Coalesced,
    /// `MISFIRE_ALL`: older than the newest `maxCatchup`.
    OverCap,
    /// `MISFIRE_SKIP`.
    PolicySkip,
    /// The wall date is in `excludeDates`.
    Excluded,
}

/// Consecutive occurrences in `(after, through]` with one decision.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DecidedRange {
    pub after: DateTime<Utc>,
    pub through: DateTime<Utc>,
    /// How many occurrences; `None` when not counted (more than [`COUNT_LIMIT`] before the
    /// window).
    pub count: Option<u64>,
    pub why: Missed,
    /// The DST note of a single-occurrence range.
    pub dst_note: Option<String>,
}

/// One step, in time order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Step {
    Fire(Occurrence),
    Decided(DecidedRange),
}

/// The decisions about a span of occurrences.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Decisions {
    pub steps: Vec<Step>,
    /// The newest instant decided: the new watermark (`None`: nothing new).
    pub watermark: Option<DateTime<Utc>>,
    /// False when the scan limit stopped the plan early: plan again from `watermark`.
    pub complete: bool,
}

impl Decisions {
    pub fn fires(&self) -> impl Iterator<Item = &Occurrence> {
        self.steps.iter().filter_map(|s| match s {
            Step::Fire(o) => Some(o),
            Step::Decided(_) => None,
        })
    }

    /// Occurrences decided as not fired, by reason (counted ranges only).
    pub fn missed(&self, why: Missed) -> u64 {
        self.steps
            .iter()
            .filter_map(|s| match s {
                Step::Decided(r) if r.why == why => r.count,
                _ => None,
            })
            .sum()
    }
}

/// Builds the step list, merging consecutive occurrences with the same decision into one range.
struct StepsBuilder {
    steps: Vec<Step>,
    decided_through: DateTime<Utc>,
    moved: bool,
}

impl StepsBuilder {
    fn new(watermark: DateTime<Utc>) -> Self {
        Self {
            steps: Vec::new(),
            decided_through: watermark,
            moved: false,
        }
    }

    fn fire(&mut self, occurrence: Occurrence) {
        self.decided_through = occurrence.at;
        self.moved = true;
        self.steps.push(Step::Fire(occurrence));
    }

    fn decide(&mut self, occurrence: &Occurrence, why: Missed) {
        if let Some(Step::Decided(range)) = self.steps.last_mut()
            && range.why == why
            && range.count.is_some()
        {
            range.through = occurrence.at;
            range.count = range.count.map(|c| c + 1);
            range.dst_note = None;
        } else {
            self.steps.push(Step::Decided(DecidedRange {
                after: self.decided_through,
                through: occurrence.at,
                count: Some(1),
                why,
                dst_note: occurrence.dst_note.clone(),
            }));
        }
        self.decided_through = occurrence.at;
        self.moved = true;
    }

    fn decide_uncounted(&mut self, through: DateTime<Utc>, count: Option<u64>, why: Missed) {
        self.steps.push(Step::Decided(DecidedRange {
            after: self.decided_through,
            through,
            count,
            why,
            dst_note: None,
        }));
        self.decided_through = through;
        self.moved = true;
    }

    fn finish(self, complete: bool) -> Decisions {
        Decisions {
            watermark: self.moved.then_some(self.decided_through),
            steps: self.steps,
            complete,
        }
    }
}

/// Decides the on-time occurrences in `(watermark, through]`: each fires unless excluded.
pub fn on_time(schedule: &Schedule, watermark: DateTime<Utc>, through: DateTime<Utc>) -> Decisions {
    let mut steps = StepsBuilder::new(watermark);
    for (scanned, occurrence) in schedule
        .occurrences_after(watermark)
        .including_excluded()
        .enumerate()
    {
        if occurrence.at > through {
            return steps.finish(true);
        }
        if scanned == SCAN_LIMIT {
            return steps.finish(false);
        }
        if occurrence.excluded {
            steps.decide(&occurrence, Missed::Excluded);
        } else {
            steps.fire(occurrence);
        }
    }
    steps.finish(true)
}

/// Decides the missed occurrences in `(watermark, now]` under the trigger's misfire policy.
pub fn plan(
    schedule: &Schedule,
    trigger: &ScheduleTrigger,
    watermark: DateTime<Utc>,
    now: DateTime<Utc>,
) -> Decisions {
    plan_limited(schedule, trigger, watermark, now, SCAN_LIMIT)
}

fn plan_limited(
    schedule: &Schedule,
    trigger: &ScheduleTrigger,
    watermark: DateTime<Utc>,
    now: DateTime<Utc>,
    scan_limit: usize,
) -> Decisions {
    let window = catchup_window(trigger);
    let window_start = chrono::Duration::from_std(window)
        .ok()
        .and_then(|w| now.checked_sub_signed(w))
        .unwrap_or(DateTime::<Utc>::MIN_UTC);
    let mut steps = StepsBuilder::new(watermark);

    // Occurrences older than the window are missed whatever the policy: count a few, then start
    // the scan at the window, so a watermark far behind costs nothing.
    let scan_from = watermark.max(
        window_start
            .checked_sub_signed(chrono::Duration::nanoseconds(1))
            .unwrap_or(window_start),
    );
    if watermark < scan_from {
        let mut before = 0u64;
        let mut last = None;
        for occurrence in schedule.occurrences_after(watermark) {
            if occurrence.at > scan_from || before == COUNT_LIMIT {
                break;
            }
            before += 1;
            last = Some(occurrence.at);
        }
        if let Some(last) = last {
            let counted = before < COUNT_LIMIT;
            steps.decide_uncounted(
                if counted { last } else { scan_from },
                counted.then_some(before),
                Missed::BeforeWindow,
            );
        }
    }

    let policy =
        MisfirePolicy::try_from(trigger.misfire).unwrap_or(MisfirePolicy::MisfireUnspecified);
    let (cap, pushed_out) = match policy {
        MisfirePolicy::MisfireSkip => (0, Missed::PolicySkip),
        MisfirePolicy::MisfireAll => (max_catchup(trigger) as usize, Missed::OverCap),
        MisfirePolicy::MisfireLatest | MisfirePolicy::MisfireUnspecified => (1, Missed::Coalesced),
    };
    // The newest `cap` firing occurrences (and excluded ones among them) wait here until the
    // end decides them; older ones are pushed out as missed.
    let mut held: VecDeque<Occurrence> = VecDeque::new();
    let mut held_firing = 0usize;
    let mut complete = true;
    for (scanned, occurrence) in schedule
        .occurrences_after(scan_from)
        .including_excluded()
        .enumerate()
    {
        if occurrence.at > now {
            break;
        }
        if scanned == scan_limit {
            complete = false;
            break;
        }
        held_firing += usize::from(!occurrence.excluded);
        held.push_back(occurrence);
        while held_firing > cap {
            let Some(oldest) = held.pop_front() else {
                break;
            };
            if oldest.excluded {
                steps.decide(&oldest, Missed::Excluded);
            } else {
                held_firing -= 1;
                steps.decide(&oldest, pushed_out);
            }
        }
    }
    // Cut short by the scan limit with some occurrences already decided: those stand, and the
    // held ones are planned again from the new watermark (so LATEST still fires only the newest).
    if !complete && steps.moved {
        return steps.finish(false);
    }
    for occurrence in held {
        if occurrence.excluded {
            steps.decide(&occurrence, Missed::Excluded);
        } else {
            steps.fire(occurrence);
        }
    }
    steps.finish(complete)
}

pub fn catchup_window(trigger: &ScheduleTrigger) -> std::time::Duration {
    trigger
        .catchup_window
        .as_ref()
        .and_then(std_duration)
        .filter(|d| !d.is_zero())
        .unwrap_or(DEFAULT_CATCHUP_WINDOW)
}

pub fn max_catchup(trigger: &ScheduleTrigger) -> u32 {
    if trigger.max_catchup == 0 {
        DEFAULT_MAX_CATCHUP
    } else {
        trigger.max_catchup
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::schedule::{GapPolicy, RepeatPolicy};
    use chrono::NaiveDate;

    fn utc(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
    }

    fn minutely() -> Schedule {
        Schedule::new(
            &["* * * * *".to_owned()],
            "UTC",
            GapPolicy::ShiftForward,
            RepeatPolicy::First,
        )
        .unwrap()
    }

    fn trigger(misfire: MisfirePolicy, window_secs: i64, max_catchup: u32) -> ScheduleTrigger {
        ScheduleTrigger {
            misfire: misfire as i32,
            catchup_window: (window_secs > 0).then_some(prost_types::Duration {
                seconds: window_secs,
                nanos: 0,
            }),
            max_catchup,
            ..Default::default()
        }
    }

    fn fired(plan: &Decisions) -> Vec<String> {
        plan.fires()
            .map(|o| o.at.format("%H:%M").to_string())
            .collect()
    }

    /// The steps as `fire 10:05` / `Coalesced 10:00..10:04 ×4` lines.
    fn described(plan: &Decisions) -> Vec<String> {
        plan.steps
            .iter()
            .map(|s| match s {
                Step::Fire(o) => format!("fire {}", o.at.format("%H:%M")),
                Step::Decided(r) => format!(
                    "{:?} {}..{} ×{}",
                    r.why,
                    r.after.format("%H:%M"),
                    r.through.format("%H:%M"),
                    r.count.map_or("?".to_owned(), |c| c.to_string())
                ),
            })
            .collect()
    }

    #[test]
    fn latest_fires_the_newest_missed_time_once_and_coalesces_the_rest() {
        let p = plan(
            &minutely(),
            &trigger(MisfirePolicy::MisfireLatest, 0, 0),
            utc("2026-01-01T10:00:00Z"),
            utc("2026-01-01T10:05:30Z"),
        );
        assert_eq!(described(&p), ["Coalesced 10:00..10:04 ×4", "fire 10:05"]);
        assert_eq!(p.watermark, Some(utc("2026-01-01T10:05:00Z")));
        assert!(p.complete);
    }

    #[test]
    fn all_fires_each_in_order_capped_to_the_newest() {
        let p = plan(
            &minutely(),
            &trigger(MisfirePolicy::MisfireAll, 0, 3),
            utc("2026-01-01T10:00:00Z"),
            utc("2026-01-01T10:05:30Z"),
        );
        assert_eq!(fired(&p), ["10:03", "10:04", "10:05"]);
        assert_eq!(p.missed(Missed::OverCap), 2);
    }

    #[test]
    fn skip_fires_nothing_but_moves_the_watermark() {
        let p = plan(
            &minutely(),
            &trigger(MisfirePolicy::MisfireSkip, 0, 0),
            utc("2026-01-01T10:00:00Z"),
            utc("2026-01-01T10:05:30Z"),
        );
        assert_eq!(described(&p), ["PolicySkip 10:00..10:05 ×5"]);
        assert_eq!(p.watermark, Some(utc("2026-01-01T10:05:00Z")));
    }

    #[test]
    fn occurrences_outside_the_window_are_missed_and_counted() {
        let p = plan(
            &minutely(),
            &trigger(MisfirePolicy::MisfireAll, 120, 0),
            utc("2026-01-01T10:00:00Z"),
            utc("2026-01-01T10:05:30Z"),
        );
        assert_eq!(
            described(&p),
            ["BeforeWindow 10:00..10:03 ×3", "fire 10:04", "fire 10:05"]
        );
        assert_eq!(p.watermark, Some(utc("2026-01-01T10:05:00Z")));
    }

    #[test]
    fn a_watermark_far_behind_costs_one_window_scan() {
        let every_second = Schedule::new(
            &["* * * * * *".to_owned()],
            "UTC",
            GapPolicy::ShiftForward,
            RepeatPolicy::First,
        )
        .unwrap();
        let p = plan(
            &every_second,
            &trigger(MisfirePolicy::MisfireLatest, 60, 0),
            utc("2025-01-01T00:00:00Z"),
            utc("2026-01-01T10:05:30.5Z"),
        );
        let fires: Vec<_> = p.fires().collect();
        assert_eq!(fires.len(), 1);
        assert_eq!(fires[0].at, utc("2026-01-01T10:05:30Z"));
        assert_eq!(p.watermark, Some(utc("2026-01-01T10:05:30Z")));
        // A year of seconds before the window: one uncounted range, then 59 coalesced.
        assert!(matches!(
            &p.steps[0],
            Step::Decided(DecidedRange {
                why: Missed::BeforeWindow,
                count: None,
                ..
            })
        ));
        assert_eq!(p.missed(Missed::Coalesced), 59);
    }

    #[test]
    fn excluded_dates_are_decided_in_order_among_the_rest() {
        let daily = Schedule::new(
            &["0 12 * * *".to_owned()],
            "UTC",
            GapPolicy::ShiftForward,
            RepeatPolicy::First,
        )
        .unwrap()
        .with_exclude_dates([NaiveDate::from_ymd_opt(2026, 1, 4).unwrap()]);
        let p = plan(
            &daily,
            &trigger(MisfirePolicy::MisfireAll, 10 * 86400, 2),
            utc("2026-01-01T00:00:00Z"),
            utc("2026-01-05T13:00:00Z"),
        );
        let days: Vec<String> = p
            .steps
            .iter()
            .map(|s| match s {
                Step::Fire(o) => format!("fire {}", o.at.format("%d")),
                Step::Decided(r) => {
                    format!("{:?} {} ×{:?}", r.why, r.through.format("%d"), r.count)
                }
            })
            .collect();
        assert_eq!(
            days,
            [
                "OverCap 02 ×Some(2)",
                "fire 03",
                "Excluded 04 ×Some(1)",
                "fire 05"
            ]
        );
        let on = on_time(
            &daily,
            utc("2026-01-03T13:00:00Z"),
            utc("2026-01-05T13:00:00Z"),
        );
        assert_eq!(on.steps.len(), 2);
        assert!(matches!(
            &on.steps[0],
            Step::Decided(DecidedRange {
                why: Missed::Excluded,
                ..
            })
        ));
        assert!(matches!(&on.steps[1], Step::Fire(_)));
    }

    #[test]
    fn a_plan_cut_short_by_the_scan_limit_says_so_and_continues_where_it_stopped() {
        let trigger = trigger(MisfirePolicy::MisfireSkip, 0, 0);
        let now = utc("2026-01-01T10:30:30Z");
        let first = plan_limited(&minutely(), &trigger, utc("2026-01-01T10:00:00Z"), now, 10);
        assert!(!first.complete);
        assert_eq!(first.watermark, Some(utc("2026-01-01T10:10:00Z")));
        let rest = plan_limited(&minutely(), &trigger, first.watermark.unwrap(), now, 100);
        assert!(rest.complete);
        assert_eq!(
            first.missed(Missed::PolicySkip) + rest.missed(Missed::PolicySkip),
            30,
            "every occurrence decided once"
        );
        assert_eq!(rest.watermark, Some(utc("2026-01-01T10:30:00Z")));
    }

    #[test]
    fn latest_cut_short_still_fires_only_the_newest() {
        let trigger = trigger(MisfirePolicy::MisfireLatest, 0, 0);
        let now = utc("2026-01-01T10:30:30Z");
        let mut watermark = utc("2026-01-01T10:00:00Z");
        let mut fires = Vec::new();
        let mut coalesced = 0;
        loop {
            let plan = plan_limited(&minutely(), &trigger, watermark, now, 7);
            fires.extend(plan.fires().map(|o| o.at));
            coalesced += plan.missed(Missed::Coalesced);
            watermark = plan.watermark.unwrap_or(watermark);
            if plan.complete {
                break;
            }
        }
        assert_eq!(fires, [utc("2026-01-01T10:30:00Z")]);
        assert_eq!(coalesced, 29);
    }

    #[test]
    fn nothing_missed_means_nothing_to_do() {
        let p = plan(
            &minutely(),
            &trigger(MisfirePolicy::MisfireAll, 0, 0),
            utc("2026-01-01T10:05:00Z"),
            utc("2026-01-01T10:05:30Z"),
        );
        assert!(p.steps.is_empty());
        assert_eq!(p.watermark, None);
        assert!(p.complete);
    }

    #[test]
    fn downtime_of_3h_on_an_every_minute_schedule() {
        // The example: MISFIRE_ALL with maxCatchup 100 after 3 h → exactly 100 fires,
        // the other 80 recorded as missed.
        let p = plan(
            &minutely(),
            &trigger(MisfirePolicy::MisfireAll, 4 * 3600, 100),
            utc("2026-01-01T10:00:00Z"),
            utc("2026-01-01T13:00:30Z"),
        );
        assert_eq!(p.fires().count(), 100);
        assert_eq!(p.missed(Missed::OverCap), 80);
        assert_eq!(fired(&p).first().map(String::as_str), Some("11:21"));
    }
}
