//! Strict comparisons: an expression is parsed (minijinja's own parser) and written out again with
//! every comparison (`==`, `!=`, `<`, `<=`, `>`, `>=`) turned into a call of [`COMPARE`], which
//! refuses to compare values of different types (`"abc" > 100`, `none < 3`, `true == 1`) instead
//! of ordering them by type as Jinja does. Everything else is written out as it was read, fully
//! parenthesised, so it evaluates as before.
//!
//! Equality with `none` stays allowed (`event.x == none` asks whether it is null), and so does
//! equality of two values of one type; ordering (`<`, `<=`, `>`, `>=`) is for two numbers or two
//! strings. The comparison tests (`is gt`, `select('>', 1)`, …) are made strict alike
//! ([`STRICT_TESTS`]); `sort`, `min` and `max` keep Jinja's order.
//!
//! Fails closed: an expression with a comparison that cannot be written out (a construct the
//! writer does not know, or a rewrite grown past its bound: chained comparisons repeat their
//! middle operand) is refused, never evaluated with Jinja's comparisons.

use std::fmt::Write as _;

use minijinja::machinery::ast::{self, BinOpKind, CallArg, CompareOpKind, Expr, UnaryOpKind};
use minijinja::value::{Value, ValueKind};
use minijinja::{Error, ErrorKind};

/// The function comparisons are written as: `__compare(left, "op", right, "the comparison")`.
/// Only the rewrite calls it: a source that names it is refused ([`check_reserved`]).
pub const COMPARE: &str = "__taskfactory_compare";

/// The comparison tests, made strict like the operators: name and operator.
const STRICT_TESTS: &[(&str, &str)] = &[
    ("eq", "=="),
    ("equalto", "=="),
    ("==", "=="),
    ("ne", "!="),
    ("!=", "!="),
    ("lt", "<"),
    ("lessthan", "<"),
    ("<", "<"),
    ("le", "<="),
    ("<=", "<="),
    ("gt", ">"),
    ("greaterthan", ">"),
    (">", ">"),
    ("ge", ">="),
    (">=", ">="),
];

/// Registers [`COMPARE`] and the strict comparison tests in `env`.
pub fn install(env: &mut minijinja::Environment<'_>) {
    env.add_function(
        COMPARE,
        |state: &minijinja::State<'_, '_>, left: Value, op: String, right: Value, text: String| {
            compare(state, &left, &op, &right, &text)
        },
    );
    for &(name, op) in STRICT_TESTS {
        env.add_test(
            name,
            move |state: &minijinja::State<'_, '_>, left: Value, right: Value| {
                compare(state, &left, op, &right, &format!("`is {name}`")).map(|v| v.is_true())
            },
        );
    }
}

/// Refuses a source that names [`COMPARE`] itself.
pub fn check_reserved(source: &str) -> Result<(), String> {
    if source.contains(COMPARE) {
        return Err(format!("{COMPARE} is reserved"));
    }
    Ok(())
}

