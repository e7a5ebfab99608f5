//! Turning task templates into tasks: the evaluation at the heart of a run.
//!
//! Given the spec and what is in scope (`trigger`, `event`, `context`, `activity`), each template's
//! `forEach` yields items, `when` keeps or drops each, and `params` render per kept item. The
//! result is the list of tasks plus an evaluation per template (items seen, tasks made, why items
//! were dropped, the error) that the run stores so every fire is explainable.
//!
//! All or nothing: if any template fails (an expression error, fuel exhausted, over `maxTasks`),
//! the plan carries the error and the run makes no tasks.

use std::time::Duration;

use minijinja::value::Value;
use taskfactory_proto::v1::{ActivitySpec, RetryPolicy, TemplateEvaluation};

use crate::expr::{self, Engine, Limits};
use crate::spec::{effective_retry, effective_timeout, std_duration};

/// Bounds on one run's evaluation.
#[derive(Clone, Copy, Debug)]
pub struct PlanLimits {
    pub expr: Limits,
    /// Tasks one run may make across all templates (a template's `maxTasks` may only lower it).
    pub max_tasks_per_run: usize,
    /// Wall-clock time one run's evaluation may take (fuel bounds each expression; this bounds
    /// their sum over many items).
    pub max_duration: Duration,
    /// Bytes of rendered params one run may produce across all its tasks.
    pub max_run_bytes: usize,
}

impl Default for PlanLimits {
    fn default() -> Self {
        Self {
            expr: Limits::default(),
            max_tasks_per_run: 10_000,
            max_duration: Duration::from_millis(800),
            max_run_bytes: 64 * 1024 * 1024,
        }
    }
}

/// What is in scope for the templates.
pub struct Scope {
    pub trigger: serde_json::Value,
    pub event: serde_json::Value,
    pub context: serde_json::Value,
    pub activity: serde_json::Value,
}

/// One task to make.
#[derive(Clone, Debug, PartialEq)]
pub struct PlannedTask {
    pub template: String,
    pub item_index: u32,
    pub task_type: String,
    pub params: serde_json::Value,
    pub retry: RetryPolicy,
    pub timeout: Duration,
    /// Under its template's `concurrency`: the key it counts against and its limit.
    pub concurrency: Option<TaskKey>,
}

/// The concurrency key a task counts against ([`TaskKey::scoped`] is what is stored).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TaskKey {
    /// The key expression's value, made storable (empty: no key expression).
    pub value: String,
    pub limit: u32,
    /// Counted with every activity's tasks of the same key (scope GLOBAL), not the activity's.
    pub global: bool,
}

impl TaskKey {
    /// The key as counted: `global:<value>` for scope GLOBAL, `<activity id>:<value>` otherwise.
    pub fn scoped(&self, activity: &str) -> String {
        if self.global {
            format!("global:{}", self.value)
        } else {
            format!("{activity}:{}", self.value)
        }
    }

    /// The key as a user reads it, from its scoped form: the value, or `global:<value>`.
    pub fn shown(scoped: &str) -> &str {
        if scoped.starts_with("global:") {
            return scoped;
        }
        scoped.split_once(':').map_or(scoped, |(_, value)| value)
    }
}

#[derive(Debug, Default)]
pub struct Plan {
    pub tasks: Vec<PlannedTask>,
    pub evaluation: Vec<TemplateEvaluation>,
    /// Set when the run must fail: which template, and why.
    pub error: Option<String>,
    /// Bytes of rendered params the tasks carry (what `max_run_bytes` bounds).
    pub bytes: usize,
}

/// Evaluates every template of `spec` against `scope`.
pub fn plan_tasks(spec: &ActivitySpec, scope: &Scope, limits: &PlanLimits) -> Plan {
    let engine = Engine::new(limits.expr);
    let mut budget = Budget {
        deadline: std::time::Instant::now() + limits.max_duration,
        max_duration: limits.max_duration,
        bytes_left: limits.max_run_bytes,
        max_bytes: limits.max_run_bytes,
    };
    let base = BaseScope {
        trigger: expr::to_value(&scope.trigger),
        event: expr::to_value(&scope.event),
        context: expr::to_value(&scope.context),
        activity: expr::to_value(&scope.activity),
    };
    let mut plan = Plan::default();
    for template in &spec.tasks {
        let remaining = limits.max_tasks_per_run.saturating_sub(plan.tasks.len());
        let cap = if template.max_tasks == 0 {
            remaining
        } else {
            (template.max_tasks as usize).min(remaining)
        };
        let mut evaluation = TemplateEvaluation {
            template: template.name.clone(),
            ..Default::default()
        };
        match plan_template(
            &engine,
            template,
            &base,
            cap,
            limits,
            &mut budget,
            &mut evaluation,
        ) {
            Ok(tasks) => {
                evaluation.tasks = u32::try_from(tasks.len()).unwrap_or(u32::MAX);
                plan.tasks.extend(tasks);
            }
            Err(error) => {
                evaluation.error = error.clone();
                if plan.error.is_none() {
                    plan.error = Some(format!("template {:?}: {error}", template.name));
                }
            }
        }
        plan.evaluation.push(evaluation);
    }
    if plan.error.is_some() {
        plan.tasks.clear();
    } else {
        plan.bytes = budget.max_bytes.saturating_sub(budget.bytes_left);
    }
    plan
}

