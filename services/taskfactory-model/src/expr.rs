//! Expressions and templates: one sandboxed engine (minijinja) for `forEach`, `when`, event
//! `filter`s, `dedupeKey`s and every string in `params`.
//!
//! - An *expression* (`forEach`, `when`, `filter`) is Jinja expression syntax: `item.amount > 0`.
//! - A *template* is any string containing `{{ … }}` or `{% … %}`. A string that is exactly one
//!   `{{ expr }}` keeps the expression's JSON type (`"{{ item.amount }}"` renders the number `42`,
//!   not the string `"42"`); any other template renders to a string. Strings without template
//!   syntax are literals and never touch the engine.
//! - Evaluation is bounded: a fuel limit per evaluation (so `range(10**9)` or a runaway loop stops
//!   with an error), and a limit on the bytes one task's params may render to.
//! - Undefined values are errors where they would be silently wrong (printing `item.emial`, a
//!   whole-string expression that is undefined), and false in conditions (`when: item.flag`).

use minijinja::value::{Serde, Value};
use minijinja::{AutoEscape, Environment, Expression, Template, UndefinedBehavior};

/// Bounds on one evaluation.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// Instruction fuel per expression or template evaluation.
    pub fuel: u64,
    /// Bytes of rendered params per task.
    pub max_output_bytes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            fuel: 50_000,
            max_output_bytes: 1024 * 1024,
        }
    }
}

/// An expression or template failed to compile or to evaluate.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct ExprError {
    pub message: String,
}

impl ExprError {
    fn new(message: impl Into<String>) -> Self {
        Self {
            message: message.into(),
        }
    }

    fn from_minijinja(e: &minijinja::Error) -> Self {
        if let Some(detail) = e.detail()
            && crate::expr_strict::is_comparison_error(detail)
        {
            return Self::new(detail);
        }
        let mut message = e.to_string();
        if let Some(detail) = e.detail()
            && !message.contains(detail)
        {
            message = format!("{message}: {detail}");
        }
        if e.kind() == minijinja::ErrorKind::OutOfFuel {
            message = "evaluation ran out of fuel (too much work for one expression; simplify it or shrink its input)".to_owned();
        }
        Self::new(message)
    }
}

/// A configured engine. Cheap to create; holds the environment that compiled expressions borrow.
pub struct Engine<'src> {
    env: Environment<'src>,
    limits: Limits,
}

impl<'src> Engine<'src> {
    pub fn new(limits: Limits) -> Self {
        let mut env = Environment::new();
        env.set_fuel(Some(limits.fuel));
        env.set_undefined_behavior(UndefinedBehavior::SemiStrict);
        env.set_auto_escape_callback(|_| AutoEscape::None);
        env.set_recursion_limit(64);
        crate::expr_strict::install(&mut env);
        Self { env, limits }
    }

    pub fn limits(&self) -> Limits {
        self.limits
    }

    /// Compiles an expression (`forEach`, `when`, `filter`).
    pub fn expression(&self, source: &'src str) -> Result<CompiledExpr<'_, 'src>, ExprError> {
        let trimmed = source.trim();
        if trimmed.is_empty() {
            return Err(ExprError::new("expression is empty"));
        }
        check_complexity(trimmed)?;
        if trimmed.contains("{{") || trimmed.contains("{%") {
            return Err(ExprError::new(format!(
                "{trimmed:?} is an expression, not a template: write it without {{{{ }}}}"
            )));
        }
        self.compile_strict(trimmed)
            .map(|expr| CompiledExpr { expr })
    }

