//! The shape of a `sql` source's query: one statement that reads, closed on itself.
//!
//! The orchestrator runs a query inside a statement of its own that bounds its rows and bytes
//! (`context::sql::bounded_query`): the query's text sits between two parentheses of that
//! statement. A text that closes a parenthesis it did not open, leaves one open, or goes on after
//! a `;` would change the statement around it (and could bring back rows and bytes past the
//! bounds), so [`check`] refuses it. It reads the text as PostgreSQL's lexer does, with
//! `standard_conforming_strings` on (the default since 9.1): parentheses and semicolons inside
//! strings (`'…'`, `E'…'`), quoted names (`"…"`), dollar quotes (`$tag$…$tag$`) and comments
//! (`-- …`, nested `/* … */`) are text, not structure.
//!
//! Validation applies it to every spec; the orchestrator applies it again before each query,
//! then has the database prepare the query alone, in the same read-only transaction, before it
//! runs it bounded: the database's own reading decides (a database that reads strings the old
//! way, or anything this lexer reads otherwise, cannot get a query past it).

use std::fmt;

/// The first words of the statements a source may run: those that only read.
pub const READING_WORDS: [&str; 4] = ["SELECT", "WITH", "VALUES", "TABLE"];

/// Why a query is not one a `sql` source runs. Each displays as what the query does wrong
/// (`"is more than one statement …"`), to follow the field or "the query".
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum QueryProblem {
    /// Only whitespace and comments.
    Empty,
    /// Its first word (or token) is not one of [`READING_WORDS`].
    NotARead { starts_with: String },
    /// Something other than whitespace follows the `;` at this byte.
    MoreThanOneStatement { at: usize },
    /// The `)` at this byte closes a parenthesis the query did not open.
    UnopenedParenthesis { at: usize },
    /// Parentheses opened and never closed.
    UnclosedParentheses { open: usize },
    /// A string, quoted name, dollar quote or comment begun at this byte and never closed.
    Unterminated { what: &'static str, at: usize },
}

impl fmt::Display for QueryProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            QueryProblem::Empty => write!(f, "is empty (whitespace and comments only)"),
            QueryProblem::NotARead { starts_with } => write!(
                f,
                "is not a query that reads: it starts with {starts_with:?}, and only {} run (in a read-only transaction)",
                READING_WORDS.join(", ")
            ),
            QueryProblem::MoreThanOneStatement { at } => write!(
                f,
                "is more than one statement: something follows the \";\" at byte {at} (a source runs one query, with nothing after it, not even a comment)"
            ),
            QueryProblem::UnopenedParenthesis { at } => write!(
                f,
                "closes a parenthesis it did not open (the \")\" at byte {at}): a query runs inside a statement that bounds its rows, and must be closed on itself"
            ),
            QueryProblem::UnclosedParentheses { open } => write!(
                f,
                "leaves {open} {} open",
                if *open == 1 {
                    "parenthesis"
                } else {
                    "parentheses"
                }
            ),
            QueryProblem::Unterminated { what, at } => {
                write!(f, "has {what} that is never closed (from byte {at})")
            }
        }
    }
}

impl std::error::Error for QueryProblem {}