/// How an expression is to be compiled.
#[derive(Debug, PartialEq, Eq)]
pub enum Rewrite {
    /// As written: it compares nothing (or does not parse: compiling it names the error).
    AsWritten,
    /// This source instead, its comparisons strict.
    Strict(String),
    /// Not at all: its comparisons could not be made strict.
    Refused(&'static str),
}

/// The most a rewrite may grow: chained comparisons repeat their middle operand, so nesting them
/// doubles the text at each level.
fn limit(source: &str) -> usize {
    source.len() * 8 + 4096
}

/// How `source` is to be compiled so that its comparisons are strict.
pub fn rewrite(source: &str) -> Rewrite {
    // Every comparison operator has one of these characters: without them there is nothing to
    // rewrite, and no parse to pay for (filters are compiled for every event).
    if !source.contains(['<', '>', '=', '!']) {
        return Rewrite::AsWritten;
    }
    let Ok(expr) = minijinja::machinery::parse_expr(source) else {
        return Rewrite::AsWritten;
    };
    let mut writer = Writer::new(true, limit(source));
    match writer.expr(&expr) {
        Ok(()) if writer.compared => Rewrite::Strict(writer.out),
        Ok(()) => Rewrite::AsWritten,
        Err(Stop::TooLong) => Rewrite::Refused(
            "its comparisons nest too deeply to be checked (a chained comparison inside another \
             one's middle); simplify it",
        ),
        // Whether it compares anything is not known here (it may: see above): refused.
        Err(Stop::Unknown) => {
            Rewrite::Refused("it uses a construct whose comparisons cannot be checked; simplify it")
        }
    }
}

/// `source` parsed and written out again without any change of meaning (for tests).
#[cfg(test)]
pub fn rewritten_plainly(source: &str) -> Option<String> {
    let expr = minijinja::machinery::parse_expr(source).ok()?;
    let mut writer = Writer::new(false, limit(source));
    writer.expr(&expr).ok()?;
    Some(writer.out)
}

/// Why the writer stopped.
enum Stop {
    /// A construct it does not write out.
    Unknown,
    /// Its output passed the bound.
    TooLong,
}

use Stop::Unknown;

struct Writer {
    out: String,
    strict: bool,
    /// Whether any comparison was written as a call.
    compared: bool,
    limit: usize,
}

/// The longest comparison text an error quotes.
const MAX_TEXT_CHARS: usize = 200;

impl Writer {
    fn new(strict: bool, limit: usize) -> Self {
        Self {
            out: String::new(),
            strict,
            compared: false,
            limit,
        }
    }

    fn push(&mut self, text: &str) {
        self.out.push_str(text);
    }

    /// The operand of a postfix (`.name`, `[i]`, a call; and with `filters`, a filter or a
    /// test), parenthesised unless it binds as tightly (a name, a lookup, a call, a literal list
    /// or map; and a filter in a chain of filters, `x|a|b`).
    fn operand(&mut self, expr: &Expr<'_>, filters: bool) -> Result<(), Stop> {
        let tight = match expr {
            Expr::Var(_)
            | Expr::GetAttr(_)
            | Expr::GetItem(_)
            | Expr::Call(_)
            | Expr::List(_)
            | Expr::Map(_)
            | Expr::Tuple(_) => true,
            Expr::Filter(_) => filters,
            _ => false,
        };
        if tight {
            self.expr(expr)
        } else {
            self.push("(");
            self.expr(expr)?;
            self.push(")");
            Ok(())
        }
    }