    /// Compiles an expression with its comparisons made strict (see [`crate::expr_strict`]).
    fn compile_strict(&self, source: &'src str) -> Result<Expression<'_, 'src>, ExprError> {
        crate::expr_strict::check_reserved(source).map_err(ExprError::new)?;
        let as_written = || {
            self.env
                .compile_expression(source)
                .map_err(|e| ExprError::from_minijinja(&e))
        };
        match crate::expr_strict::rewrite(source) {
            // Also what does not parse: compiling it names the error in the user's text.
            crate::expr_strict::Rewrite::AsWritten => as_written(),
            crate::expr_strict::Rewrite::Strict(strict) => {
                match self.env.compile_expression_owned(strict) {
                    Ok(expr) => Ok(expr),
                    // The error of the user's text if it has one; else the rewrite's.
                    Err(_) => as_written().and_then(|_| {
                        Err(ExprError::new(
                            "its comparisons cannot be checked (too deeply nested once written \
                             out); simplify it",
                        ))
                    }),
                }
            }
            crate::expr_strict::Rewrite::Refused(why) => Err(ExprError::new(why)),
        }
    }

    /// Compiles one string of params (or a `dedupeKey`): a literal, a typed single expression, or
    /// a template.
    pub fn template(&self, source: &'src str) -> Result<CompiledTemplate<'_, 'src>, ExprError> {
        if !has_template_syntax(source) {
            return Ok(CompiledTemplate::Literal(source));
        }
        check_complexity(source)?;
        if let Some(inner) = single_expression(source) {
            return self.compile_strict(inner).map(CompiledTemplate::Expression);
        }
        crate::expr_strict::check_reserved(source).map_err(ExprError::new)?;
        self.env
            .template_from_str(source)
            .map(CompiledTemplate::Template)
            .map_err(|e| ExprError::from_minijinja(&e))
    }

    /// Compiles every string in a JSON tree of params. An error carries the path of the string
    /// that failed (`body.to`, `items[2]`).
    pub fn params(
        &self,
        params: &'src serde_json::Value,
    ) -> Result<CompiledParams<'_, 'src>, (String, ExprError)> {
        self.params_at(params, String::new())
    }

    fn params_at(
        &self,
        params: &'src serde_json::Value,
        path: String,
    ) -> Result<CompiledParams<'_, 'src>, (String, ExprError)> {
        let join = |key: &str| {
            if path.is_empty() {
                key.to_owned()
            } else {
                format!("{path}.{key}")
            }
        };
        Ok(match params {
            serde_json::Value::String(s) => {
                CompiledParams::String(self.template(s).map_err(|e| (path.clone(), e))?)
            }
            serde_json::Value::Array(items) => {
                let mut compiled = Vec::with_capacity(items.len());
                for (i, item) in items.iter().enumerate() {
                    compiled.push(self.params_at(item, format!("{path}[{i}]"))?);
                }
                CompiledParams::Array(compiled)
            }
            serde_json::Value::Object(map) => {
                let mut fields = Vec::with_capacity(map.len());
                for (key, value) in map {
                    fields.push((key.as_str(), self.params_at(value, join(key))?));
                }
                CompiledParams::Object(fields)
            }
            other => CompiledParams::Literal(other),
        })
    }
}

/// Items a `forEach` may yield at most (`maxTasks` bounds the tasks made from them).
pub const MAX_ITEMS: usize = 100_000;
/// The longest template or expression compiled.
pub const MAX_SOURCE_BYTES: usize = 64 * 1024;
/// Operators one expression (or one `{{ }}` / `{% %}` block) may chain.
pub const MAX_OPERATORS: usize = 256;

/// Refuses sources whose parse alone could exhaust the stack: the parser recurses once per
/// chained operator (`a + b + c …`, `x.a.b.c …`, `not not …`), and minijinja bounds nesting but
/// not chains. Counted per block, generously: real templates stay far below.
fn check_complexity(source: &str) -> Result<(), ExprError> {
    if source.len() > MAX_SOURCE_BYTES {
        return Err(ExprError::new(format!(
            "is {} bytes long; templates and expressions may have at most {MAX_SOURCE_BYTES}",
            source.len()
        )));
    }
    let blocks: Vec<&str> = if has_template_syntax(source) {
        source
            .split("{{")
            .chain(source.split("{%"))
            .skip(1)
            .map(|rest| {
                rest.split("}}")
                    .next()
                    .unwrap_or(rest)
                    .split("%}")
                    .next()
                    .unwrap_or(rest)
            })
            .collect()
    } else {
        vec![source]
    };
    for block in blocks {
        let symbols = block
            .chars()
            .filter(|c| "+-*/%~|.[(<>=!,:?".contains(*c))
            .count();
        let words = block
            .split(|c: char| !c.is_ascii_alphanumeric() && c != '_')
            .filter(|w| matches!(*w, "not" | "and" | "or" | "if" | "else" | "is" | "in"))
            .count();
        if symbols + words > MAX_OPERATORS {
            return Err(ExprError::new(format!(
                "is too complex: {} operators in one expression, at most {MAX_OPERATORS}; split it up",
                symbols + words
            )));
        }
    }
    Ok(())
}