/// The query as it is run (without the whitespace around it and the `;`s that end it), or why it
/// is not one statement that reads, closed on itself.
pub fn check(query: &str) -> Result<&str, QueryProblem> {
    let bytes = query.as_bytes();
    let mut i = 0;
    let mut depth = 0usize;
    let mut first: Option<String> = None;
    let mut semicolon: Option<usize> = None;
    while i < bytes.len() {
        let c = bytes[i];
        if c.is_ascii_whitespace() {
            i += 1;
            continue;
        }
        if let Some(at) = semicolon
            && c != b';'
        {
            return Err(QueryProblem::MoreThanOneStatement { at });
        }
        let next = bytes.get(i + 1).copied();
        // Comments: nothing of them counts, not even as the first word.
        if c == b'-' && next == Some(b'-') {
            while i < bytes.len() && bytes[i] != b'\n' && bytes[i] != b'\r' {
                i += 1;
            }
            continue;
        }
        if c == b'/' && next == Some(b'*') {
            i = block_comment_end(bytes, i)?;
            continue;
        }
        if c == b'(' {
            depth += 1;
            i += 1;
            continue;
        }
        let start = i;
        i = match c {
            b')' => {
                if depth == 0 {
                    return Err(QueryProblem::UnopenedParenthesis { at: i });
                }
                depth -= 1;
                i + 1
            }
            b';' => {
                semicolon.get_or_insert(i);
                i + 1
            }
            b'\'' => quoted_end(bytes, i, b'\'', false, "a string")?,
            b'"' => quoted_end(bytes, i, b'"', false, "a quoted name")?,
            b'$' => dollar_end(bytes, i)?,
            c if is_word_start(c) => {
                let mut end = i + 1;
                while end < bytes.len() && is_word_part(bytes[end]) {
                    end += 1;
                }
                // `E'…'`: a string in which a backslash escapes (`E'\''` is one quote).
                if end == i + 1 && (c == b'e' || c == b'E') && bytes.get(end) == Some(&b'\'') {
                    quoted_end(bytes, end, b'\'', true, "a string")?
                } else {
                    end
                }
            }
            c if c.is_ascii_digit() => {
                let mut end = i + 1;
                while end < bytes.len()
                    && (bytes[end].is_ascii_alphanumeric()
                        || bytes[end] == b'_'
                        || bytes[end] == b'.')
                {
                    end += 1;
                }
                end
            }
            _ => i + 1,
        };
        if first.is_none() {
            first = Some(query[start..i].to_owned());
        }
    }
    if depth > 0 {
        return Err(QueryProblem::UnclosedParentheses { open: depth });
    }
    let Some(first) = first.filter(|first| first != ";") else {
        return Err(QueryProblem::Empty);
    };
    if !READING_WORDS
        .iter()
        .any(|word| word.eq_ignore_ascii_case(&first))
    {
        let starts_with: String = first.chars().take(40).collect();
        return Err(QueryProblem::NotARead { starts_with });
    }
    let statement = match semicolon {
        Some(at) => &query[..at],
        None => query,
    };
    Ok(statement.trim())
}

/// A word starts with a letter, `_` or any non-ASCII byte (as PostgreSQL's identifiers do).
fn is_word_start(c: u8) -> bool {
    c.is_ascii_alphabetic() || c == b'_' || c >= 0x80
}

/// ... and goes on with those, digits and `$`.
fn is_word_part(c: u8) -> bool {
    is_word_start(c) || c.is_ascii_digit() || c == b'$'
}

/// Where the `/* … */` comment at `start` ends (comments nest).
fn block_comment_end(bytes: &[u8], start: usize) -> Result<usize, QueryProblem> {
    let mut depth = 0usize;
    let mut i = start;
    while i + 1 < bytes.len() {
        match (bytes[i], bytes[i + 1]) {
            (b'/', b'*') => {
                depth += 1;
                i += 2;
            }
            (b'*', b'/') => {
                depth -= 1;
                i += 2;
                if depth == 0 {
                    return Ok(i);
                }
            }
            _ => i += 1,
        }
    }
    Err(QueryProblem::Unterminated {
        what: "a comment",
        at: start,
    })
}

/// Where the text quoted by `quote` at `start` ends: a doubled quote is one quote inside, and
/// with `backslash` (`E'…'`) a backslash escapes the byte after it.
fn quoted_end(
    bytes: &[u8],
    start: usize,
    quote: u8,
    backslash: bool,
    what: &'static str,
) -> Result<usize, QueryProblem> {
    let mut i = start + 1;
    while i < bytes.len() {
        let c = bytes[i];
        if backslash && c == b'\\' {
            i += 2;
        } else if c == quote {
            if bytes.get(i + 1) == Some(&quote) {
                i += 2;
            } else {
                return Ok(i + 1);
            }
        } else {
            i += 1;
        }
    }
    Err(QueryProblem::Unterminated { what, at: start })
}

