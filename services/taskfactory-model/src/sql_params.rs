//! How a `sql` source's parameters reach PostgreSQL: each with an explicit type chosen from its
//! JSON value alone, under a statement text that names those types.
//!
//! # Types
//!
//! | JSON value                                              | bound as (`pg_typeof`)                   |
//! |---------------------------------------------------------|------------------------------------------|
//! | string                                                  | `text`                                   |
//! | integer that fits 64 bits signed                        | `bigint`                                 |
//! | any other number (a fraction, an exponent, beyond int8) | `numeric`: the decimal as JSON spells it |
//! | `true` / `false`                                        | `boolean`                                |
//! | object, array                                           | `jsonb`                                  |
//! | `null`                                                  | a NULL of type `text`                    |
//!
//! PostgreSQL takes a declared type as given: `WHERE id = $1` on an `int4` column compares an
//! integer (`int4 = int8`, the index still serves), `WHERE name = $1` on a `text` column with a
//! JSON number is refused (`operator does not exist: text = bigint`), `WHERE id = $1` with a
//! string or a null is refused too — the same way on every connection, every time. Where the
//! query needs another type it casts: `$1::uuid`, `$1::int`, `$1::text`, `$1::timestamptz`. A
//! refusal tells which parameter is which JSON type ([`describe`], for [`is_type_error`]s).
//!
//! Why not leave the type to PostgreSQL, as for an untyped literal? sqlx sends every value in
//! binary, and binary means something only under the type it was encoded for (a float8's eight
//! bytes read as text are `ABCDEFGH`). Numbers other than integers are `numeric`, not `float8`:
//! the decimal stays exact (`0.1 * 3` is `0.3`), an integer beyond int8 keeps the digits it has (an
//! event's numbers reach the orchestrator as doubles, exact to 2^53: `values`), and a
//! `numeric` column still compares exactly (with its index). A null is `text` rather than
//! untyped: an untyped parameter fails `$1 IS NULL` ("could not determine data type"), the
//! commonest thing done with a value that may be null; with `text`, `$1 IS NULL OR tier = $1`
//! works, and a null compared with another type is refused like a string would be.
//!
//! # Statements
//!
//! sqlx prepares a statement once per connection and caches it under its SQL text, then reuses it
//! with whatever is bound next — encoded for another type if the JSON type changed (the bug: a
//! number `2393736.541207228` matched the text `ABCDEFGH`, a `1` failed with `invalid byte
//! sequence … 0x00`, depending on which pooled connection ran the query). [`statement_text`] puts
//! the parameter types in a comment ahead of the query, so the cache's key differs per type
//! signature: a statement is reused only with the types it was prepared with, and a value gets
//! the same answer on every connection. That costs nothing per query (not caching at all would
//! cost a parse and a round trip every time) and leaves the user's SQL alone: rewriting `$1` into
//! `$1::int8` would have to understand strings, comments, quoted identifiers and dollar quoting.

use std::fmt::Write as _;

/// One parameter, typed by its JSON value.
#[derive(Debug, Clone, PartialEq)]
pub enum SqlParam<'a> {
    Text(&'a str),
    Int8(i64),
    Numeric(Numeric),
    Bool(bool),
    Jsonb(&'a serde_json::Value),
    /// JSON `null`: a NULL of type text.
    Null,
}

impl<'a> SqlParam<'a> {
    /// The parameter `value` becomes (an error only for a number PostgreSQL's `numeric` cannot
    /// hold, which no finite JSON number is).
    pub fn from_json(value: &'a serde_json::Value) -> Result<Self, String> {
        Ok(match value {
            serde_json::Value::Null => SqlParam::Null,
            serde_json::Value::Bool(b) => SqlParam::Bool(*b),
            serde_json::Value::String(s) => SqlParam::Text(s),
            serde_json::Value::Number(n) => {
                match n.as_i64() {
                    Some(i) => SqlParam::Int8(i),
                    None => SqlParam::Numeric(Numeric::parse(&n.to_string()).ok_or_else(|| {
                        format!("the number {n} does not fit PostgreSQL's numeric")
                    })?),
                }
            }
            serde_json::Value::Array(_) | serde_json::Value::Object(_) => SqlParam::Jsonb(value),
        })
    }

    /// The type it is declared as, as `pg_typeof` names it.
    pub fn sql_type(&self) -> &'static str {
        match self {
            SqlParam::Text(_) | SqlParam::Null => "text",
            SqlParam::Int8(_) => "bigint",
            SqlParam::Numeric(_) => "numeric",
            SqlParam::Bool(_) => "boolean",
            SqlParam::Jsonb(_) => "jsonb",
        }
    }

    /// The JSON type it came from, as messages name it.
    pub fn json_type(&self) -> &'static str {
        match self {
            SqlParam::Text(_) => "string",
            SqlParam::Int8(_) => "integer",
            SqlParam::Numeric(_) => "number",
            SqlParam::Bool(_) => "boolean",
            SqlParam::Jsonb(serde_json::Value::Array(_)) => "array",
            SqlParam::Jsonb(_) => "object",
            SqlParam::Null => "null",
        }
    }
}