fn has_template_syntax(s: &str) -> bool {
    s.contains("{{") || s.contains("{%") || s.contains("{#")
}

/// `"{{ expr }}"` with nothing else → `Some("expr")`.
fn single_expression(s: &str) -> Option<&str> {
    let inner = s.trim().strip_prefix("{{")?.strip_suffix("}}")?;
    let inner = inner.strip_prefix('-').unwrap_or(inner);
    let inner = inner.strip_suffix('-').unwrap_or(inner);
    if has_template_syntax(inner) || inner.contains("}}") || inner.trim().is_empty() {
        return None;
    }
    Some(inner.trim())
}

/// A compiled expression.
pub struct CompiledExpr<'env, 'src> {
    expr: Expression<'env, 'src>,
}

impl CompiledExpr<'_, '_> {
    pub fn eval(&self, scope: &Value) -> Result<Value, ExprError> {
        self.expr
            .eval(scope.clone())
            .map_err(|e| naming_undefined(&e, self.expr.undeclared_variables(true), scope))
    }

    /// [`Self::eval`], where undefined is an error naming what is undefined.
    fn eval_defined(&self, scope: &Value) -> Result<Value, ExprError> {
        let value = self.eval(scope)?;
        if value.is_undefined() {
            return Err(
                undefined_names(self.expr.undeclared_variables(true), scope).map_or_else(
                    || ExprError::new("is undefined (check the names it uses)"),
                    ExprError::new,
                ),
            );
        }
        Ok(value)
    }

    /// A key, as flow control reads one (`event.customer_id`): a string as it is, any other
    /// defined value as its JSON text (`42`, `true`, `null`, `["a",1]`). Undefined is an error
    /// naming what is undefined: a key must not silently put every event in one bucket.
    pub fn eval_key(&self, scope: &Value) -> Result<String, ExprError> {
        let value = self.eval_defined(scope)?;
        if let Some(text) = value.as_str() {
            return Ok(text.to_owned());
        }
        serde_json::to_string(&value)
            .map_err(|e| ExprError::new(format!("cannot be used as a key: {e}")))
    }

    /// A priority: a number (a fraction is cut to its integer part; beyond the range of a
    /// 64-bit integer it is clamped). Anything else is an error naming what it was.
    pub fn eval_priority(&self, scope: &Value) -> Result<i64, ExprError> {
        let value = self.eval_defined(scope)?;
        if value.kind() == minijinja::value::ValueKind::Number {
            if let Some(n) = value.as_i64() {
                return Ok(n);
            }
            if let Ok(n) = f64::try_from(value.clone())
                && !n.is_nan()
            {
                // `as` saturates at the ends of the range.
                return Ok(n.trunc() as i64);
            }
        }
        Err(ExprError::new(format!(
            "must be a number, not {} ({value})",
            value.kind()
        )))
    }

    /// Truthiness, as in `when` and `filter`: undefined and null are false.
    pub fn eval_bool(&self, scope: &Value) -> Result<bool, ExprError> {
        Ok(self.eval(scope)?.is_true())
    }