    fn expr(&mut self, expr: &Expr<'_>) -> Result<(), Stop> {
        if self.out.len() > self.limit {
            return Err(Stop::TooLong);
        }
        match expr {
            Expr::Var(var) => self.push(var.id),
            Expr::Const(constant) => self.constant(&constant.value)?,
            Expr::Slice(slice) => {
                self.operand(&slice.expr, false)?;
                self.push("[");
                if let Some(start) = &slice.start {
                    self.expr(start)?;
                }
                self.push(":");
                if let Some(stop) = &slice.stop {
                    self.expr(stop)?;
                }
                if let Some(step) = &slice.step {
                    self.push(":");
                    self.expr(step)?;
                }
                self.push("]");
            }
            Expr::UnaryOp(unary) => {
                self.push(match unary.op {
                    UnaryOpKind::Not => "(not ",
                    UnaryOpKind::Neg => "(-",
                });
                // `-x|f` would read as `(-x)|f`.
                self.operand(&unary.expr, false)?;
                self.push(")");
            }
            Expr::BinOp(binary) => match compare_symbol(binary.op) {
                Some(symbol) => self.compare(&binary.left, symbol, &binary.right)?,
                None => self.binary(binary, true)?,
            },
            Expr::Compare(chain) => {
                // `a < b < c` is `a < b and b < c`, `b` read twice (expressions have no side
                // effects here).
                self.push("(");
                let mut left = &chain.expr;
                for (i, op) in chain.ops.iter().enumerate() {
                    if i > 0 {
                        self.push(" and ");
                    }
                    match op.op {
                        CompareOpKind::In | CompareOpKind::NotIn => {
                            self.push("(");
                            self.expr(left)?;
                            self.push(if matches!(op.op, CompareOpKind::In) {
                                " in "
                            } else {
                                " not in "
                            });
                            self.expr(&op.expr)?;
                            self.push(")");
                        }
                        kind => {
                            let symbol = match kind {
                                CompareOpKind::Eq => "==",
                                CompareOpKind::Ne => "!=",
                                CompareOpKind::Lt => "<",
                                CompareOpKind::Lte => "<=",
                                CompareOpKind::Gt => ">",
                                CompareOpKind::Gte => ">=",
                                CompareOpKind::In | CompareOpKind::NotIn => unreachable!(),
                            };
                            self.compare(left, symbol, &op.expr)?;
                        }
                    }
                    left = &op.expr;
                }
                self.push(")");
            }
            Expr::IfExpr(if_expr) => {
                self.push("(");
                self.expr(&if_expr.true_expr)?;
                self.push(" if ");
                self.expr(&if_expr.test_expr)?;
                if let Some(otherwise) = &if_expr.false_expr {
                    self.push(" else ");
                    self.expr(otherwise)?;
                }
                self.push(")");
            }
            Expr::Filter(filter) => {
                // A filter without an operand only exists in filter blocks.
                let operand = filter.expr.as_ref().ok_or(Unknown)?;
                self.operand(operand, true)?;
                self.push("|");
                self.push(filter.name);
                if !filter.args.is_empty() {
                    self.args(&filter.args)?;
                }
            }
            Expr::Test(test) => {
                self.push("(");
                self.operand(&test.expr, true)?;
                self.push(" is ");
                self.push(test.name);
                if !test.args.is_empty() {
                    self.args(&test.args)?;
                }
                self.push(")");
            }
            Expr::GetAttr(attr) => {
                self.operand(&attr.expr, false)?;
                self.push(".");
                self.push(attr.name);
            }
            Expr::GetItem(item) => {
                self.operand(&item.expr, false)?;
                self.push("[");
                self.expr(&item.subscript_expr)?;
                self.push("]");
            }
            Expr::Call(call) => {
                self.operand(&call.expr, false)?;
                self.args(&call.args)?;
            }
            Expr::List(list) => {
                self.push("[");
                self.items(&list.items)?;
                self.push("]");
            }
            Expr::Tuple(tuple) => {
                self.push("(");
                self.items(&tuple.items)?;
                if tuple.items.len() == 1 {
                    self.push(",");
                }
                self.push(")");
            }
            Expr::Map(map) => {
                self.push("{");
                for (i, (key, value)) in map.keys.iter().zip(&map.values).enumerate() {
                    if i > 0 {
                        self.push(", ");
                    }
                    self.expr(key)?;
                    self.push(": ");
                    self.expr(value)?;
                }
                self.push("}");
            }
        }
        Ok(())
    }

    fn compare(&mut self, left: &Expr<'_>, symbol: &str, right: &Expr<'_>) -> Result<(), Stop> {
        if self.strict {
            self.compared = true;
            // The comparison as the error will name it, written plainly (and shortened).
            let mut plain = Writer::new(false, self.limit.saturating_sub(self.out.len()));
            plain.expr(left)?;
            let _ = write!(plain.out, " {symbol} ");
            plain.expr(right)?;
            if plain.out.chars().count() > MAX_TEXT_CHARS {
                plain.out = plain.out.chars().take(MAX_TEXT_CHARS).collect::<String>() + "…";
            }
            let _ = write!(self.out, "{COMPARE}(");
            self.expr(left)?;
            let _ = write!(self.out, ", \"{symbol}\", ");
            self.expr(right)?;
            self.push(", ");
            let text = Value::from(format!("`{}`", plain.out));
            self.constant(&text)?;
            self.push(")");
        } else {
            self.push("(");
            self.expr(left)?;
            let _ = write!(self.out, " {symbol} ");
            self.expr(right)?;
            self.push(")");
        }
        Ok(())
    }

