//! The taskfactory contract.
//!
//! # Layout
//!
//! - [`v1`]: the protobuf messages and the `AdminService` gRPC client and server, generated at build
//!   time from `taskfactory/v1/taskfactory.proto` by protox (no system `protoc`).
//! - [`FILE_DESCRIPTOR_SET`]: the compiled descriptors, for gRPC server reflection.
//! - [`to_json`] / [`from_json`]: the canonical proto3 JSON mapping of any message here. The activity
//!   spec a user writes, the gRPC message and the JSONB stored in Postgres are one thing through it.
//!
//! Durations in JSON input may also be written the humane way (`5m`, `1h30m`, `250ms`); output is
//! always canonical (`300s`).

use std::sync::LazyLock;

use prost_reflect::{DescriptorPool, DynamicMessage, Kind, MessageDescriptor, SerializeOptions};

#[allow(clippy::all, clippy::pedantic, missing_docs)]
pub mod v1 {
    tonic::include_proto!("taskfactory.v1");
}

/// The file descriptor set of the contract, imports included.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/taskfactory_descriptor.bin"));

static POOL: LazyLock<DescriptorPool> = LazyLock::new(|| {
    DescriptorPool::decode(FILE_DESCRIPTOR_SET)
        .expect("the descriptor set compiled into this crate decodes")
});

/// A message of the contract that has a proto3 JSON form.
pub trait JsonMessage: prost::Message + Default {
    /// The fully qualified protobuf name, e.g. `taskfactory.v1.ActivitySpec`.
    const FULL_NAME: &'static str;
}

macro_rules! json_messages {
    ($($name:ident),* $(,)?) => {
        $(impl JsonMessage for v1::$name {
            const FULL_NAME: &'static str = concat!("taskfactory.v1.", stringify!($name));
        })*
    };
}

json_messages!(
    ActivitySpec,
    Trigger,
    ScheduleTrigger,
    EventTrigger,
    ContextSource,
    TaskTemplate,
    RetryPolicy,
    TriggerEvent,
    TaskInstance,
    TaskResult,
    TemplateEvaluation,
    Activity,
    Run,
    Task,
    PreviewRunResponse,
    AuditEvent,
);

/// The method names of `taskfactory.v1.AdminService` (`CreateActivity`, …), from the contract.
pub fn admin_methods() -> Vec<String> {
    POOL.get_service_by_name("taskfactory.v1.AdminService")
        .map(|service| service.methods().map(|m| m.name().to_owned()).collect())
        .unwrap_or_default()
}

/// Why a JSON document is not a valid message of the contract.
#[derive(Debug, thiserror::Error)]
pub enum JsonError {
    #[error("{0}")]
    Invalid(String),
}

fn descriptor(full_name: &str) -> MessageDescriptor {
    POOL.get_message_by_name(full_name)
        .unwrap_or_else(|| panic!("message {full_name} is in the compiled descriptor set"))
}

/// Parses a message from its proto3 JSON form. Unknown fields are rejected (a misspelt field in a
/// spec must not be silently ignored); durations may be humane (`5m`).
pub fn from_json<M: JsonMessage>(value: &serde_json::Value) -> Result<M, JsonError> {
    let desc = descriptor(M::FULL_NAME);
    let mut value = value.clone();
    normalize_durations(&desc, &mut value);
    let options = prost_reflect::DeserializeOptions::new().deny_unknown_fields(true);
    let dynamic = DynamicMessage::deserialize_with_options(desc, value, &options)
        .map_err(|e| JsonError::Invalid(e.to_string()))?;
    dynamic
        .transcode_to::<M>()
        .map_err(|e| JsonError::Invalid(e.to_string()))
}

/// Renders a message in its canonical proto3 JSON form, omitting fields that hold their default.
/// Fails when a value has no JSON form (a duration or timestamp out of the proto3 range).
pub fn try_to_json<M: JsonMessage>(message: &M) -> Result<serde_json::Value, JsonError> {
    let mut dynamic = DynamicMessage::new(descriptor(M::FULL_NAME));
    dynamic
        .transcode_from(message)
        .map_err(|e| JsonError::Invalid(e.to_string()))?;
    let options = SerializeOptions::new()
        .skip_default_fields(true)
        .stringify_64_bit_integers(false);
    let mut json = dynamic
        .serialize_with_options(serde_json::value::Serializer, &options)
        .map_err(|e| JsonError::Invalid(e.to_string()))?;
    integral_numbers_as_integers(&mut json);
    Ok(json)
}

