//! `sql` source parameters are typed by their JSON value, and the same value gets the same answer
//! on every pooled connection — whatever type the connection saw first for the same query.

use std::collections::{BTreeMap, BTreeSet};

use serde_json::json;
use taskfactory_model::values::struct_to_json;
use taskfactory_tests::{EnvOptions, TestDb, TestEnv};

use crate::support::{SourceRole, preview, source_error, with_source};

/// The values each round binds, one of each JSON type, with what `pg_typeof` says they are bound
/// as. `2393736.541207228` is the testers' number: as a float8 its eight bytes spell `ABCDEFGH`.
fn values() -> Vec<(serde_json::Value, &'static str)> {
    vec![
        (json!("ABCDEFGH"), "text"),
        (json!(1), "bigint"),
        (json!(2_393_736.541_207_228), "numeric"),
        (json!(true), "boolean"),
        (serde_json::Value::Null, "text"),
        (json!({"k": [1, "x"]}), "jsonb"),
    ]
}

/// The queries every value goes through.
const QUERIES: &[(&str, &str)] = &[
    (
        "echo",
        "SELECT pg_typeof($1)::text AS t, $1 AS v, pg_backend_pid() AS pid",
    ),
    // A cast the user wrote: every value compares as its text.
    (
        "cast",
        "SELECT id FROM codes WHERE code = $1::text ORDER BY id",
    ),
    // No cast, a text column: only text (and a NULL of type text) compares.
    ("text", "SELECT id FROM codes WHERE code = $1 ORDER BY id"),
    // No cast, an int4 column: integers and other numbers compare.
    ("int", "SELECT code FROM codes WHERE id = $1"),
];

/// What `query` answers for `value` (bound as `bound`): its rows, or what its error must say.
fn expected(
    query: &str,
    value: &serde_json::Value,
    bound: &str,
) -> Result<serde_json::Value, Vec<String>> {
    let type_error = |operator: &str| {
        let json_type = match value {
            serde_json::Value::Number(_) if value.is_i64() => "integer",
            serde_json::Value::Number(_) => "number",
            serde_json::Value::Bool(_) => "boolean",
            serde_json::Value::Object(_) => "object",
            _ => "string",
        };
        Err(vec![
            format!("operator does not exist: {operator}"),
            format!("$1 is a JSON {json_type}, bound as {bound}"),
        ])
    };
    match query {
        "echo" => Ok(json!([{"t": bound, "v": value}])),
        "cast" => Ok(match value {
            serde_json::Value::String(_) => json!([{"id": 1}]),
            serde_json::Value::Number(_) if value.is_i64() => json!([{"id": 2}]),
            serde_json::Value::Number(_) => json!([{"id": 3}]),
            serde_json::Value::Bool(_) => json!([{"id": 4}]),
            serde_json::Value::Object(_) => json!([{"id": 5}]),
            _ => json!([]),
        }),
        "text" => match value {
            serde_json::Value::String(_) => Ok(json!([{"id": 1}])),
            serde_json::Value::Null => Ok(json!([])),
            _ => type_error(&format!("text = {bound}")),
        },
        _ => match value {
            serde_json::Value::Number(_) if value.is_i64() => Ok(json!([{"code": "ABCDEFGH"}])),
            serde_json::Value::Number(_) => Ok(json!([])),
            serde_json::Value::Null => Err(vec![
                "operator does not exist: integer = text".to_owned(),
                "$1 is a JSON null, bound as a NULL of type text".to_owned(),
            ]),
            _ => type_error(&format!("integer = {bound}")),
        },
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sql_parameters_are_typed_by_their_json_value_alike_on_every_pooled_connection()
-> anyhow::Result<()> {
    let crm = TestDb::create().await?;
    let pool = crm.pool().await?;
    sqlx::query("CREATE TABLE codes (id int PRIMARY KEY, code text NOT NULL)")
        .execute(&pool)
        .await?;
    sqlx::query(
        "INSERT INTO codes VALUES (1, 'ABCDEFGH'), (2, '1'), (3, '2393736.541207228'), \
         (4, 'true'), (5, '{\"k\": [1, \"x\"]}')",
    )
    .execute(&pool)
    .await?;
    pool.close().await;
    let role = SourceRole::create(&crm, &["codes"]).await?;
    let env = TestEnv::new(EnvOptions {
        sql_databases: vec![("crm".to_owned(), role.dsn())],
        ..EnvOptions::default()
    })
    .await?;
    let _services = env.start_all().await?;
    let mut admin = env.admin().await?;

    // Every query once per value slot, all in one spec: the sources resolve concurrently, so
    // the pool (four connections) serves them in an order nobody chose. Each round moves every
    // value to the next slot, so each connection prepares each query with one type and then
    // meets the others.
    let values = values();
    let mut sources = Vec::new();
    for (query_name, query) in QUERIES {
        for slot in 0..values.len() {
            sources.push(format!(
                "{{name: {query_name}{slot}, onError: OMIT, sql: {{database: crm, query: \"{query}\", params: ['{{{{ event.values[{slot}] }}}}']}}}}"
            ));
        }
    }
    let spec = with_source("typed-params", &sources.join(", "));
    let mut types_by_backend: BTreeMap<i64, BTreeSet<String>> = BTreeMap::new();
    for round in 0..3 * values.len() {
        let rotated: Vec<&(serde_json::Value, &str)> = (0..values.len())
            .map(|slot| &values[(slot + round) % values.len()])
            .collect();
        let event = json!({"values": rotated.iter().map(|(v, _)| v.clone()).collect::<Vec<_>>()});
        let answer = preview(&mut admin, &spec, event).await?;
        let context = answer
            .context
            .as_ref()
            .map(struct_to_json)
            .unwrap_or_default();
        for (query_name, _) in QUERIES {
            for (slot, (value, bound)) in rotated.iter().enumerate() {
                let name = format!("{query_name}{slot}");
                let error = source_error(&answer, &name);
                let mut rows = context.get(&name).cloned();
                if let Some(serde_json::Value::Array(rows)) = rows.as_mut()
                    && *query_name == "echo"
                {
                    for row in rows {
                        let pid = row
                            .as_object_mut()
                            .and_then(|row| row.remove("pid"))
                            .and_then(|pid| pid.as_i64())
                            .unwrap_or_default();
                        types_by_backend
                            .entry(pid)
                            .or_default()
                            .insert((*bound).to_owned());
                    }
                }
                let what = format!("round {round}, {name} = {value} ({bound})");
                match expected(query_name, value, bound) {
                    Ok(want) => {
                        assert_eq!(error, "", "{what}");
                        assert_eq!(rows, Some(want), "{what}");
                    }
                    Err(messages) => {
                        assert_eq!(rows, None, "{what}: no rows, an error");
                        for message in messages {
                            assert!(error.contains(&message), "{what}: {message:?} in {error}");
                        }
                    }
                }
            }
        }
    }
    // The scenario happened: several connections answered, each of them for several types.
    assert!(
        types_by_backend.len() >= 2,
        "several pooled connections: {types_by_backend:?}"
    );
    assert!(
        types_by_backend.values().all(|types| types.len() >= 3),
        "each connection met several types: {types_by_backend:?}"
    );
    Ok(())
}