/// What is left of a run's time and output.
struct Budget {
    deadline: std::time::Instant,
    max_duration: Duration,
    bytes_left: usize,
    max_bytes: usize,
}

impl Budget {
    fn check_time(&self, done: usize) -> Result<(), String> {
        if std::time::Instant::now() > self.deadline {
            return Err(format!(
                "evaluating took longer than {:?} ({done} items done); the templates do too much work per item or there are too many items",
                self.max_duration
            ));
        }
        Ok(())
    }

    fn spend(&mut self, rendered: &serde_json::Value) -> Result<(), String> {
        let size = serde_json::to_vec(rendered)
            .map(|b| b.len())
            .unwrap_or(usize::MAX);
        self.bytes_left = self.bytes_left.checked_sub(size).ok_or_else(|| {
            format!(
                "the run's tasks would carry more than {} bytes of params; make fewer or smaller tasks",
                self.max_bytes
            )
        })?;
        Ok(())
    }
}

/// The scope shared by every item, converted once per run.
struct BaseScope {
    trigger: Value,
    event: Value,
    context: Value,
    activity: Value,
}

impl BaseScope {
    fn with_item(&self, item: Value, index: usize) -> Value {
        minijinja::context! {
            trigger => self.trigger.clone(),
            event => self.event.clone(),
            context => self.context.clone(),
            activity => self.activity.clone(),
            item => item,
            index => index,
        }
    }
}