/// `sql` as it is prepared: a comment naming each parameter's type, then `sql`. The text is what
/// sqlx caches a prepared statement under, so a statement is only ever reused with the types it
/// was prepared with (a leading comment: nothing in `sql` can turn it into anything else).
pub fn statement_text(sql: &str, params: &[SqlParam<'_>]) -> String {
    let mut text = String::with_capacity(sql.len() + 16 + 12 * params.len());
    text.push_str("/* params:");
    if params.is_empty() {
        text.push_str(" none");
    }
    for (i, param) in params.iter().enumerate() {
        let sep = if i == 0 { "" } else { "," };
        let _ = write!(text, "{sep} ${} {}", i + 1, param.sql_type());
    }
    text.push_str(" */\n");
    text.push_str(sql);
    text
}

/// What a type error is told: each parameter's JSON type and what it was bound as.
pub fn describe(params: &[SqlParam<'_>]) -> String {
    let each: Vec<String> = params
        .iter()
        .enumerate()
        .map(|(i, param)| {
            let bound = match param {
                SqlParam::Null => "a NULL of type text",
                other => other.sql_type(),
            };
            format!(
                "${} is a JSON {}, bound as {bound}",
                i + 1,
                param.json_type()
            )
        })
        .collect();
    format!(
        "parameters are typed by their JSON value ({}): cast a parameter where the query needs another type, as in $1::int or $1::text",
        each.join("; ")
    )
}

/// Whether an error (by SQLSTATE) may come from a parameter's type: no such operator or
/// function for it, a mismatch, an ambiguity, an impossible cast, text that does not parse.
pub fn is_type_error(sqlstate: &str) -> bool {
    matches!(
        sqlstate,
        "42883" | "42804" | "42725" | "42P08" | "42P18" | "42846" | "22P02"
    )
}

/// A decimal in PostgreSQL's `numeric` form: base-10000 digits, the weight of the first (the
/// power of 10000 it counts), the sign and the display scale (digits after the point).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Numeric {
    negative: bool,
    weight: i16,
    scale: u16,
    /// Each in `0..10000`; no leading or trailing zero digit; none for zero.
    digits: Vec<i16>,
}

/// The largest display scale `numeric` takes (`NUMERIC_DSCALE_MASK`).
const MAX_SCALE: u16 = 0x3FFF;
/// The most base-10000 digits `numeric_recv` takes.
const MAX_DIGITS: usize = 3000;

impl Numeric {
    /// Parses a JSON number's text (`-12.5`, `1e300`, `5e-324`, `18446744073709551615`); `None`
    /// for anything else or what `numeric` cannot hold. The scale is the one written (`1.0` is
    /// `1.0`).
    pub fn parse(text: &str) -> Option<Self> {
        let (negative, rest) = match text.strip_prefix('-') {
            Some(rest) => (true, rest),
            None => (false, text),
        };
        let (mantissa, exponent) = match rest.find(['e', 'E']) {
            Some(at) => (&rest[..at], rest[at + 1..].parse::<i32>().ok()?),
            None => (rest, 0),
        };
        let (whole, fraction) = mantissa.split_once('.').unwrap_or((mantissa, ""));
        let is_digits = |s: &str| s.bytes().all(|b| b.is_ascii_digit());
        if whole.is_empty()
            || !is_digits(whole)
            || !is_digits(fraction)
            || (mantissa.contains('.') && fraction.is_empty())
        {
            return None;
        }
        let scale = (i64::try_from(fraction.len()).ok()? - i64::from(exponent)).max(0);
        let scale = u16::try_from(scale).ok().filter(|s| *s <= MAX_SCALE)?;
        let all: Vec<u8> = whole
            .bytes()
            .chain(fraction.bytes())
            .map(|b| b - b'0')
            .collect();
        let (Some(first), Some(last)) = (
            all.iter().position(|d| *d != 0),
            all.iter().rposition(|d| *d != 0),
        ) else {
            return Some(Self {
                negative: false,
                weight: 0,
                scale,
                digits: Vec::new(),
            });
        };
        // Where the decimal point falls among the significant digits, moved left to a group
        // boundary by zeros in front.
        let mut point =
            i64::try_from(whole.len()).ok()? + i64::from(exponent) - i64::try_from(first).ok()?;
        let pad = (4 - point.rem_euclid(4)) % 4;
        point += pad;
        let mut padded = vec![0_u8; usize::try_from(pad).ok()?];
        padded.extend_from_slice(&all[first..=last]);
        padded.resize(padded.len().div_ceil(4) * 4, 0);
        let digits: Vec<i16> = padded
            .chunks(4)
            .map(|group| group.iter().fold(0_i16, |n, d| n * 10 + i16::from(*d)))
            .collect();
        if digits.len() > MAX_DIGITS {
            return None;
        }
        Some(Self {
            negative,
            weight: i16::try_from(point / 4 - 1).ok()?,
            scale,
            digits,
        })
    }

    /// The binary form `numeric_recv` reads: digit count, weight, sign, scale, then the digits,
    /// each a big-endian 16-bit integer.
    pub fn to_binary(&self) -> Vec<u8> {
        const POSITIVE: u16 = 0x0000;
        const NEGATIVE: u16 = 0x4000;
        let sign = if self.negative && !self.digits.is_empty() {
            NEGATIVE
        } else {
            POSITIVE
        };
        // At most MAX_DIGITS (parse makes no more), so the count fits.
        let count = i16::try_from(self.digits.len()).unwrap_or(i16::MAX);
        let mut out = Vec::with_capacity(8 + 2 * self.digits.len());
        for word in [count, self.weight] {
            out.extend_from_slice(&word.to_be_bytes());
        }
        for word in [sign, self.scale] {
            out.extend_from_slice(&word.to_be_bytes());
        }
        for digit in &self.digits {
            out.extend_from_slice(&digit.to_be_bytes());
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use serde_json::json;

    fn hex(bytes: &[u8]) -> String {
        bytes.iter().map(|b| format!("{b:02x}")).collect()
    }

    /// Back to decimal text (no exponent), to check a parse against the value it read.
    fn to_decimal(n: &Numeric) -> String {
        let mut digits = String::new();
        for d in &n.digits {
            digits.push_str(&format!("{d:04}"));
        }
        // The point sits after (weight + 1) groups.
        let point = (i64::from(n.weight) + 1) * 4;
        let len = i64::try_from(digits.len()).unwrap();
        let (whole, fraction) = if point <= 0 {
            (
                "0".to_owned(),
                "0".repeat(usize::try_from(-point).unwrap()) + &digits,
            )
        } else if point >= len {
            (
                digits.clone() + &"0".repeat(usize::try_from(point - len).unwrap()),
                String::new(),
            )
        } else {
            let (w, f) = digits.split_at(usize::try_from(point).unwrap());
            (w.to_owned(), f.to_owned())
        };
        let whole = whole.trim_start_matches('0');
        let fraction = fraction.trim_end_matches('0');
        let sign = if n.negative && !n.digits.is_empty() {
            "-"
        } else {
            ""
        };
        let whole = if whole.is_empty() { "0" } else { whole };
        if fraction.is_empty() {
            format!("{sign}{whole}")
        } else {
            format!("{sign}{whole}.{fraction}")
        }
    }

    #[test]
    fn numeric_binary_is_what_postgres_sends_for_the_same_value() {
        // Each from `SELECT numeric_send('…'::numeric)` on PostgreSQL 15.
        for (text, binary) in [
            ("2393736.541207228", "000500010000000900ef0e98152402d21f40"),
            ("0.0", "0000000000000001"),
            ("5e-324", "0001ffaf000001440005"),
            ("-12.5", "0002000040000001000c1388"),
            (
                "18446744073709551615",
                "000500040000000007341a5802e103bb064f",
            ),
            ("1.0", "00010000000000010001"),
            ("10000", "00010001000000000001"),
        ] {
            let numeric = Numeric::parse(text).unwrap();
            assert_eq!(hex(&numeric.to_binary()), binary, "{text}");
        }
    }

    #[test]
    fn numeric_reads_exponents_and_refuses_what_is_no_number() {
        assert_eq!(to_decimal(&Numeric::parse("1e300").unwrap()).len(), 301);
        assert_eq!(to_decimal(&Numeric::parse("1.5e-7").unwrap()), "0.00000015");
        assert_eq!(Numeric::parse("1.5e-7").unwrap().scale, 8);
        assert_eq!(to_decimal(&Numeric::parse("-1.25E+2").unwrap()), "-125");
        assert_eq!(Numeric::parse("-0.0").unwrap().to_binary()[4..6], [0, 0]);
        for bad in [
            "",
            "-",
            ".5",
            "5.",
            "1e",
            "e5",
            "1.2.3",
            "abc",
            "1e99999999999",
            "1e-99999",
            "+1",
            " 1",
            "NaN",
            "Infinity",
            "١",
        ] {
            assert_eq!(Numeric::parse(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn each_json_type_has_one_sql_type() {
        let cases = [
            (json!("1"), "text", "string"),
            (json!(1), "bigint", "integer"),
            (json!(-9_223_372_036_854_775_808_i64), "bigint", "integer"),
            (json!(9_223_372_036_854_775_808_u64), "numeric", "number"),
            (json!(1.5), "numeric", "number"),
            (json!(1.0), "numeric", "number"),
            (json!(true), "boolean", "boolean"),
            (json!(null), "text", "null"),
            (json!({"a": 1}), "jsonb", "object"),
            (json!([1]), "jsonb", "array"),
        ];
        for (value, sql_type, json_type) in &cases {
            let param = SqlParam::from_json(value).unwrap();
            assert_eq!(
                (param.sql_type(), param.json_type()),
                (*sql_type, *json_type),
                "{value}"
            );
        }
    }

    #[test]
    fn the_statement_text_names_the_types_ahead_of_the_query() {
        let values = [json!(1), json!("a"), json!(null), json!(2.5)];
        let params: Vec<SqlParam<'_>> = values
            .iter()
            .map(|v| SqlParam::from_json(v).unwrap())
            .collect();
        assert_eq!(
            statement_text("SELECT $1", &params),
            "/* params: $1 bigint, $2 text, $3 text, $4 numeric */\nSELECT $1"
        );
        assert_eq!(
            statement_text("SELECT 1", &[]),
            "/* params: none */\nSELECT 1"
        );
        // Different types, different statements; the same types, the same one.
        let one = [SqlParam::from_json(&values[0]).unwrap()];
        let text = [SqlParam::from_json(&values[1]).unwrap()];
        let null = [SqlParam::from_json(&values[2]).unwrap()];
        assert_ne!(statement_text("q", &one), statement_text("q", &text));
        assert_eq!(statement_text("q", &text), statement_text("q", &null));
        assert_eq!(
            describe(&params),
            "parameters are typed by their JSON value ($1 is a JSON integer, bound as bigint; $2 is a JSON string, bound as text; $3 is a JSON null, bound as a NULL of type text; $4 is a JSON number, bound as numeric): cast a parameter where the query needs another type, as in $1::int or $1::text"
        );
    }

    proptest! {
        #[test]
        fn every_finite_json_number_is_bound_as_its_exact_value(x in any::<f64>()) {
            prop_assume!(x.is_finite());
            let value = json!(x);
            let param = SqlParam::from_json(&value).unwrap();
            let SqlParam::Numeric(numeric) = param else {
                return Err(TestCaseError::fail("a float is numeric"));
            };
            prop_assert!(numeric.digits.iter().all(|d| (0..10000).contains(d)));
            prop_assert_ne!(numeric.digits.first(), Some(&0));
            prop_assert_ne!(numeric.digits.last(), Some(&0));
            let back: f64 = to_decimal(&numeric).parse().unwrap();
            prop_assert_eq!(back, x);
        }

        #[test]
        fn every_integer_decimal_reads_back_exactly(n in any::<i128>()) {
            let numeric = Numeric::parse(&n.to_string()).unwrap();
            prop_assert_eq!(to_decimal(&numeric), n.to_string());
        }
    }
}
