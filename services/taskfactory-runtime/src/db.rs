//! Postgres: creating the database if absent, the pool, and the migrations (embedded from the
//! top-level `migrations/`; sqlx serialises concurrent runs with an advisory lock).

use crate::telemetry::error_chain;
use std::str::FromStr;
use std::time::Duration;

use sqlx::ConnectOptions;
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};

use crate::config::DatabaseArgs;

pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("../../migrations");

#[derive(Debug, thiserror::Error)]
pub enum DbError {
    #[error("DATABASE_URL is not a valid Postgres URL")]
    Url(#[source] sqlx::Error),
    #[error("could not connect to Postgres within {waited:?}")]
    Connect {
        waited: Duration,
        #[source]
        source: sqlx::Error,
    },
    #[error("could not create database {database}")]
    Create {
        database: String,
        #[source]
        source: sqlx::Error,
    },
    #[error("migrations failed")]
    Migrate(#[source] sqlx::migrate::MigrateError),
}

/// Connects (creating the database if it does not exist, retrying for up to `patience` while the
/// server is not reachable) and runs the migrations.
pub async fn connect_and_migrate(
    args: &DatabaseArgs,
    patience: Duration,
) -> Result<PgPool, DbError> {
    let options = connect_options(args)?;
    let started = tokio::time::Instant::now();
    let mut delay = Duration::from_millis(100);
    loop {
        match try_connect(&options, args.pool_size).await {
            Ok(pool) => {
                MIGRATOR.run(&pool).await.map_err(DbError::Migrate)?;
                return Ok(pool);
            }
            Err(DbError::Connect { source, .. }) if started.elapsed() < patience => {
                tracing::warn!(error = %error_chain(&source), "postgres not reachable yet; retrying");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(2));
            }
            Err(DbError::Connect { source, .. }) => {
                return Err(DbError::Connect {
                    waited: started.elapsed(),
                    source,
                });
            }
            Err(other) => return Err(other),
        }
    }
}

/// Another pool on the same database, of `size` connections, for work that must not wait behind
/// the service's main pool (a trigger's admin API behind its scheduler). Connects lazily: the
/// database is there, since [`connect_and_migrate`] returned.
pub fn another_pool(args: &DatabaseArgs, size: u32) -> Result<PgPool, DbError> {
    Ok(pool_options(size).connect_lazy_with(connect_options(args)?))
}

/// How every connection of a service is made.
fn connect_options(args: &DatabaseArgs) -> Result<PgConnectOptions, DbError> {
    Ok(PgConnectOptions::from_str(&args.url)
        .map_err(DbError::Url)?
        .log_statements(tracing::log::LevelFilter::Debug)
        // A process that froze (or lost the network) inside a transaction must not hold its
        // locks for long: the scheduling fence, a run's overlap lock.
        .options([("idle_in_transaction_session_timeout", "15s")]))
}

/// Every pool of a service, of `size` connections.
fn pool_options(size: u32) -> PgPoolOptions {
    PgPoolOptions::new()
        .max_connections(size.max(1))
        .acquire_timeout(Duration::from_secs(10))
}

async fn try_connect(options: &PgConnectOptions, pool_size: u32) -> Result<PgPool, DbError> {
    let connect = |options: PgConnectOptions| pool_options(pool_size).connect_with(options);
    match connect(options.clone()).await {
        Ok(pool) => Ok(pool),
        // 3D000: invalid_catalog_name — the database does not exist yet.
        Err(sqlx::Error::Database(e)) if e.code().as_deref() == Some("3D000") => {
            let database = options.get_database().unwrap_or("taskfactory").to_owned();
            create_database(options, &database).await?;
            connect(options.clone())
                .await
                .map_err(|source| DbError::Connect {
                    waited: Duration::ZERO,
                    source,
                })
        }
        Err(source) => Err(DbError::Connect {
            waited: Duration::ZERO,
            source,
        }),
    }
}

async fn create_database(options: &PgConnectOptions, database: &str) -> Result<(), DbError> {
    let admin = options.clone().database("postgres");
    let mut conn = admin.connect().await.map_err(|source| DbError::Connect {
        waited: Duration::ZERO,
        source,
    })?;
    let quoted = format!("\"{}\"", database.replace('"', "\"\""));
    let statement = format!("CREATE DATABASE {quoted}");
    match sqlx::query(sqlx::AssertSqlSafe(statement))
        .execute(&mut conn)
        .await
    {
        Ok(_) => {
            tracing::info!(database, "created database");
            Ok(())
        }
        // 42P04 duplicate_database, or 23505 when two creations race in the catalog: another
        // service created it first.
        Err(sqlx::Error::Database(e)) if matches!(e.code().as_deref(), Some("42P04" | "23505")) => {
            Ok(())
        }
        Err(source) => Err(DbError::Create {
            database: database.to_owned(),
            source,
        }),
    }
}

/// A database error that the same input would meet on every try: its SQLSTATE and message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RefusedInput {
    pub code: String,
    /// The server's message (no detail: that may quote the refused row).
    pub message: String,
}

/// What becomes of a batch the database failed as a whole (the one rule of every group commit):
/// `None` when it refused some item's data, so the items are written one by one and the bad one
/// alone fails; otherwise (the database down, a pool timeout: each item would fail as well, only
/// slower) the error once for each of the `items`.
pub fn batch_failed(error: &sqlx::Error, items: usize) -> Option<Vec<sqlx::Error>> {
    if input_refused_by_database(error).is_some() {
        return None;
    }
    let why = crate::telemetry::error_chain(error);
    Some(
        (0..items)
            .map(|_| sqlx::Error::Protocol(why.clone()))
            .collect(),
    )
}

/// The database error in `error`'s chain that the same input would meet on every try: a data
/// exception (class 22: a value out of range, an invalid encoding), a program limit (class 54:
/// an index row or a value too large), a NOT NULL or CHECK violation (23502, 23514). A handler
/// that would otherwise retry for as long as the database is down dead-letters such input
/// instead of looping. Unique and foreign-key violations are left out: a race between replicas
/// produces them, and a retry sees the winner's row.
pub fn input_refused_by_database(
    error: &(dyn std::error::Error + 'static),
) -> Option<RefusedInput> {
    let mut current = Some(error);
    while let Some(error) = current {
        if let Some(sqlx::Error::Database(db)) = error.downcast_ref::<sqlx::Error>()
            && let Some(code) = db.code()
            && (code.starts_with("22")
                || code.starts_with("54")
                || code == "23502"
                || code == "23514")
        {
            return Some(RefusedInput {
                code: code.into_owned(),
                message: db.message().to_owned(),
            });
        }
        current = error.source();
    }
    None
}

/// Runs `delete` (a `DELETE` of at most `$1` rows) until it deletes fewer than `batch` rows;
/// returns how many it deleted. For pruners that must not hold many locks or a long
/// transaction at once.
pub async fn delete_in_batches(
    pool: &PgPool,
    delete: &'static str,
    batch: i64,
) -> Result<u64, sqlx::Error> {
    let mut deleted = 0;
    loop {
        let now = sqlx::query(delete)
            .bind(batch)
            .execute(pool)
            .await?
            .rows_affected();
        deleted += now;
        if now < u64::try_from(batch).unwrap_or(u64::MAX) {
            return Ok(deleted);
        }
    }
}