/// [`try_to_json`] for messages this system built itself, whose values are always in range; an
/// out-of-range value renders as `null` rather than failing.
pub fn to_json<M: JsonMessage>(message: &M) -> serde_json::Value {
    try_to_json(message).unwrap_or(serde_json::Value::Null)
}

/// Protobuf's `Value` holds only doubles; `3.0` reads back as `3`, as the user wrote it.
fn integral_numbers_as_integers(value: &mut serde_json::Value) {
    const MAX_SAFE: f64 = 9_007_199_254_740_992.0;
    match value {
        serde_json::Value::Number(n) => {
            if let Some(f) = n.as_f64()
                && n.is_f64()
                && f.fract() == 0.0
                && f.abs() <= MAX_SAFE
            {
                *value = serde_json::Value::from(f as i64);
            }
        }
        serde_json::Value::Array(items) => items.iter_mut().for_each(integral_numbers_as_integers),
        serde_json::Value::Object(map) => map.values_mut().for_each(integral_numbers_as_integers),
        _ => {}
    }
}

/// Rewrites humane duration strings (`5m`, `1h30m`, `250ms`) under `Duration` fields into the
/// canonical `"300s"` form, guided by the message descriptor. Anything it does not understand is
/// left for the strict parser to reject with its own message.
fn normalize_durations(desc: &MessageDescriptor, value: &mut serde_json::Value) {
    let serde_json::Value::Object(map) = value else {
        return;
    };
    for (key, field_value) in map.iter_mut() {
        let field = desc
            .get_field_by_json_name(key)
            .or_else(|| desc.get_field_by_name(key));
        let Some(field) = field else { continue };
        let Kind::Message(inner) = field.kind() else {
            continue;
        };
        if inner.full_name() == "google.protobuf.Duration" {
            if field.is_list() {
                if let serde_json::Value::Array(items) = field_value {
                    items.iter_mut().for_each(normalize_duration);
                }
            } else {
                normalize_duration(field_value);
            }
        } else if inner.full_name().starts_with("google.protobuf.") {
            // Struct, Value, Timestamp: user data or fixed formats, never rewritten.
        } else if field.is_map() {
            if let serde_json::Value::Object(entries) = field_value {
                let value_desc = inner.map_entry_value_field();
                if let Kind::Message(value_message) = value_desc.kind() {
                    for entry in entries.values_mut() {
                        normalize_durations(&value_message, entry);
                    }
                }
            }
        } else if field.is_list() {
            if let serde_json::Value::Array(items) = field_value {
                for item in items {
                    normalize_durations(&inner, item);
                }
            }
        } else {
            normalize_durations(&inner, field_value);
        }
    }
}

fn normalize_duration(value: &mut serde_json::Value) {
    let serde_json::Value::String(text) = value else {
        return;
    };
    if let Some(canonical) = humane_duration_to_canonical(text) {
        *text = canonical;
    }
}

