//! What a fire of an activity with `flow.concurrency` carries to the orchestrator: its
//! concurrency key, the limit, and its priority, computed by the trigger when it fires (an event
//! whose key or priority cannot be computed is not fired: it is that event's `KEY_ERROR`).

use taskfactory_proto::v1::{ActivitySpec, FlowAdmission};

use crate::expr::ExprError;
use crate::values;

/// The admission of a fire of `spec`, if it has `flow.concurrency`: `key` computes a key
/// expression and `priority` a priority expression (over the event, or a manual fire's payload).
/// `Err` names the field that failed and why.
pub fn admission(
    spec: &ActivitySpec,
    key: impl FnOnce(&str) -> Result<String, ExprError>,
    priority: impl FnOnce(&str) -> Result<i64, ExprError>,
) -> Result<Option<FlowAdmission>, String> {
    let Some(flow) = spec.flow.as_ref() else {
        return Ok(None);
    };
    let Some(concurrency) = flow.concurrency.as_ref() else {
        return Ok(None);
    };
    let mut concurrency_key = if concurrency.key.trim().is_empty() {
        String::new()
    } else {
        key(&concurrency.key).map_err(|e| format!("flow.concurrency.key: {}", e.message))?
    };
    values::make_storable_key(&mut concurrency_key);
    let priority = if flow.priority.trim().is_empty() {
        0
    } else {
        priority(&flow.priority).map_err(|e| format!("flow.priority: {}", e.message))?
    };
    Ok(Some(FlowAdmission {
        concurrency_key,
        concurrency_limit: concurrency.limit,
        priority,
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
}
