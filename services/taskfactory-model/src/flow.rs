//! What a fire of an activity with `flow.concurrency` or `flow.throttle` carries to the
//! orchestrator: its concurrency key and limit, its throttle's key and rate, and its priority,
//! computed by the trigger when it fires (an event whose key or priority cannot be computed is
//! not fired: it is that event's `KEY_ERROR`).

use taskfactory_proto::v1::{ActivitySpec, FlowAdmission, ThrottleAdmission};

use crate::expr::ExprError;
use crate::values;

/// The admission of a fire of `spec`, if it has `flow.concurrency` or `flow.throttle`: `key`
/// computes a key expression and `priority` a priority expression (over the event, or a manual
/// fire's payload). `Err` names the field that failed and why.
pub fn admission(
    spec: &ActivitySpec,
    mut key: impl FnMut(&str) -> Result<String, ExprError>,
    priority: impl FnOnce(&str) -> Result<i64, ExprError>,
) -> Result<Option<FlowAdmission>, String> {
    let Some(flow) = spec.flow.as_ref() else {
        return Ok(None);
    };
    if flow.concurrency.is_none() && flow.throttle.is_none() {
        return Ok(None);
    }
    let mut key_of = |source: &str, field: &str| -> Result<String, String> {
        let mut value = if source.trim().is_empty() {
            String::new()
        } else {
            key(source).map_err(|e| format!("{field}: {}", e.message))?
        };
        values::make_storable_key(&mut value);
        Ok(value)
    };
    let (concurrency_key, concurrency_limit) = match &flow.concurrency {
        Some(concurrency) => (
            key_of(&concurrency.key, "flow.concurrency.key")?,
            concurrency.limit,
        ),
        None => (String::new(), 0),
    };
    let throttle = match &flow.throttle {
        Some(throttle) => Some(ThrottleAdmission {
            key: key_of(&throttle.key, "flow.throttle.key")?,
            limit: throttle.limit,
            period: throttle.period,
            burst: throttle.burst.max(1),
        }),
        None => None,
    };
    let priority = if flow.priority.trim().is_empty() {
        0
    } else {
        priority(&flow.priority).map_err(|e| format!("flow.priority: {}", e.message))?
    };
    Ok(Some(FlowAdmission {
        concurrency_key,
        concurrency_limit,
        priority,
        throttle,
        arrival_ns: 0,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::expr::{Engine, Limits, event_scope};
    use crate::spec::spec_from_yaml;

    fn admit(yaml: &str, event: serde_json::Value) -> Result<Option<FlowAdmission>, String> {
        let spec = spec_from_yaml(yaml).unwrap();
        let engine = Engine::new(Limits::default());
        let scope = event_scope(&event, "events.x");
        admission(
            &spec,
            |source| engine.expression(source)?.eval_key(&scope),
            |source| engine.expression(source)?.eval_priority(&scope),
        )
    }

    const KEYED: &str = "name: k\ntrigger: {event: {subject: events.x}}\nflow: {concurrency: {key: event.customer, limit: 2}, priority: \"100 if event.tier == 'gold' else 0\"}\ntasks: [{name: t, type: noop}]\n";

    #[test]
    fn a_fire_carries_its_key_limit_and_priority() {
        assert_eq!(
            admit(KEYED, serde_json::json!({"customer": "c1", "tier": "gold"})),
            Ok(Some(FlowAdmission {
                concurrency_key: "c1".to_owned(),
                concurrency_limit: 2,
                priority: 100,
                throttle: None,
                arrival_ns: 0,
            }))
        );
        assert_eq!(
            admit(
                "name: k\ntrigger: {event: {subject: events.x}}\nflow: {concurrency: {limit: 1}}\ntasks: [{name: t, type: noop}]\n",
                serde_json::json!({})
            ),
            Ok(Some(FlowAdmission {
                concurrency_key: String::new(),
                concurrency_limit: 1,
                priority: 0,
                throttle: None,
                arrival_ns: 0,
            }))
        );
        assert_eq!(
            admit(
                "name: k\ntrigger: {event: {subject: events.x}}\ntasks: [{name: t, type: noop}]\n",
                serde_json::json!({})
            ),
            Ok(None)
        );
    }

    #[test]
    fn a_key_or_priority_that_fails_names_its_field() {
        let error = admit(KEYED, serde_json::json!({"tier": "gold"})).unwrap_err();
        assert!(
            error.starts_with("flow.concurrency.key: ")
                && error.contains("event.customer is undefined"),
            "{error}"
        );
        let error = admit(KEYED, serde_json::json!({"customer": "c1"})).unwrap_err();
        assert!(
            error.starts_with("flow.priority: ") && error.contains("event.tier is undefined"),
            "{error}"
        );
    }

    #[test]
    fn a_throttled_fire_carries_its_throttle() {
        let yaml = "name: k\ntrigger: {event: {subject: events.x}}\nflow: {throttle: {key: event.customer, limit: 10, period: 1s}, priority: event.rank}\ntasks: [{name: t, type: noop}]\n";
        let admitted = admit(yaml, serde_json::json!({"customer": "c1", "rank": 3}))
            .unwrap()
            .unwrap();
        assert_eq!(admitted.concurrency_limit, 0);
        assert_eq!(admitted.priority, 3);
        let throttle = admitted.throttle.unwrap();
        assert_eq!(
            (throttle.key.as_str(), throttle.limit, throttle.burst),
            ("c1", 10, 1)
        );
        assert_eq!(throttle.period.unwrap().seconds, 1);
        let error = admit(yaml, serde_json::json!({"rank": 3})).unwrap_err();
        assert!(
            error.starts_with("flow.throttle.key: ")
                && error.contains("event.customer is undefined"),
            "{error}"
        );
    }
}
