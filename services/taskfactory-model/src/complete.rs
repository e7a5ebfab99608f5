//! When a bucket refilled from Postgres (finished tasks, cancelled runs) is *complete*: it holds
//! its complete key, and that key names the bucket itself. The value is the creation time of the
//! bucket's stream (`created`, which a deleted and declared-again bucket does not share), so a
//! key that a watch of an older bucket saw, or that a refill wrote just as the bucket it refilled
//! was replaced, proves nothing about the bucket there now.

use chrono::{DateTime, SecondsFormat, Utc};

/// The complete key's value for the bucket whose stream was created at `created`: RFC 3339 in
/// UTC, to the nanosecond.
pub fn complete_value(created: DateTime<Utc>) -> String {
    created.to_rfc3339_opts(SecondsFormat::Nanos, true)
}

/// Whether a complete key holding `value` proves complete the bucket created at `created`: the
/// value is that instant in RFC 3339 (any offset and precision; surrounding whitespace ignored).
pub fn proves_complete(value: &[u8], created: DateTime<Utc>) -> bool {
    std::str::from_utf8(value)
        .ok()
        .and_then(|text| DateTime::parse_from_rfc3339(text.trim()).ok())
        .is_some_and(|named| named == created)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn created() -> DateTime<Utc> {
        DateTime::from_timestamp_nanos(1_765_000_000_123_456_789)
    }

    #[test]
    fn the_value_names_its_bucket_only() {
        let value = complete_value(created());
        assert_eq!(value, "2025-12-06T05:46:40.123456789Z");
        assert!(proves_complete(value.as_bytes(), created()));
        let other = created() + chrono::Duration::nanoseconds(1);
        assert!(!proves_complete(value.as_bytes(), other));
    }

    #[test]
    fn other_spellings_of_the_instant_count_and_nothing_else_does() {
        // An earlier release wrote `to_rfc3339()`.
        assert!(proves_complete(
            created().to_rfc3339().as_bytes(),
            created()
        ));
        assert!(proves_complete(
            b" 2025-12-06T06:46:40.123456789+01:00\n",
            created()
        ));
        for value in [&b""[..], b"now", b"1765000000123456789", b"\xff"] {
            assert!(!proves_complete(value, created()), "{value:?}");
        }
    }
}
