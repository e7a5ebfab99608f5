//! Every spec in `examples/` loads, validates, and evaluates.

use taskfactory_model::plan::{PlanLimits, Scope, plan_tasks};
use taskfactory_model::spec::{spec_from_yaml, validate};

#[test]
fn every_example_loads_and_validates() {
    let dir = taskfactory_tests::workspace_root().join("examples");
    let mut seen = 0;
    for entry in std::fs::read_dir(&dir).expect("examples/ exists") {
        let path = entry.expect("a directory entry").path();
        // Specs are the YAML and JSON files; directories hold other examples (executors).
        if !matches!(
            path.extension().and_then(|e| e.to_str()),
            Some("yaml" | "yml" | "json")
        ) {
            continue;
        }
        let text = std::fs::read_to_string(&path).expect("readable");
        let spec = spec_from_yaml(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        validate(&spec, chrono::Utc::now()).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        assert_eq!(
            path.file_stem().and_then(|s| s.to_str()),
            Some(spec.name.as_str()),
            "file names match activity names"
        );
        seen += 1;
    }
    assert!(seen >= 4);
}

#[test]
fn order_fulfilment_example_fans_out_over_lines() {
    let path = taskfactory_tests::workspace_root().join("examples/order-fulfilment.yaml");
    let spec = spec_from_yaml(&std::fs::read_to_string(path).unwrap()).unwrap();
    let event = serde_json::json!({
        "order_id": "o-1", "customer": "ada@example.com",
        "lines": [{"sku": "A-1", "qty": 2}, {"sku": "B-7", "qty": 1, "cancelled": true}]
    });
    let scope = Scope {
        trigger: serde_json::json!({}),
        event,
        context: serde_json::json!({}),
        activity: serde_json::json!({"name": "order-fulfilment"}),
    };
    let plan = plan_tasks(&spec, &scope, &PlanLimits::default());
    assert_eq!(plan.error, None);
    assert_eq!(plan.tasks.len(), 2);
    assert_eq!(plan.tasks[0].params["quantity"], 2);
    assert_eq!(plan.tasks[1].params["payload"]["to"], "ada@example.com");
}

#[test]
fn nightly_report_example_has_defaults_for_a_bare_manual_fire() {
    let path = taskfactory_tests::workspace_root().join("examples/nightly-report.json");
    let spec = spec_from_yaml(&std::fs::read_to_string(path).unwrap()).unwrap();
    let scope = Scope {
        trigger: serde_json::json!({}),
        event: serde_json::json!({}),
        context: serde_json::json!({}),
        activity: serde_json::json!({}),
    };
    let plan = plan_tasks(&spec, &scope, &PlanLimits::default());
    assert_eq!(plan.error, None);
    assert_eq!(plan.tasks[0].params["report"], "daily");
}
