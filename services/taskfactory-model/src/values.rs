//! Conversions between protobuf's `Value`/`Struct` and `serde_json::Value`.
//!
//! The wire carries `google.protobuf.Value`; everything that computes with data (expressions,
//! Postgres JSONB, HTTP bodies) uses `serde_json::Value`. Numbers: protobuf has only doubles, so an
//! integer survives the round trip as long as it fits in 53 bits, like in any JSON tool.

use prost_types::value::Kind;
use prost_types::{ListValue, Struct, Value};

/// `serde_json::Value` → `google.protobuf.Value`.
pub fn json_to_value(json: &serde_json::Value) -> Value {
    let kind = match json {
        serde_json::Value::Null => Kind::NullValue(0),
        serde_json::Value::Bool(b) => Kind::BoolValue(*b),
        serde_json::Value::Number(n) => Kind::NumberValue(n.as_f64().unwrap_or(0.0)),
        serde_json::Value::String(s) => Kind::StringValue(s.clone()),
        serde_json::Value::Array(items) => Kind::ListValue(ListValue {
            values: items.iter().map(json_to_value).collect(),
        }),
        serde_json::Value::Object(map) => Kind::StructValue(json_map_to_struct(map)),
    };
    Value { kind: Some(kind) }
}

/// A JSON object → `google.protobuf.Struct`.
pub fn json_map_to_struct(map: &serde_json::Map<String, serde_json::Value>) -> Struct {
    Struct {
        fields: map
            .iter()
            .map(|(k, v)| (k.clone(), json_to_value(v)))
            .collect(),
    }
}

/// Any JSON → `Struct`: objects map field by field, anything else is wrapped as `{"value": …}`.
pub fn json_to_struct(json: &serde_json::Value) -> Struct {
    match json {
        serde_json::Value::Object(map) => json_map_to_struct(map),
        other => Struct {
            fields: [("value".to_owned(), json_to_value(other))]
                .into_iter()
                .collect(),
        },
    }
}

/// `google.protobuf.Value` → `serde_json::Value`. Whole doubles become integers, so `3` stays `3`.
pub fn value_to_json(value: &Value) -> serde_json::Value {
    match &value.kind {
        None | Some(Kind::NullValue(_)) => serde_json::Value::Null,
        Some(Kind::BoolValue(b)) => serde_json::Value::Bool(*b),
        Some(Kind::NumberValue(n)) => number_to_json(*n),
        Some(Kind::StringValue(s)) => serde_json::Value::String(s.clone()),
        Some(Kind::ListValue(list)) => {
            serde_json::Value::Array(list.values.iter().map(value_to_json).collect())
        }
        Some(Kind::StructValue(s)) => struct_to_json(s),
    }
}

/// `google.protobuf.Struct` → a JSON object.
pub fn struct_to_json(s: &Struct) -> serde_json::Value {
    serde_json::Value::Object(
        s.fields
            .iter()
            .map(|(k, v)| (k.clone(), value_to_json(v)))
            .collect(),
    )
}

fn number_to_json(n: f64) -> serde_json::Value {
    const MAX_SAFE: f64 = 9_007_199_254_740_992.0;
    if n.fract() == 0.0 && n.abs() <= MAX_SAFE {
        serde_json::Value::from(n as i64)
    } else {
        serde_json::Number::from_f64(n)
            .map(serde_json::Value::Number)
            .unwrap_or(serde_json::Value::Null)
    }
}

/// Postgres stores no NUL character, in `text` or in `jsonb` (`\u0000`), and anything from outside
/// (events, payloads, executors' results, context sources) may carry one. What we store has each
/// replaced with U+FFFD, the replacement character, so the data is kept and marked rather than
/// refused over and over.
pub fn make_storable_text(text: &mut String) {
    if text.contains('\0') {
        *text = text.replace('\0', "\u{fffd}");
    }
}

/// Cuts `text` to at most `max_bytes`, at a character boundary.
pub fn truncate_text(text: &mut String, max_bytes: usize) {
    if text.len() > max_bytes {
        let mut cut = max_bytes;
        while !text.is_char_boundary(cut) {
            cut -= 1;
        }
        text.truncate(cut);
    }
}

/// The longest dedupe key stored as it is. Dedupe keys are unique keys in Postgres (an index
/// row has room for about 2.7 KB), and come from outside: an event's `Nats-Msg-Id`, a
/// `dedupeKey` template over its payload, an idempotency key.
pub const MAX_DEDUPE_KEY_BYTES: usize = 512;

/// A dedupe key as it is stored, published and derived from: [`make_storable_text`], and a key
/// longer than [`MAX_DEDUPE_KEY_BYTES`] replaced by `sha256:` and its digest in hex. Equal keys
/// stay equal and different ones different, so a long key dedupes exactly as a short one would;
/// it never fails the insert that would make it loop.
pub fn make_storable_key(key: &mut String) {
    make_storable_text(key);
    if key.len() > MAX_DEDUPE_KEY_BYTES {
        use sha2::Digest as _;
        *key = format!(
            "sha256:{}",
            hex::encode(sha2::Sha256::digest(key.as_bytes()))
        );
    }
}