    fn items(&mut self, items: &[Expr<'_>]) -> Result<(), Stop> {
        for (i, item) in items.iter().enumerate() {
            if i > 0 {
                self.push(", ");
            }
            self.expr(item)?;
        }
        Ok(())
    }

    fn args(&mut self, args: &[CallArg<'_>]) -> Result<(), Stop> {
        self.push("(");
        for (i, arg) in args.iter().enumerate() {
            if i > 0 {
                self.push(", ");
            }
            match arg {
                CallArg::Pos(expr) => self.expr(expr)?,
                CallArg::Kwarg(name, expr) => {
                    self.push(name);
                    self.push("=");
                    self.expr(expr)?;
                }
                CallArg::PosSplat(expr) => {
                    self.push("*");
                    self.expr(expr)?;
                }
                CallArg::KwargSplat(expr) => {
                    self.push("**");
                    self.expr(expr)?;
                }
            }
        }
        self.push(")");
        Ok(())
    }

    fn constant(&mut self, value: &Value) -> Result<(), Stop> {
        match value.kind() {
            ValueKind::None => self.push("none"),
            ValueKind::Bool => self.push(if value.is_true() { "true" } else { "false" }),
            ValueKind::Number => {
                let text = value.to_string();
                // `1e999` is read as infinity, written back as "inf".
                if let Ok(float) = f64::try_from(value.clone())
                    && float.is_infinite()
                {
                    self.push(if float > 0.0 { "1e999" } else { "(-1e999)" });
                    return Ok(());
                }
                // Written back as the lexer reads it: digits, a fraction or an exponent.
                if !text
                    .bytes()
                    .all(|b| b.is_ascii_digit() || matches!(b, b'.' | b'e' | b'E' | b'-' | b'+'))
                {
                    return Err(Unknown);
                }
                // A float without a fraction or an exponent would be read back as an integer.
                if value.is_integer() || text.contains(['.', 'e', 'E']) {
                    self.push(&text);
                } else {
                    let _ = write!(self.out, "{text}.0");
                }
            }
            ValueKind::String => {
                let text = value.as_str().ok_or(Unknown)?;
                self.push("\"");
                for c in text.chars() {
                    match c {
                        '"' => self.push("\\\""),
                        '\\' => self.push("\\\\"),
                        '\n' => self.push("\\n"),
                        '\r' => self.push("\\r"),
                        '\t' => self.push("\\t"),
                        c if (c as u32) < 0x20 || c == '\u{7f}' => {
                            let _ = write!(self.out, "\\u{:04x}", c as u32);
                        }
                        c => self.out.push(c),
                    }
                }
                self.push("\"");
            }
            // Constant lists and maps are parsed as List and Map; anything else is unexpected.
            _ => return Err(Unknown),
        }
        Ok(())
    }
}

impl Writer {
    /// A binary operation that is no comparison; `wrap`: in parentheses. A run of one operator
    /// (`a and b and c`, `a ~ b ~ c`: left-associative) is written with one pair, not one per
    /// step (each costs the parser depth).
    fn binary(&mut self, binary: &ast::BinOp<'_>, wrap: bool) -> Result<(), Stop> {
        let symbol = match binary.op {
            BinOpKind::ScAnd => "and",
            BinOpKind::ScOr => "or",
            BinOpKind::Add => "+",
            BinOpKind::Sub => "-",
            BinOpKind::Mul => "*",
            BinOpKind::Div => "/",
            BinOpKind::FloorDiv => "//",
            BinOpKind::Rem => "%",
            BinOpKind::Pow => "**",
            BinOpKind::Concat => "~",
            BinOpKind::In => "in",
            _ => return Err(Unknown),
        };
        if wrap {
            self.push("(");
        }
        match &binary.left {
            Expr::BinOp(left)
                if std::mem::discriminant(&left.op) == std::mem::discriminant(&binary.op) =>
            {
                self.binary(left, false)?;
            }
            left => self.expr(left)?,
        }
        let _ = write!(self.out, " {symbol} ");
        self.expr(&binary.right)?;
        if wrap {
            self.push(")");
        }
        Ok(())
    }
}

fn compare_symbol(op: BinOpKind) -> Option<&'static str> {
    Some(match op {
        BinOpKind::Eq => "==",
        BinOpKind::Ne => "!=",
        BinOpKind::Lt => "<",
        BinOpKind::Lte => "<=",
        BinOpKind::Gt => ">",
        BinOpKind::Gte => ">=",
        _ => return None,
    })
}

/// Whether `detail` is the message of a refused comparison (shown without minijinja's framing).
pub fn is_comparison_error(detail: &str) -> bool {
    detail.starts_with('`') && (detail.contains("` compares ") || detail.contains("` orders "))
}

/// What a comparison's error calls a value's type.
fn kind_name(value: &Value) -> &'static str {
    match value.kind() {
        ValueKind::Undefined => "undefined",
        ValueKind::None => "null",
        ValueKind::Bool => "boolean",
        ValueKind::Number => "number",
        ValueKind::String => "string",
        ValueKind::Bytes => "bytes",
        ValueKind::Seq | ValueKind::Iterable => "list",
        ValueKind::Map => "map",
        _ => "object",
    }
}

/// [`COMPARE`]: `left op right` when both may be compared: equality of two values of one type,
/// or with null; ordering of two numbers or two strings. Otherwise an error naming the
/// comparison (`text`, already quoted) and both types. Undefined operands are an undefined error,
/// as before; comparing two lists or maps is charged fuel by their length, as the engine does.
pub fn compare(
    state: &minijinja::State<'_, '_>,
    left: &Value,
    op: &str,
    right: &Value,
    text: &str,
) -> Result<Value, Error> {
    if left.is_undefined() || right.is_undefined() {
        return Err(Error::new(
            ErrorKind::UndefinedError,
            "a comparison reads an undefined value",
        ));
    }
    let equality = matches!(op, "==" | "!=");
    let (a, b) = (kind_name(left), kind_name(right));
    let comparable = if equality {
        a == b || a == "null" || b == "null"
    } else {
        a == b && matches!(a, "number" | "string")
    };
    if !comparable {
        let article = |kind: &str| {
            if kind.starts_with(['a', 'e', 'i', 'o', 'u']) {
                "an"
            } else {
                "a"
            }
        };
        let what = if a == b {
            format!("orders two values of type {a}; only numbers and strings are ordered")
        } else {
            format!(
                "compares {} {a} with {} {b}; compare values of one type (convert one with \
                 |int, |float or |string)",
                article(a),
                article(b)
            )
        };
        return Err(Error::new(
            ErrorKind::InvalidOperation,
            format!("{text} {what}"),
        ));
    }
    if let (Some(x), Some(y)) = (left.len(), right.len())
        && matches!(a, "list" | "map")
    {
        state.consume_fuel(u64::try_from(x.min(y) / 2).unwrap_or(u64::MAX))?;
    }
    Ok(Value::from(match op {
        "==" => left == right,
        "!=" => left != right,
        "<" => left < right,
        "<=" => left <= right,
        ">" => left > right,
        ">=" => left >= right,
        _ => {
            return Err(Error::new(
                ErrorKind::InvalidOperation,
                "unknown comparison",
            ));
        }
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::expr::{Engine, Limits, event_scope};
    use serde_json::json;

    /// Every construct of the expression language, written out again, evaluates as written.
    const CORPUS: &[&str] = &[
        "1",
        "-1.5e3",
        "1.0",
        "0.1",
        "10 ** 2",
        "7 // 2 + 7 % 2 - 3 * 2 / 4",
        "'a' ~ \"b\" ~ 'it''s'",
        "\"q\\\"uote\\\\ \\n tab\\t\"",
        "none",
        "true and not false or false",
        "not event.flag",
        "event.amount",
        "event['amount'] + event.items[0]",
        "event.items[1:]",
        "event.items[::-1]",
        "event.items[0:2:1]",
        "event.name|upper",
        "event.name|default('x')|length",
        "event.items|map('string')|join(',')",
        "event.items|sum(start=10)",
        "event.missing is defined",
        "event.amount is number and event.amount is divisibleby(3)",
        "event.name is startingwith('pa')",
        "'a' in event.name",
        "'z' not in event.name",
        "3 in event.items",
        "event.amount if event.flag else -event.amount",
        "event.amount if event.flag",
        "range(3)|list",
        "range(1, 10, 3)|list",
        "dict(a=1, b=event.amount)",
        "[1, 2, event.amount]",
        "(1,)",
        "(1, 2)",
        "{'k': event.name, 'n': [1, {'x': none}]}",
        "event.name.upper()",
        "event.name.replace('a', 'b')",
        "(event.items|first) + 1",
        "event.amount > 100",
        "event.amount >= 120 and event.amount < 121",
        "1 < event.amount < 200",
        "1 < event.amount <= 120 != 121",
        "event.name == 'parcel'",
        "event.name != none",
        "event.missing == none",
        "event.items == [1, 2, 3]",
        "(event.amount > 100) == true",
        "not event.amount > 100",
        "-(event.amount) < 0",
        "(event.amount > 100) ~ 'x'",
    ];

    fn scope() -> Value {
        event_scope(
            &json!({"amount": 120, "name": "parcel", "flag": true, "items": [1, 2, 3], "text": "120"}),
            "events.orders.created",
        )
    }

    #[test]
    fn every_construct_written_out_again_evaluates_as_written() {
        let engine = Engine::new(Limits::default());
        // Judged against minijinja with the engine's own settings, comparisons as Jinja has them.
        let mut env = minijinja::Environment::new();
        env.set_undefined_behavior(minijinja::UndefinedBehavior::SemiStrict);
        let scope = scope();
        for source in CORPUS {
            let plain =
                rewritten_plainly(source).unwrap_or_else(|| panic!("{source}: not written out"));
            let original = env.compile_expression(source).unwrap().eval(scope.clone());
            let again = env
                .compile_expression(&plain)
                .unwrap_or_else(|e| panic!("{source} -> {plain}: {e}"))
                .eval(scope.clone());
            assert_eq!(
                format!("{original:?}"),
                format!("{again:?}"),
                "{source} -> {plain}"
            );
            // And made strict: the same wherever the operands are of one type.
            let strict = engine.expression(source).unwrap().eval(&scope);
            match (original, strict) {
                (Ok(original), Ok(strict)) => assert_eq!(original, strict, "{source} (strict)"),
                (Err(_), Err(_)) => {}
                (original, strict) => panic!("{source}: {original:?} but strict {strict:?}"),
            }
        }
    }

    fn source() -> impl proptest::strategy::Strategy<Value = String> {
        use proptest::prelude::*;
        let leaf = prop_oneof![
            (0i64..1000).prop_map(|n| n.to_string()),
            (0.0f64..100.0).prop_map(|f| format!("{f:?}")),
            "[a-z '\"\\\\]{0,6}".prop_map(|t| format!("{:?}", t)),
            Just("none".to_owned()),
            Just("true".to_owned()),
            Just("event.amount".to_owned()),
            Just("event.name".to_owned()),
            Just("event.items".to_owned()),
            Just("event.flag".to_owned()),
            Just("event.text".to_owned()),
            Just("event.items[1]".to_owned()),
        ];
        leaf.prop_recursive(4, 24, 3, |inner| {
            let ops = prop::sample::select(vec![
                "+", "-", "*", "//", "%", "~", "and", "or", "==", "!=", "<", "<=", ">", ">=", "in",
            ]);
            prop_oneof![
                (inner.clone(), ops, inner.clone())
                    .prop_map(|(a, op, b)| format!("({a} {op} {b})")),
                (inner.clone(), inner.clone(), inner.clone())
                    .prop_map(|(a, b, c)| format!("({a} < {b} <= {c})")),
                inner.clone().prop_map(|a| format!("(not {a})")),
                inner.clone().prop_map(|a| format!("(-{a})")),
                (inner.clone(), inner.clone(), inner.clone())
                    .prop_map(|(a, b, c)| format!("({a} if {b} else {c})")),
                inner.clone().prop_map(|a| format!("({a}|string|length)")),
                (inner.clone(), inner.clone()).prop_map(|(a, b)| format!("({a}|default({b}))")),
                inner.clone().prop_map(|a| format!("({a} is defined)")),
                (inner.clone(), inner.clone()).prop_map(|(a, b)| format!("[{a}, {b}]")),
                (inner.clone(), inner).prop_map(|(a, b)| format!("{{'k': {a}, 'v': {b}}}")),
            ]
        })
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(400))]
        /// Random expressions: written out again they evaluate as written, and made strict they
        /// evaluate alike wherever they do not fail.
        #[test]
        fn random_expressions_written_out_again_evaluate_as_written(source in source()) {
            let engine = Engine::new(Limits::default());
            let mut env = minijinja::Environment::new();
            env.set_undefined_behavior(minijinja::UndefinedBehavior::SemiStrict);
            env.set_fuel(Some(50_000));
            let scope = scope();
            let Ok(original) = env.compile_expression(&source) else {
                return Ok(());
            };
            let original = original.eval(scope.clone());
            let plain = rewritten_plainly(&source).expect("written out");
            let again = env.compile_expression(&plain).expect("parses").eval(scope.clone());
            proptest::prop_assert_eq!(
                format!("{:?}", original.as_ref().map_err(|e| e.kind())),
                format!("{:?}", again.as_ref().map_err(|e| e.kind())),
                "{} -> {}", source, plain
            );
            // Never refused, and alike wherever it does not fail.
            let strict = engine.expression(&source);
            proptest::prop_assert!(strict.is_ok(), "{}: {:?}", source, strict.err());
            if let Ok(strict) = strict.unwrap().eval(&scope) {
                proptest::prop_assert_eq!(Some(strict), original.ok(), "{}", source);
            }
        }
    }

    #[test]
    fn comparisons_of_different_types_are_errors_naming_the_comparison_and_the_types() {
        let engine = Engine::new(Limits::default());
        let scope = event_scope(
            &json!({"amount": "abc", "n": 5, "none": null, "flag": true, "list": [1]}),
            "events.orders",
        );
        let error = |source: &str| {
            engine
                .expression(source)
                .unwrap()
                .eval_bool(&scope)
                .unwrap_err()
                .message
        };
        // The issue's example: it passed before (strings order after numbers).
        let message = error("event.amount > 100");
        assert!(
            message.starts_with("`event.amount > 100` compares a string with a number"),
            "{message}"
        );
        for (source, says) in [
            (
                "event.none < 3",
                "`event.none < 3` compares a null with a number",
            ),
            (
                "event.flag == 1",
                "`event.flag == 1` compares a boolean with a number",
            ),
            (
                "event.n == '5'",
                "`event.n == \"5\"` compares a number with a string",
            ),
            (
                "event.list > 0",
                "`event.list > 0` compares a list with a number",
            ),
            // Each comparison of a chain, and inside any construct.
            (
                "1 < event.n < event.amount",
                "`event.n < event.amount` compares a number with a string",
            ),
            (
                "[event.n > 'x']|first",
                "`event.n > \"x\"` compares a number with a string",
            ),
            (
                "event.n > 1 if event.flag == 'yes'",
                "`event.flag == \"yes\"` compares a boolean with a string",
            ),
        ] {
            let message = error(source);
            assert!(message.starts_with(says), "{source}: {message}");
        }
        // Allowed: one type on both sides, and equality with null.
        for source in [
            "event.n > 4",
            "event.n == 5.0",
            "event.amount == 'abc'",
            "event.amount > 'a'",
            "event.none == none",
            "event.n != none",
            "event.flag == true",
            "event.list == [1]",
            "event.amount|length == 3",
            "event.missing is defined and event.missing > 1 or true",
            "event.amount is number and event.amount > 100 or true",
            "event.amount|length > 2",
        ] {
            assert!(
                engine
                    .expression(source)
                    .unwrap()
                    .eval_bool(&scope)
                    .unwrap(),
                "{source}"
            );
        }
        // Ordering is for numbers and strings; the comparison tests are strict too.
        assert!(
            error("[1] < [2]").starts_with("`[1] < [2]` orders two values of type list"),
            "{}",
            error("[1] < [2]")
        );
        assert!(
            error("event.amount is gt 100").starts_with("`is gt` compares a string with a number")
        );
        assert!(
            error("[event.amount]|select('>', 1)|list")
                .starts_with("`is >` compares a string with a number")
        );
        assert!(
            engine
                .expression("event.n is gt 4")
                .unwrap()
                .eval_bool(&scope)
                .unwrap()
        );
        // Undefined operands are still named as undefined; templates of one expression too.
        assert_eq!(error("event.missing > 3"), "event.missing is undefined");
        assert!(
            engine
                .template("{{ event.amount > 1 }}")
                .unwrap()
                .render(&scope)
                .unwrap_err()
                .message
                .starts_with("`event.amount > 1` compares a string with a number")
        );
    }

    #[test]
    fn what_cannot_be_made_strict_is_refused_never_evaluated_loosely() {
        let engine = Engine::new(Limits::default());
        let scope = event_scope(&json!({"amount": "abc"}), "events.orders");
        // Chained comparisons nested in the middle of others double at each level: refused
        // (quickly, not after growing without bound).
        let mut nested = "event.amount".to_owned();
        for _ in 0..30 {
            nested = format!("0 < ({nested}) < 1");
        }
        let started = std::time::Instant::now();
        let refused = engine.expression(&nested).err().expect("refused").message;
        assert!(refused.contains("nest too deeply"), "{refused}");
        assert!(started.elapsed() < std::time::Duration::from_secs(1));
        // A long run of one operator is written without a parenthesis per step: still strict.
        let long = format!(
            "event.amount > 100 and {}",
            vec!["0 == 0"; 60].join(" and ")
        );
        let long_error = engine
            .expression(&long)
            .unwrap()
            .eval_bool(&scope)
            .unwrap_err()
            .message;
        assert!(
            long_error.contains("compares a string with a number"),
            "{long_error}"
        );
        let concat = format!("event.amount ~ {} == 'x'", vec!["'y'"; 100].join(" ~ "));
        assert!(engine.expression(&concat).is_ok(), "{concat}");
        let filters = format!("event.amount{} > 1", "|string".repeat(60));
        let filters_error = engine
            .expression(&filters)
            .unwrap()
            .eval_bool(&scope)
            .unwrap_err()
            .message;
        assert!(
            filters_error.contains("compares a string with a number"),
            "{filters_error}"
        );
        // Infinity is written back as it was read.
        assert!(
            engine
                .expression("1e999 > 0")
                .unwrap()
                .eval_bool(&scope)
                .unwrap()
        );
        // The rewrite's own function cannot be called by name (its text would echo values).
        for source in [
            "__taskfactory_compare(1, '<', 2, event.amount)",
            "{{ __taskfactory_compare(1, '<', 2, 'x') }}",
            "a {{ __taskfactory_compare(1, '<', 2, 'x') }}",
        ] {
            let refused = if source.contains("{{") {
                engine.template(source).err()
            } else {
                engine.expression(source).err()
            };
            assert_eq!(
                refused.expect("refused").message,
                "__taskfactory_compare is reserved",
                "{source}"
            );
        }
    }
}