/// `"5m"` → `"300s"`, `"1h30m"` → `"5400s"`, `"250ms"` → `"0.250s"`; `None` when the text is already
/// canonical or not a duration at all.
fn humane_duration_to_canonical(text: &str) -> Option<String> {
    let trimmed = text.trim();
    if trimmed.is_empty() {
        return None;
    }
    let mut total_nanos: u128 = 0;
    let mut rest = trimmed;
    let negative = rest.starts_with('-');
    if negative {
        rest = &rest[1..];
    }
    while !rest.is_empty() {
        let number_len = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(rest.len());
        if number_len == 0 {
            return None;
        }
        let (number, after) = rest.split_at(number_len);
        let unit_len = after
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(after.len());
        let (unit, after) = after.split_at(unit_len);
        let nanos_per_unit: u128 = match unit.trim() {
            "ns" => 1,
            "us" | "µs" => 1_000,
            "ms" => 1_000_000,
            "s" | "sec" | "secs" => 1_000_000_000,
            "m" | "min" | "mins" => 60_000_000_000,
            "h" | "hr" | "hrs" => 3_600_000_000_000,
            "d" | "day" | "days" => 86_400_000_000_000,
            _ => return None,
        };
        let parsed: f64 = number.parse().ok()?;
        if !parsed.is_finite() {
            return None;
        }
        total_nanos = total_nanos.checked_add((parsed * nanos_per_unit as f64).round() as u128)?;
        rest = after;
    }
    let seconds = total_nanos / 1_000_000_000;
    let nanos = total_nanos % 1_000_000_000;
    let sign = if negative { "-" } else { "" };
    let canonical = if nanos == 0 {
        format!("{sign}{seconds}s")
    } else {
        let fraction = format!("{nanos:09}");
        format!("{sign}{seconds}.{}s", fraction.trim_end_matches('0'))
    };
    Some(canonical)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn humane_durations_become_canonical() {
        assert_eq!(humane_duration_to_canonical("5m").as_deref(), Some("300s"));
        assert_eq!(
            humane_duration_to_canonical("1h30m").as_deref(),
            Some("5400s")
        );
        assert_eq!(
            humane_duration_to_canonical("250ms").as_deref(),
            Some("0.25s")
        );
        assert_eq!(humane_duration_to_canonical("30s").as_deref(), Some("30s"));
        assert_eq!(
            humane_duration_to_canonical("1.5s").as_deref(),
            Some("1.5s")
        );
        assert_eq!(humane_duration_to_canonical("soon"), None);
        assert_eq!(humane_duration_to_canonical("5 parsecs"), None);
    }

    #[test]
    fn spec_round_trips_through_proto3_json() {
        let input = json!({
            "name": "invoice-reminders",
            "enabled": true,
            "trigger": {"schedule": {
                "cron": ["0 9 * * MON-FRI"],
                "timezone": "Europe/Berlin",
                "dst": {"gap": "SHIFT_FORWARD", "repeat": "FIRST"},
                "jitter": "30s",
                "misfire": "MISFIRE_LATEST",
                "startAt": "2027-01-01T00:00:00Z"
            }},
            "context": [{"name": "limits", "static": {"max": 3}}],
            "tasks": [{
                "name": "remind",
                "type": "http",
                "forEach": "context.invoices",
                "params": {"url": "https://mailer.internal/send", "body": {"to": "{{ item.email }}"}},
                "retry": {"maxAttempts": 5, "initialBackoff": "1s", "maxBackoff": "300s"},
                "timeout": "30s"
            }]
        });
        let spec: v1::ActivitySpec = from_json(&input).unwrap();
        assert_eq!(spec.tasks[0].for_each, "context.invoices");
        assert_eq!(to_json(&spec), input);
    }

    #[test]
    fn humane_durations_are_accepted_in_nested_fields() {
        let input = json!({
            "name": "a",
            "tasks": [{"name": "t", "type": "log", "timeout": "5m", "retry": {"maxBackoff": "1h"}}]
        });
        let spec: v1::ActivitySpec = from_json(&input).unwrap();
        assert_eq!(spec.tasks[0].timeout.unwrap().seconds, 300);
        assert_eq!(
            spec.tasks[0].retry.unwrap().max_backoff.unwrap().seconds,
            3600
        );
    }

    #[test]
    fn out_of_range_durations_have_no_json_form() {
        let spec = v1::ActivitySpec {
            name: "a".to_owned(),
            tasks: vec![v1::TaskTemplate {
                timeout: Some(prost_types::Duration {
                    seconds: i64::MAX,
                    nanos: 0,
                }),
                ..Default::default()
            }],
            ..Default::default()
        };
        assert!(try_to_json(&spec).is_err());
    }

    #[test]
    fn unknown_fields_are_rejected_by_name() {
        let input = json!({"name": "a", "tasks": [{"name": "t", "type": "log", "forEch": "x"}]});
        let error = from_json::<v1::ActivitySpec>(&input).unwrap_err();
        assert!(error.to_string().contains("forEch"), "{error}");
    }
}