/// [`make_storable_text`] for every string and key in a protobuf `Value`.
pub fn make_storable_value(value: &mut Value) {
    match &mut value.kind {
        Some(Kind::StringValue(s)) => make_storable_text(s),
        Some(Kind::ListValue(list)) => list.values.iter_mut().for_each(make_storable_value),
        Some(Kind::StructValue(s)) => make_storable_struct(s),
        None | Some(Kind::NullValue(_) | Kind::BoolValue(_) | Kind::NumberValue(_)) => {}
    }
}

/// [`make_storable_text`] for every field name and string in a protobuf `Struct`.
pub fn make_storable_struct(s: &mut Struct) {
    if s.fields.keys().any(|k| k.contains('\0')) {
        let fields = std::mem::take(&mut s.fields);
        for (mut key, mut item) in fields {
            make_storable_text(&mut key);
            make_storable_value(&mut item);
            s.fields.insert(key, item);
        }
    } else {
        s.fields.values_mut().for_each(make_storable_value);
    }
}

/// Whether [`make_storable_json`] would leave the document as it is (no string or key holds a
/// NUL): then a shared document need not be copied to be stored.
pub fn is_storable_json(value: &serde_json::Value) -> bool {
    match value {
        serde_json::Value::String(s) => !s.contains('\0'),
        serde_json::Value::Array(items) => items.iter().all(is_storable_json),
        serde_json::Value::Object(map) => map
            .iter()
            .all(|(key, item)| !key.contains('\0') && is_storable_json(item)),
        serde_json::Value::Null | serde_json::Value::Bool(_) | serde_json::Value::Number(_) => true,
    }
}

/// [`make_storable_text`] for every string and key in a JSON document.
pub fn make_storable_json(value: &mut serde_json::Value) {
    match value {
        serde_json::Value::String(s) => make_storable_text(s),
        serde_json::Value::Array(items) => items.iter_mut().for_each(make_storable_json),
        serde_json::Value::Object(map) => {
            if map.keys().any(|k| k.contains('\0')) {
                let entries = std::mem::take(map);
                for (mut key, mut item) in entries {
                    make_storable_text(&mut key);
                    make_storable_json(&mut item);
                    map.insert(key, item);
                }
            } else {
                map.values_mut().for_each(make_storable_json);
            }
        }
        serde_json::Value::Null | serde_json::Value::Bool(_) | serde_json::Value::Number(_) => {}
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_long_dedupe_key_is_stored_as_its_digest_and_still_tells_keys_apart() {
        let mut short = "order-1\0".to_owned();
        super::make_storable_key(&mut short);
        assert_eq!(short, "order-1\u{fffd}");
        let mut exact = "k".repeat(super::MAX_DEDUPE_KEY_BYTES);
        super::make_storable_key(&mut exact);
        assert_eq!(exact.len(), super::MAX_DEDUPE_KEY_BYTES);
        let long = |tail: &str| {
            let mut key = "k".repeat(10_000) + tail;
            super::make_storable_key(&mut key);
            key
        };
        assert_eq!(long("a"), long("a"));
        assert_ne!(long("a"), long("b"));
        assert!(long("a").starts_with("sha256:"), "{}", long("a"));
        assert_eq!(long("a").len(), "sha256:".len() + 64);
        // Idempotent: a stored key stored again is itself (both services store it).
        let mut again = long("a");
        super::make_storable_key(&mut again);
        assert_eq!(again, long("a"));
    }

    use super::*;
    use serde_json::json;

    #[test]
    fn json_round_trips_through_protobuf_value() {
        let input = json!({"a": [1, 2.5, "x", null, true], "b": {"c": -7}});
        assert_eq!(value_to_json(&json_to_value(&input)), input);
        assert_eq!(struct_to_json(&json_to_struct(&input)), input);
    }

    #[test]
    fn non_object_becomes_wrapped_struct() {
        assert_eq!(
            struct_to_json(&json_to_struct(&json!(5))),
            json!({"value": 5})
        );
    }

    #[test]
    fn nul_characters_are_replaced_everywhere_in_a_document() {
        let mut doc = serde_json::json!({
            "a\u{0}b": ["x\u{0}", {"k": "\u{0}\u{0}"}, 1, null, true],
            "plain": "ok",
        });
        make_storable_json(&mut doc);
        assert_eq!(
            doc,
            serde_json::json!({
                "a\u{fffd}b": ["x\u{fffd}", {"k": "\u{fffd}\u{fffd}"}, 1, null, true],
                "plain": "ok",
            })
        );
        let mut value = json_to_value(&serde_json::json!({"a\u{0}": ["\u{0}", {"b": "c\u{0}"}]}));
        make_storable_value(&mut value);
        assert_eq!(
            value_to_json(&value),
            serde_json::json!({"a\u{fffd}": ["\u{fffd}", {"b": "c\u{fffd}"}]})
        );
        let mut text = "no nul".to_owned();
        make_storable_text(&mut text);
        assert_eq!(text, "no nul");
    }

    #[test]
    fn a_document_is_storable_exactly_when_making_it_storable_changes_nothing() {
        for doc in [
            serde_json::json!({"a": ["x", {"k": "v"}, 1, null, true]}),
            serde_json::json!({"a\u{0}": 1}),
            serde_json::json!({"a": [1, {"k": "v\u{0}"}]}),
            serde_json::json!("\u{0}"),
            serde_json::json!(null),
        ] {
            let mut stored = doc.clone();
            make_storable_json(&mut stored);
            assert_eq!(is_storable_json(&doc), stored == doc, "{doc}");
        }
    }
}