/// Where what starts with the `$` at `start` ends: a parameter (`$1`), a dollar-quoted string
/// (`$$…$$`, `$tag$…$tag$`), or the `$` alone.
fn dollar_end(bytes: &[u8], start: usize) -> Result<usize, QueryProblem> {
    let mut i = start + 1;
    if bytes.get(i).is_some_and(u8::is_ascii_digit) {
        while bytes.get(i).is_some_and(u8::is_ascii_digit) {
            i += 1;
        }
        return Ok(i);
    }
    // A tag: a word without `$`, then `$`.
    while bytes
        .get(i)
        .is_some_and(|c| is_word_start(*c) || c.is_ascii_digit())
    {
        i += 1;
    }
    if bytes.get(i) != Some(&b'$') {
        return Ok(start + 1);
    }
    let tag = &bytes[start..=i];
    let body = i + 1;
    match bytes[body..]
        .windows(tag.len())
        .position(|window| window == tag)
    {
        Some(at) => Ok(body + at + tag.len()),
        None => Err(QueryProblem::Unterminated {
            what: "a dollar-quoted string",
            at: start,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_statement_that_reads_is_run_as_written_without_its_trailing_semicolons() {
        for (query, run) in [
            ("SELECT 1", "SELECT 1"),
            ("  select 1 ;; \n", "select 1"),
            (
                "with t as (values (1)) select * from t;",
                "with t as (values (1)) select * from t",
            ),
            ("TABLE customers", "TABLE customers"),
            ("/* ( ; */ (SELECT 1) -- ) ;", "/* ( ; */ (SELECT 1) -- ) ;"),
            ("-- why\nSELECT 1", "-- why\nSELECT 1"),
            (
                "SELECT ')' AS \"a;)\", $x$ ; ( $x$ AS b, E'\\');' AS c, 'it''s' AS d",
                "SELECT ')' AS \"a;)\", $x$ ; ( $x$ AS b, E'\\');' AS c, 'it''s' AS d",
            ),
            (
                "SELECT $$ ) $$, $1, $2::int, a$b FROM t",
                "SELECT $$ ) $$, $1, $2::int, a$b FROM t",
            ),
            (
                "SELECT /* a /* nested ) */ comment */ 1",
                "SELECT /* a /* nested ) */ comment */ 1",
            ),
            ("SELECT 'a\\' AS backslash", "SELECT 'a\\' AS backslash"),
            (
                "SELECT x'1F', b'01', U&'\\0061', 1.5e3, 0x1f",
                "SELECT x'1F', b'01', U&'\\0061', 1.5e3, 0x1f",
            ),
            ("VALUES (1), (2)", "VALUES (1), (2)"),
        ] {
            assert_eq!(check(query), Ok(run), "{query}");
        }
    }

    #[test]
    fn a_query_that_is_not_closed_on_itself_is_refused_naming_where() {
        use QueryProblem::*;
        for (query, problem) in [
            ("", Empty),
            (" -- nothing\n /* at all */ ;", Empty),
            (
                "SELECT 1) AS q, (SELECT * FROM big",
                UnopenedParenthesis { at: 8 },
            ),
            ("SELECT 1 AS x) AS q -- ", UnopenedParenthesis { at: 13 }),
            ("SELECT (1", UnclosedParentheses { open: 1 }),
            ("SELECT ((1", UnclosedParentheses { open: 2 }),
            ("SELECT 1; SELECT 2", MoreThanOneStatement { at: 8 }),
            ("SELECT 1; -- a comment", MoreThanOneStatement { at: 8 }),
            (
                "SELECT 1 /* open",
                Unterminated {
                    what: "a comment",
                    at: 9,
                },
            ),
            (
                "SELECT 1 /* /* */",
                Unterminated {
                    what: "a comment",
                    at: 9,
                },
            ),
            (
                "SELECT 'open",
                Unterminated {
                    what: "a string",
                    at: 7,
                },
            ),
            (
                "SELECT 'it''s",
                Unterminated {
                    what: "a string",
                    at: 7,
                },
            ),
            (
                "SELECT E'\\'",
                Unterminated {
                    what: "a string",
                    at: 8,
                },
            ),
            (
                "SELECT \"open",
                Unterminated {
                    what: "a quoted name",
                    at: 7,
                },
            ),
            (
                "SELECT $a$ open $b$",
                Unterminated {
                    what: "a dollar-quoted string",
                    at: 7,
                },
            ),
            (
                "DELETE FROM t",
                NotARead {
                    starts_with: "DELETE".to_owned(),
                },
            ),
            (
                "'x'",
                NotARead {
                    starts_with: "'x'".to_owned(),
                },
            ),
            (
                "(DELETE FROM t)",
                NotARead {
                    starts_with: "DELETE".to_owned(),
                },
            ),
            (
                "SELECTx 1",
                NotARead {
                    starts_with: "SELECTx".to_owned(),
                },
            ),
        ] {
            assert_eq!(check(query), Err(problem), "{query}");
        }
    }

    #[test]
    fn problems_say_what_is_wrong() {
        assert_eq!(
            QueryProblem::UnclosedParentheses { open: 1 }.to_string(),
            "leaves 1 parenthesis open"
        );
        assert!(
            QueryProblem::NotARead {
                starts_with: "DELETE".to_owned()
            }
            .to_string()
            .contains("is not a query that reads: it starts with \"DELETE\"")
        );
    }
}
