//! How much users may store: the size of one spec, and how many live activities there are and
//! how large their specs are together.
//!
//! A spec's size is the length of its canonical proto3 JSON in compact form: what is stored, and
//! close to what its author wrote. The limits are the operator's (`--max-spec-bytes`,
//! `--max-activities`, `--max-definitions-bytes`); the admin API asks here before it stores
//! anything, the totals under a lock so that two changes at once cannot both pass them.

use std::io;

/// Why a spec is not taken.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SizeError {
    #[error("is {bytes} bytes as JSON, over the limit of {limit} bytes (--max-spec-bytes)")]
    SpecTooLarge { bytes: u64, limit: u64 },
    #[error(
        "the live activities' specs would take {total} bytes with this one ({bytes} bytes), over \
         the limit of {limit} bytes (--max-definitions-bytes); delete activities or make specs \
         smaller"
    )]
    DefinitionsFull { total: u64, bytes: u64, limit: u64 },
    #[error(
        "there are {count} live activities already, the limit (--max-activities); delete some first"
    )]
    TooManyActivities { count: u64 },
}

/// The live activities other than the one being changed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Others {
    pub activities: u64,
    pub bytes: u64,
}

/// The operator's limits on the live activities together.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TotalLimits {
    pub max_activities: u64,
    pub max_bytes: u64,
}

/// The length of `value` as compact JSON, counted without writing it anywhere.
pub fn json_bytes(value: &serde_json::Value) -> u64 {
    struct Count(u64);
    impl io::Write for Count {
        fn write(&mut self, bytes: &[u8]) -> io::Result<usize> {
            self.0 += bytes.len() as u64;
            Ok(bytes.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }
    let mut count = Count(0);
    // Writing a `Value` to a sink that never fails cannot fail.
    let _ = serde_json::to_writer(&mut count, value);
    count.0
}

/// Whether a spec of `bytes` is within `limit`.
pub fn admit_spec(bytes: u64, limit: u64) -> Result<(), SizeError> {
    if bytes > limit {
        return Err(SizeError::SpecTooLarge { bytes, limit });
    }
    Ok(())
}

/// Whether an activity may be added (`before` is `None`) or changed from a spec of `before` bytes,
/// to a spec of `after` bytes, beside `others`. A new activity must fit under `max_activities`.
/// The bytes are refused only when the total would be over `max_bytes` *and* grow, so that after
/// the operator lowers a limit a change that makes things smaller is still taken.
pub fn admit_definitions(
    others: Others,
    before: Option<u64>,
    after: u64,
    limits: TotalLimits,
) -> Result<(), SizeError> {
    if before.is_none() && others.activities >= limits.max_activities {
        return Err(SizeError::TooManyActivities {
            count: others.activities,
        });
    }
    let total = others.bytes.saturating_add(after);
    if total > limits.max_bytes && after > before.unwrap_or(0) {
        return Err(SizeError::DefinitionsFull {
            total,
            bytes: after,
            limit: limits.max_bytes,
        });
    }
    Ok(())
}

/// How many of the leading items of a list make a page: at most `max_items`, and no more than
/// `budget` bytes together, but at least one (a page always moves the reader on).
pub fn page_within(sizes: &[u64], max_items: usize, budget: u64) -> usize {
    let mut total = 0u64;
    let mut taken = 0;
    for &size in sizes.iter().take(max_items) {
        total = total.saturating_add(size);
        if taken > 0 && total > budget {
            break;
        }
        taken += 1;
    }
    taken
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn json_bytes_is_the_compact_length() {
        for value in [
            serde_json::json!({"name": "a", "tasks": [{"params": {"x": "é\"\n"}}], "n": 1.5}),
            serde_json::json!(null),
            serde_json::json!([]),
        ] {
            assert_eq!(
                json_bytes(&value),
                serde_json::to_string(&value).unwrap().len() as u64
            );
        }
    }

    #[test]
    fn refusals_name_the_size_and_the_limit() {
        assert_eq!(admit_spec(1024, 1024), Ok(()));
        let error = admit_spec(3_900_000, 1_048_576).unwrap_err();
        assert_eq!(
            error.to_string(),
            "is 3900000 bytes as JSON, over the limit of 1048576 bytes (--max-spec-bytes)"
        );
        assert_eq!(
            admit_definitions(others(900), None, 100, limits(1000)),
            Ok(())
        );
        let error = admit_definitions(others(900), None, 101, limits(1000)).unwrap_err();
        assert!(
            error.to_string().starts_with(
                "the live activities' specs would take 1001 bytes with this one (101 bytes), over the limit of 1000 bytes"
            ),
            "{error}"
        );
    }

    fn others(bytes: u64) -> Others {
        Others {
            activities: 3,
            bytes,
        }
    }

    fn limits(max_bytes: u64) -> TotalLimits {
        TotalLimits {
            max_activities: 4,
            max_bytes,
        }
    }

    #[test]
    fn over_the_limit_a_change_may_still_shrink() {
        // The operator lowered the limit below what is stored.
        assert!(admit_definitions(others(5000), Some(300), 200, limits(1000)).is_ok());
        assert!(admit_definitions(others(5000), Some(300), 300, limits(1000)).is_ok());
        assert!(admit_definitions(others(5000), Some(300), 301, limits(1000)).is_err());
        assert!(admit_definitions(others(5000), None, 1, limits(1000)).is_err());
    }

    #[test]
    fn a_new_activity_must_fit_under_the_count() {
        let full = Others {
            activities: 4,
            bytes: 0,
        };
        assert_eq!(
            admit_definitions(full, None, 1, limits(1000)),
            Err(SizeError::TooManyActivities { count: 4 })
        );
        // An update of one of them is not a new activity.
        assert!(admit_definitions(full, Some(1), 1, limits(1000)).is_ok());
        assert!(admit_definitions(others(0), None, 1, limits(1000)).is_ok());
    }

    #[test]
    fn a_page_stops_at_its_budget_but_never_before_its_first_item() {
        assert_eq!(page_within(&[], 10, 100), 0);
        assert_eq!(page_within(&[500], 10, 100), 1);
        assert_eq!(page_within(&[40, 60, 1], 10, 100), 2);
        assert_eq!(page_within(&[40, 60], 10, 100), 2);
        assert_eq!(page_within(&[1, 1, 1, 1], 3, 100), 3);
        assert_eq!(page_within(&[1, 1], 0, 100), 0);
    }

    proptest! {
        /// Nothing admitted takes a total within the limit over it, and nothing that does not
        /// grow the total is refused.
        #[test]
        fn admitted_changes_keep_the_total_within_the_limit(
            bytes in 0u64..10_000, before in 0u64..10_000, after in 0u64..10_000, limit in 0u64..30_000,
        ) {
            let admitted = admit_definitions(others(bytes), Some(before), after, limits(limit)).is_ok();
            if bytes + before <= limit && admitted {
                prop_assert!(bytes + after <= limit);
            }
            if after <= before {
                prop_assert!(admitted);
            }
            if bytes + after <= limit {
                prop_assert!(admitted);
            }
        }
    }
}
