//! What a schedule does about the occurrences it missed (the service was down, the activity was
//! paused or disabled): the misfire policy, the catch-up window and the catch-up cap.
//!
//! - `MISFIRE_SKIP`: nothing; the schedule continues from now.
//! - `MISFIRE_LATEST` (the default): one fire, carrying the newest missed `scheduled_for`.
//! - `MISFIRE_ALL`: every missed time in order, at most `maxCatchup` (the newest ones).
//!
//! Only occurrences within `catchupWindow` of now count (default one hour); older ones are missed
//! for good.

use chrono::{DateTime, Utc};
use taskfactory_proto::v1::{MisfirePolicy, ScheduleTrigger};

use crate::schedule::{Occurrence, Schedule};
use crate::spec::std_duration;

pub const DEFAULT_CATCHUP_WINDOW: std::time::Duration = std::time::Duration::from_secs(3600);
pub const DEFAULT_MAX_CATCHUP: u32 = 100;
/// Missed occurrences examined at most (a day of an every-second schedule).
const SCAN_LIMIT: usize = 100_000;

/// The decision about missed occurrences.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct CatchUp {
    /// Fire these, in order.
    pub fire: Vec<Occurrence>,
    /// Missed and not fired (skipped by policy or over the cap; occurrences before the window are
    /// not counted).
    pub missed: usize,
    /// The newest occurrence at or before `now`: the new watermark.
    pub watermark: Option<DateTime<Utc>>,
}

/// Decides what to do with the occurrences in `(watermark, now]`.
pub fn plan(
    schedule: &Schedule,
    trigger: &ScheduleTrigger,
    watermark: DateTime<Utc>,
    now: DateTime<Utc>,
) -> CatchUp {
    let window = trigger
        .catchup_window
        .as_ref()
        .and_then(std_duration)
        .filter(|d| !d.is_zero())
        .unwrap_or(DEFAULT_CATCHUP_WINDOW);
    let window_start = now - chrono::Duration::from_std(window).unwrap_or(chrono::Duration::MAX);
    let mut all = 0usize;
    let mut in_window = Vec::new();
    let mut newest = None;
    // Occurrences older than the window are missed whatever the policy: start the scan at the
    // window, so a watermark far behind costs nothing.
    let scan_from = watermark.max(window_start - chrono::Duration::nanoseconds(1));
    let skipped_before_window = watermark < scan_from;
    for occurrence in schedule.occurrences_after(scan_from).take(SCAN_LIMIT) {
        if occurrence.at > now {
            break;
        }
        all += 1;
        newest = Some(occurrence.at);
        if occurrence.at >= window_start {
            in_window.push(occurrence);
        }
    }
    let fire = match MisfirePolicy::try_from(trigger.misfire)
        .unwrap_or(MisfirePolicy::MisfireUnspecified)
    {
        MisfirePolicy::MisfireSkip => Vec::new(),
        MisfirePolicy::MisfireAll => {
            let cap = if trigger.max_catchup == 0 {
                DEFAULT_MAX_CATCHUP
            } else {
                trigger.max_catchup
            } as usize;
            let skip = in_window.len().saturating_sub(cap);
            in_window.split_off(skip)
        }
        MisfirePolicy::MisfireLatest | MisfirePolicy::MisfireUnspecified => {
            in_window.pop().into_iter().collect()
        }
    };
    if newest.is_none() && skipped_before_window {
        // Nothing within the window, but everything before it is decided (missed).
        newest = Some(window_start);
    }
    CatchUp {
        missed: all - fire.len(),
        fire,
        watermark: newest,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::schedule::{GapPolicy, RepeatPolicy};

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

    fn fired(plan: &CatchUp) -> Vec<String> {
        plan.fire
            .iter()
            .map(|o| o.at.format("%H:%M").to_string())
            .collect()
    }

    #[test]
    fn latest_fires_the_newest_missed_time_once() {
        let p = plan(
            &minutely(),
            &trigger(MisfirePolicy::MisfireLatest, 0, 0),
            utc("2026-01-01T10:00:00Z"),
            utc("2026-01-01T10:05:30Z"),
        );
        assert_eq!(fired(&p), ["10:05"]);
        assert_eq!(p.missed, 4);
        assert_eq!(p.watermark, Some(utc("2026-01-01T10:05:00Z")));
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
        assert_eq!(p.missed, 2);
    }

    #[test]
    fn skip_fires_nothing_but_moves_the_watermark() {
        let p = plan(
            &minutely(),
            &trigger(MisfirePolicy::MisfireSkip, 0, 0),
            utc("2026-01-01T10:00:00Z"),
            utc("2026-01-01T10:05:30Z"),
        );
        assert!(p.fire.is_empty());
        assert_eq!(p.missed, 5);
        assert_eq!(p.watermark, Some(utc("2026-01-01T10:05:00Z")));
    }

    #[test]
    fn occurrences_outside_the_window_are_missed() {
        let p = plan(
            &minutely(),
            &trigger(MisfirePolicy::MisfireAll, 120, 0),
            utc("2026-01-01T10:00:00Z"),
            utc("2026-01-01T10:05:30Z"),
        );
        assert_eq!(fired(&p), ["10:04", "10:05"]);
        assert_eq!(p.missed, 0, "occurrences before the window are not counted");
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
        assert_eq!(p.fire.len(), 1);
        assert_eq!(p.fire[0].at, utc("2026-01-01T10:05:30Z"));
        assert_eq!(p.watermark, Some(utc("2026-01-01T10:05:30Z")));
    }

    #[test]
    fn nothing_in_the_window_still_moves_the_watermark_to_it() {
        let p = plan(
            &minutely(),
            &trigger(MisfirePolicy::MisfireLatest, 20, 0),
            utc("2026-01-01T10:00:00Z"),
            utc("2026-01-01T10:05:30Z"),
        );
        assert!(p.fire.is_empty());
        assert_eq!(p.watermark, Some(utc("2026-01-01T10:05:10Z")));
    }

    #[test]
    fn nothing_missed_means_nothing_to_do() {
        let p = plan(
            &minutely(),
            &trigger(MisfirePolicy::MisfireAll, 0, 0),
            utc("2026-01-01T10:05:00Z"),
            utc("2026-01-01T10:05:30Z"),
        );
        assert_eq!(p, CatchUp::default());
    }
}