fn plan_template(
    engine: &Engine<'_>,
    template: &taskfactory_proto::v1::TaskTemplate,
    base: &BaseScope,
    cap: usize,
    limits: &PlanLimits,
    budget: &mut Budget,
    evaluation: &mut TemplateEvaluation,
) -> Result<Vec<PlannedTask>, String> {
    let scope_with = |item: Value, index: usize| base.with_item(item, index);
    let items: Vec<Value> = if template.for_each.trim().is_empty() {
        vec![Value::UNDEFINED]
    } else {
        let for_each = engine
            .expression(&template.for_each)
            .map_err(|e| format!("forEach: {e}"))?;
        for_each
            .eval_list(&scope_with(Value::UNDEFINED, 0))
            .map_err(|e| format!("forEach {:?} {e}", template.for_each))?
    };
    evaluation.items = u32::try_from(items.len()).unwrap_or(u32::MAX);
    let when = if template.when.trim().is_empty() {
        None
    } else {
        Some(
            engine
                .expression(&template.when)
                .map_err(|e| format!("when: {e}"))?,
        )
    };
    let params_json = template
        .params
        .as_ref()
        .map(crate::values::struct_to_json)
        .unwrap_or_else(|| serde_json::Value::Object(Default::default()));
    let params = engine
        .params(&params_json)
        .map_err(|(path, e)| format!("params.{path}: {e}"))?;
    let concurrency = match &template.concurrency {
        Some(c) if !c.key.trim().is_empty() => Some((
            c,
            Some(
                engine
                    .expression(&c.key)
                    .map_err(|e| format!("concurrency.key: {e}"))?,
            ),
        )),
        Some(c) => Some((c, None)),
        None => None,
    };
    let retry = effective_retry(template.retry.as_ref());
    let timeout = std_duration(&effective_timeout(template)).unwrap_or(Duration::from_secs(60));

    let mut tasks = Vec::new();
    let mut dropped = 0usize;
    budget.check_time(0)?;
    for (index, item) in items.into_iter().enumerate() {
        budget.check_time(index)?;
        let scope = scope_with(item, index);
        if let Some(when) = &when {
            let keep = when
                .eval_bool(&scope)
                .map_err(|e| format!("when, item {index}: {e}"))?;
            if !keep {
                dropped += 1;
                continue;
            }
        }
        if tasks.len() >= cap {
            return Err(format!(
                "produced more than {cap} tasks; raise maxTasks or narrow forEach/when"
            ));
        }
        let rendered = params
            .render(&scope, limits.expr.max_output_bytes)
            .map_err(|e| format!("item {index}: {e}"))?;
        budget.spend(&rendered)?;
        let concurrency = match &concurrency {
            None => None,
            Some((c, key)) => {
                let mut value = match key {
                    None => String::new(),
                    Some(key) => key
                        .eval_key(
                            &minijinja::context! { params => expr::to_value(&rendered), ..scope },
                        )
                        .map_err(|e| format!("concurrency.key {:?}, item {index}: {e}", c.key))?,
                };
                crate::values::make_storable_key(&mut value);
                Some(TaskKey {
                    value,
                    limit: c.limit,
                    global: c.scope() == taskfactory_proto::v1::task_concurrency::Scope::Global,
                })
            }
        };
        tasks.push(PlannedTask {
            concurrency,
            template: template.name.clone(),
            item_index: u32::try_from(index).unwrap_or(u32::MAX),
            task_type: template.r#type.clone(),
            params: rendered,
            retry,
            timeout,
        });
    }
    if dropped > 0 {
        evaluation.notes.push(format!(
            "{dropped} of {} items excluded by when: {}",
            evaluation.items,
            template.when.trim()
        ));
    }
    Ok(tasks)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spec::spec_from_yaml;
    use serde_json::json;

    fn scope(event: serde_json::Value) -> Scope {
        Scope {
            trigger: json!({"source": "event"}),
            event,
            context: json!({"limits": {"max": 3}}),
            activity: json!({"name": "a", "version": 1}),
        }
    }

    const SPEC: &str = r#"
name: a
trigger: {manual: {}}
tasks:
  - name: each
    type: log
    forEach: event.items
    when: item.n % 5 != 0
    params: {n: "{{ item.n }}", label: "item {{ index }} of {{ activity.name }}", max: "{{ context.limits.max }}"}
  - name: once
    type: log
    params: {source: "{{ trigger.source }}"}
"#;

    #[test]
    fn for_each_and_when_make_one_task_per_kept_item() {
        let spec = spec_from_yaml(SPEC).unwrap();
        let items: Vec<_> = (1..=25).map(|n| json!({"n": n})).collect();
        let plan = plan_tasks(
            &spec,
            &scope(json!({"items": items})),
            &PlanLimits::default(),
        );
        assert_eq!(plan.error, None);
        let each: Vec<_> = plan.tasks.iter().filter(|t| t.template == "each").collect();
        assert_eq!(each.len(), 20);
        assert_eq!(
            each[0].params,
            json!({"n": 1, "label": "item 0 of a", "max": 3})
        );
        assert_eq!(each[4].item_index, 5);
        assert_eq!(plan.evaluation[0].items, 25);
        assert_eq!(plan.evaluation[0].tasks, 20);
        assert!(plan.evaluation[0].notes[0].contains("5 of 25"));
        let once: Vec<_> = plan.tasks.iter().filter(|t| t.template == "once").collect();
        assert_eq!(once.len(), 1);
        assert_eq!(once[0].params, json!({"source": "event"}));
        assert_eq!(once[0].retry.max_attempts, 3);
    }

    #[test]
    fn a_failing_template_fails_the_whole_plan_with_its_name() {
        let spec = spec_from_yaml(SPEC).unwrap();
        let plan = plan_tasks(
            &spec,
            &scope(json!({"items": "nope"})),
            &PlanLimits::default(),
        );
        assert!(plan.tasks.is_empty());
        let error = plan.error.unwrap();
        assert!(
            error.contains("\"each\"") && error.contains("not a list"),
            "{error}"
        );
        assert!(!plan.evaluation[0].error.is_empty());
        assert!(plan.evaluation[1].error.is_empty());
    }

    #[test]
    fn max_tasks_caps_a_runaway_fan_out() {
        let spec = spec_from_yaml(SPEC).unwrap();
        let items: Vec<_> = (1..=100).map(|n| json!({"n": n})).collect();
        let limits = PlanLimits {
            max_tasks_per_run: 50,
            ..Default::default()
        };
        let plan = plan_tasks(&spec, &scope(json!({"items": items})), &limits);
        assert!(plan.error.unwrap().contains("more than 50 tasks"));
        assert!(plan.tasks.is_empty());
    }

    #[test]
    fn a_tasks_concurrency_key_sees_its_params_and_item_and_names_its_failure() {
        let spec = spec_from_yaml(
            r#"
name: a
trigger: {manual: {}}
tasks:
  - name: call
    type: http
    forEach: event.urls
    params: {url: "{{ item.url }}", host: "{{ item.host }}"}
    concurrency: {key: params.host, limit: 5}
  - name: any
    type: log
    concurrency: {limit: 2, scope: GLOBAL}
"#,
        )
        .unwrap();
        let urls = json!({"urls": [{"url": "https://a.example/1", "host": "a.example"}, {"url": "https://b.example/1", "host": "b.example"}]});
        let plan = plan_tasks(&spec, &scope(urls.clone()), &PlanLimits::default());
        assert_eq!(plan.error, None);
        let keys: Vec<_> = plan
            .tasks
            .iter()
            .map(|t| t.concurrency.clone().unwrap())
            .collect();
        assert_eq!(
            keys.iter()
                .map(|k| (k.value.as_str(), k.limit, k.global))
                .collect::<Vec<_>>(),
            [
                ("a.example", 5, false),
                ("b.example", 5, false),
                ("", 2, true)
            ]
        );
        assert_eq!(keys[0].scoped("act"), "act:a.example");
        assert_eq!(keys[2].scoped("act"), "global:");
        assert_eq!(TaskKey::shown("act:a.example"), "a.example");
        assert_eq!(TaskKey::shown("global:x"), "global:x");

        let mut spec = spec;
        spec.tasks[0].concurrency.as_mut().unwrap().key = "params.hots".to_owned();
        let plan = plan_tasks(&spec, &scope(urls), &PlanLimits::default());
        let error = plan.error.unwrap();
        assert!(
            error.contains("concurrency.key") && error.contains("params.hots is undefined"),
            "{error}"
        );
    }
}