    /// A list, as `forEach` needs: every element, in order.
    pub fn eval_list(&self, scope: &Value) -> Result<Vec<Value>, ExprError> {
        let value = self.eval_defined(scope)?;
        match value.kind() {
            minijinja::value::ValueKind::Seq | minijinja::value::ValueKind::Iterable => {
                // Lazily repeated or generated sequences are only counted here: stop at the cap.
                let items: Vec<Value> = value
                    .try_iter()
                    .map_err(|e| ExprError::from_minijinja(&e))?
                    .take(MAX_ITEMS + 1)
                    .collect();
                if items.len() > MAX_ITEMS {
                    return Err(ExprError::new(format!(
                        "yielded more than {MAX_ITEMS} items; narrow it"
                    )));
                }
                Ok(items)
            }
            kind => Err(ExprError::new(format!(
                "yielded {kind}{}, not a list",
                shape(&value)
            ))),
        }
    }
}

/// The names of global functions (`range`, `dict`, …): used by expressions, never in a scope.
static GLOBALS: std::sync::LazyLock<std::collections::HashSet<String>> =
    std::sync::LazyLock::new(|| {
        Environment::new()
            .globals()
            .map(|(name, _)| name.to_owned())
            .chain([crate::expr_strict::COMPARE.to_owned()])
            .collect()
    });

/// The error of a failed evaluation; one about an undefined value names what is undefined
/// (`item.emial is undefined`) when the names the source reads tell.
fn naming_undefined(
    error: &minijinja::Error,
    names: std::collections::HashSet<String>,
    scope: &Value,
) -> ExprError {
    if error.kind() == minijinja::ErrorKind::UndefinedError
        && let Some(message) = undefined_names(names, scope)
    {
        return ExprError::new(message);
    }
    ExprError::from_minijinja(error)
}

/// "`a.b` is undefined" for the names (dotted paths, as the source reads them) that `scope` lacks,
/// each by its shortest undefined prefix; `None` if every one is defined. Names only, never
/// values: a scope may hold what a context source returned.
fn undefined_names(names: std::collections::HashSet<String>, scope: &Value) -> Option<String> {
    let mut missing: Vec<String> = Vec::new();
    for name in names {
        let mut value = scope.clone();
        let mut path = String::new();
        for (i, segment) in name.split('.').enumerate() {
            if i == 0 && GLOBALS.contains(segment) {
                break;
            }
            if !path.is_empty() {
                path.push('.');
            }
            path.push_str(segment);
            value = value.get_attr(segment).unwrap_or(Value::UNDEFINED);
            if value.is_undefined() {
                missing.push(path);
                break;
            }
        }
    }
    missing.sort();
    missing.dedup();
    match missing.as_slice() {
        [] => None,
        [one] => Some(format!("{one} is undefined")),
        [rest @ .., last] => Some(format!("{} and {last} are undefined", rest.join(", "))),
    }
}

/// What an error may say of a value: its size, never its content (it may come from a
/// sensitive context source, and errors are stored and shown to viewers).
fn shape(value: &Value) -> String {
    match value.len() {
        Some(len) if value.kind() == minijinja::value::ValueKind::Map => {
            format!(" ({len} keys)")
        }
        Some(len) if value.kind() == minijinja::value::ValueKind::String => {
            format!(" ({len} characters)")
        }
        _ => String::new(),
    }
}

/// One compiled string.
pub enum CompiledTemplate<'env, 'src> {
    Literal(&'src str),
    Expression(Expression<'env, 'src>),
    Template(Template<'env, 'src>),
}

impl CompiledTemplate<'_, '_> {
    /// Renders to JSON: literals and templates become strings, a single expression keeps its type.
    pub fn render(&self, scope: &Value) -> Result<serde_json::Value, ExprError> {
        match self {
            CompiledTemplate::Literal(s) => Ok(serde_json::Value::String((*s).to_owned())),
            CompiledTemplate::Expression(expr) => {
                let value = expr
                    .eval(scope.clone())
                    .map_err(|e| naming_undefined(&e, expr.undeclared_variables(true), scope))?;
                if value.is_undefined() {
                    return Err(undefined_names(expr.undeclared_variables(true), scope)
                        .map_or_else(
                            || ExprError::new("expression is undefined (check the names it uses)"),
                            ExprError::new,
                        ));
                }
                serde_json::to_value(&value)
                    .map_err(|e| ExprError::new(format!("result is not JSON: {e}")))
            }
            CompiledTemplate::Template(template) => template
                .render(scope.clone())
                .map(serde_json::Value::String)
                .map_err(|e| naming_undefined(&e, template.undeclared_variables(true), scope)),
        }
    }

    /// Renders to a string (for keys and names): a typed result is written as JSON text.
    pub fn render_string(&self, scope: &Value) -> Result<String, ExprError> {
        Ok(match self.render(scope)? {
            serde_json::Value::String(s) => s,
            other => other.to_string(),
        })
    }
}

/// A compiled JSON tree of params.
pub enum CompiledParams<'env, 'src> {
    Literal(&'src serde_json::Value),
    String(CompiledTemplate<'env, 'src>),
    Array(Vec<CompiledParams<'env, 'src>>),
    Object(Vec<(&'src str, CompiledParams<'env, 'src>)>),
}

impl CompiledParams<'_, '_> {
    /// Renders the whole tree, failing if it grows past `max_bytes` of strings.
    pub fn render(&self, scope: &Value, max_bytes: usize) -> Result<serde_json::Value, ExprError> {
        let mut budget = max_bytes;
        self.render_inner(scope, &mut budget, "params")
    }

    fn render_inner(
        &self,
        scope: &Value,
        budget: &mut usize,
        path: &str,
    ) -> Result<serde_json::Value, ExprError> {
        let value = match self {
            CompiledParams::Literal(v) => (*v).clone(),
            CompiledParams::String(t) => {
                let rendered = t
                    .render(scope)
                    .map_err(|e| ExprError::new(format!("{path}: {}", e.message)))?;
                let size = match &rendered {
                    serde_json::Value::String(s) => s.len(),
                    other => other.to_string().len(),
                };
                *budget = budget.checked_sub(size).ok_or_else(|| {
                    ExprError::new(format!("{path}: rendered params exceed the output limit"))
                })?;
                rendered
            }
            CompiledParams::Array(items) => {
                let mut out = Vec::with_capacity(items.len());
                for (i, item) in items.iter().enumerate() {
                    out.push(item.render_inner(scope, budget, &format!("{path}[{i}]"))?);
                }
                serde_json::Value::Array(out)
            }
            CompiledParams::Object(fields) => {
                let mut out = serde_json::Map::with_capacity(fields.len());
                for (key, field) in fields {
                    out.insert(
                        (*key).to_owned(),
                        field.render_inner(scope, budget, &format!("{path}.{key}"))?,
                    );
                }
                serde_json::Value::Object(out)
            }
        };
        Ok(value)
    }
}

/// JSON → engine value (done once per run for big inputs such as the context).
pub fn to_value(json: &serde_json::Value) -> Value {
    Value::from(Serde(json))
}

/// What an event's `filter` and `dedupeKey` see: `event` and `subject`. The event goes straight
/// into the engine's form, not through another JSON document first.
pub fn event_scope(event: &serde_json::Value, subject: &str) -> Value {
    minijinja::context! { event => to_value(event), subject => subject }
}

/// Engine value → JSON.
pub fn from_value(value: &Value) -> serde_json::Value {
    serde_json::to_value(value).unwrap_or(serde_json::Value::Null)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn scope(json: serde_json::Value) -> Value {
        to_value(&json)
    }

    #[test]
    fn an_event_scope_reads_as_the_json_document_it_replaces() {
        let event = json!({"kind": "x", "items": [{"n": 1}, {"n": 2}], "z": null});
        let direct = event_scope(&event, "events.a");
        let through_json = to_value(&json!({"event": event, "subject": "events.a"}));
        let engine = Engine::new(Limits::default());
        for source in [
            "event.kind == 'x' and subject == 'events.a'",
            "event.items | length",
            "event.items[1].n",
            "event.z is none",
            "event | tojson",
            "event.missing is defined",
        ] {
            let expression = engine.expression(source).unwrap();
            assert_eq!(
                expression.eval(&direct).map(|v| from_value(&v)),
                expression.eval(&through_json).map(|v| from_value(&v)),
                "{source}"
            );
        }
    }

    #[test]
    fn a_key_is_a_string_as_it_is_and_any_other_value_as_json() {
        let engine = Engine::new(Limits::default());
        let s = event_scope(
            &json!({"customer": "c-1", "n": 42, "ok": true, "z": null, "tags": ["a", 1]}),
            "events.a",
        );
        for (source, key) in [
            ("event.customer", "c-1"),
            ("event.n", "42"),
            ("event.ok", "true"),
            ("event.z", "null"),
            ("event.tags", r#"["a",1]"#),
            ("event.customer ~ '/' ~ subject", "c-1/events.a"),
        ] {
            assert_eq!(
                engine.expression(source).unwrap().eval_key(&s).unwrap(),
                key,
                "{source}"
            );
        }
        let error = engine
            .expression("event.custmer")
            .unwrap()
            .eval_key(&s)
            .unwrap_err();
        assert!(
            error.message.contains("event.custmer is undefined"),
            "{error:?}"
        );
    }

    #[test]
    fn a_priority_is_a_number() {
        let engine = Engine::new(Limits::default());
        let s = event_scope(
            &json!({"tier": "gold", "n": 7, "f": -2.9, "big": 1e300, "s": "5"}),
            "events.a",
        );
        for (source, priority) in [
            ("100 if event.tier == 'gold' else 0", 100),
            ("event.n", 7),
            ("event.f", -2),
            ("event.big", i64::MAX),
            ("-event.big", i64::MIN),
        ] {
            assert_eq!(
                engine
                    .expression(source)
                    .unwrap()
                    .eval_priority(&s)
                    .unwrap(),
                priority,
                "{source}"
            );
        }
        for (source, says) in [
            ("event.s", "must be a number, not string"),
            ("none", "must be a number, not none"),
            ("event.tierr", "event.tierr is undefined"),
        ] {
            let error = engine
                .expression(source)
                .unwrap()
                .eval_priority(&s)
                .unwrap_err();
            assert!(error.message.contains(says), "{source}: {error:?}");
        }
    }

    #[test]
    fn single_expression_keeps_its_type() {
        let engine = Engine::new(Limits::default());
        let s = scope(json!({"item": {"amount": 42, "email": "a@b.c", "tags": ["x"]}}));
        let t = engine.template("{{ item.amount }}").unwrap();
        assert_eq!(t.render(&s).unwrap(), json!(42));
        let t = engine.template("{{ item.tags }}").unwrap();
        assert_eq!(t.render(&s).unwrap(), json!(["x"]));
        let t = engine.template("to {{ item.email }}").unwrap();
        assert_eq!(t.render(&s).unwrap(), json!("to a@b.c"));
        let t = engine
            .template("{{ item.email }} and {{ item.amount }}")
            .unwrap();
        assert_eq!(t.render(&s).unwrap(), json!("a@b.c and 42"));
        let t = engine.template("plain").unwrap();
        assert_eq!(t.render(&s).unwrap(), json!("plain"));
    }

    #[test]
    fn undefined_names_are_errors_when_rendered_and_false_in_conditions() {
        let engine = Engine::new(Limits::default());
        let s = scope(json!({"item": {"email": "a@b.c"}}));
        assert!(
            engine
                .template("{{ item.emial }}")
                .unwrap()
                .render(&s)
                .is_err()
        );
        assert!(
            engine
                .template("to {{ item.emial }}")
                .unwrap()
                .render(&s)
                .is_err()
        );
        assert!(
            !engine
                .expression("item.flag")
                .unwrap()
                .eval_bool(&s)
                .unwrap()
        );
    }

    #[test]
    fn an_undefined_name_is_named_in_expressions_and_templates_alike() {
        let engine = Engine::new(Limits::default());
        let s = scope(json!({"item": {"email": "a@b.c"}, "event": {"tier": "gold"}}));
        let render = |source: &'static str| {
            engine
                .template(source)
                .unwrap()
                .render(&s)
                .unwrap_err()
                .message
        };
        assert_eq!(render("{{ item.emial }}"), "item.emial is undefined");
        assert_eq!(render("to {{ item.emial }}!"), "item.emial is undefined");
        assert_eq!(
            render("{{ item.email ~ order.id }}"),
            "order is undefined",
            "the shortest undefined prefix"
        );
        let eval = |source: &'static str| {
            engine
                .expression(source)
                .unwrap()
                .eval_bool(&s)
                .unwrap_err()
                .message
        };
        // A filter comparing a missing field names it (it was "undefined value").
        assert_eq!(eval("amount > 100"), "amount is undefined");
        assert_eq!(eval("event.amount > 100"), "event.amount is undefined");
        assert_eq!(
            eval("event.amount > event.limit"),
            "event.amount and event.limit are undefined"
        );
        assert_eq!(
            engine
                .expression("item.emails")
                .unwrap()
                .eval_list(&s)
                .unwrap_err()
                .message,
            "item.emails is undefined"
        );
        // Functions are not names of the scope; a defined test and a condition stay as they were.
        assert!(
            engine
                .expression("range(3) | length > 2 and missing is not defined")
                .unwrap()
                .eval_bool(&s)
                .unwrap()
        );
        assert!(
            !engine
                .expression("item.flag")
                .unwrap()
                .eval_bool(&s)
                .unwrap()
        );
    }

    #[test]
    fn for_each_needs_a_list() {
        let engine = Engine::new(Limits::default());
        let s =
            scope(json!({"event": {"items": [1, 2, 3], "obj": {"a": 1}, "token": "s3cr3t-value"}}));
        let items = engine
            .expression("event.items")
            .unwrap()
            .eval_list(&s)
            .unwrap();
        assert_eq!(items.len(), 3);
        let err = engine
            .expression("event.obj")
            .unwrap()
            .eval_list(&s)
            .unwrap_err();
        assert!(err.message.contains("not a list"), "{err}");
        assert!(err.message.contains("map (1 keys)"), "{err}");
        // An error says what a value is, never what it holds (it may be a sensitive source's).
        let err = engine
            .expression("event.token")
            .unwrap()
            .eval_list(&s)
            .unwrap_err();
        assert!(!err.message.contains("s3cr3t"), "{err}");
        assert!(err.message.contains("(12 characters)"), "{err}");
        let err = engine
            .expression("event.nope")
            .unwrap()
            .eval_list(&s)
            .unwrap_err();
        assert!(err.message.contains("undefined"), "{err}");
    }

    #[test]
    fn runaway_evaluation_runs_out_of_fuel() {
        let engine = Engine::new(Limits {
            fuel: 10_000,
            max_output_bytes: 1 << 20,
        });
        let t = engine
            .template("{% for i in range(100000) %}{{ i }}{% endfor %}")
            .unwrap();
        let err = t.render(&scope(json!({}))).unwrap_err();
        assert!(err.message.contains("fuel"), "{err}");
    }

    #[test]
    fn params_tree_renders_with_paths_in_errors_and_an_output_cap() {
        let engine = Engine::new(Limits::default());
        let params = json!({"url": "https://x/{{ item.id }}", "body": {"n": "{{ item.n }}", "k": [true, "{{ index }}"]}});
        let compiled = engine.params(&params).unwrap();
        let out = compiled
            .render(
                &scope(json!({"item": {"id": "a", "n": 1.5}, "index": 3})),
                1 << 20,
            )
            .unwrap();
        assert_eq!(
            out,
            json!({"url": "https://x/a", "body": {"n": 1.5, "k": [true, 3]}})
        );
        let err = compiled
            .render(&scope(json!({"item": {"id": "a"}, "index": 3})), 1 << 20)
            .unwrap_err();
        assert!(err.message.contains("params.body.n"), "{err}");
        let err = compiled
            .render(&scope(json!({"item": {"id": "a", "n": 1}, "index": 3})), 5)
            .unwrap_err();
        assert!(err.message.contains("output limit"), "{err}");
    }

    #[test]
    fn compile_errors_are_reported() {
        let engine = Engine::new(Limits::default());
        assert!(engine.expression("item.amount >").is_err());
        assert!(engine.expression("{{ item }}").is_err());
        assert!(engine.template("{{ item.amount ").is_err());
        assert!(engine.template("{% if %}").is_err());
    }
}
