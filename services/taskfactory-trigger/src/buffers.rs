//! Flow control's debounce and batch (`flow.debounce`, `flow.batch`): a key's events are kept
//! until one run fires for them all.
//!
//! - **Debounce:** a burst's run fires once its key has been quiet for `period` (each event puts
//!   it off), or `timeout` after the burst's first event. Its `event` is the burst's last event
//!   (keep `LAST`) or `{batch, key, size}` with every event (keep `ALL`).
//! - **Batch:** a batch's run fires at `maxSize` events, or `timeout` after its first. Its `event`
//!   is `{batch, key, size}`.
//!
//! The buffer is a row per activity and key (`event_buffers`, with its events in
//! `event_buffer_items`), so it survives restarts and is shared by every trigger replica. Its run
//! is known from its first event: the fire's dedupe key is made of it (`<kind>:<first event>:<key>`),
//! so every event taken is recorded at once `DEBOUNCED` or `BATCHED` with that run, in the
//! transaction that takes it. An event delivered again finds its decision made and is not taken
//! twice. A buffer fires in the transaction that records its fire and deletes it: when full, in the
//! transaction of the event that fills it; when due, by the flusher ([`run_flusher`]) of any
//! replica (rows are taken with `SKIP LOCKED`), on the trigger's clock. A buffer whose time passed
//! while no trigger ran fires once one is back.

use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use prost::Message as _;
use sqlx::PgPool;
use taskfactory_model::ids::{ActivityId, RunId};
use taskfactory_model::values;
use taskfactory_proto::v1::event_decision::Decision;
use taskfactory_proto::v1::{Flow, FlowAdmission, OverlapPolicy, TriggerSource, debounce};
use taskfactory_runtime::clock::ClockHandle;
use taskfactory_runtime::metrics;
use taskfactory_runtime::telemetry::error_chain;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::event_ledger::{self, DecisionRow, EventOrigin};
use crate::fire::{self, FireRequest};
use crate::registry::LiveActivity;
use crate::store::{self, FireWrite, NewFire, StoreError};

/// How an activity gathers its events.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Gather {
    Debounce {
        period: Duration,
        timeout: Option<Duration>,
        keep_all: bool,
    },
    Batch {
        max_size: u32,
        timeout: Duration,
    },
}

impl Gather {
    /// The activity's, if it gathers events; with its key expression.
    pub fn of(flow: Option<&Flow>) -> Option<(Self, &str)> {
        let flow = flow?;
        let duration =
            |d: Option<&prost_types::Duration>| d.and_then(taskfactory_model::spec::std_duration);
        if let Some(debounce) = &flow.debounce {
            return Some((
                Self::Debounce {
                    period: duration(debounce.period.as_ref()).unwrap_or_default(),
                    timeout: duration(debounce.timeout.as_ref()),
                    keep_all: debounce.keep() == debounce::Keep::All,
                },
                debounce.key.as_str(),
            ));
        }
        let batch = flow.batch.as_ref()?;
        Some((
            Self::Batch {
                max_size: batch.max_size.max(1),
                timeout: duration(batch.timeout.as_ref()).unwrap_or_default(),
            },
            batch.key.as_str(),
        ))
    }

    /// Its spelling in `event_buffers.kind`.
    fn kind(self) -> &'static str {
        match self {
            Self::Debounce {
                keep_all: false, ..
            } => "DEBOUNCE_LAST",
            Self::Debounce { keep_all: true, .. } => "DEBOUNCE_ALL",
            Self::Batch { .. } => "BATCH",
        }
    }

    fn decision(self) -> Decision {
        match self {
            Self::Debounce { .. } => Decision::Debounced,
            Self::Batch { .. } => Decision::Batched,
        }
    }

    /// When a buffer opened at `opened` fires by time, after an event at `now`.
    fn due(self, opened: DateTime<Utc>, now: DateTime<Utc>) -> DateTime<Utc> {
        let after = |d: Duration| chrono::TimeDelta::from_std(d).unwrap_or(chrono::TimeDelta::MAX);
        match self {
            Self::Debounce {
                period, timeout, ..
            } => {
                let quiet = now + after(period);
                timeout.map_or(quiet, |timeout| quiet.min(opened + after(timeout)))
            }
            Self::Batch { timeout, .. } => opened + after(timeout),
        }
    }

    /// Why an event was taken into the buffer of `run`.
    fn reason(self, key: &str, run: RunId) -> String {
        let human = |d: Duration| humantime::format_duration(d).to_string();
        match self {
            Self::Debounce {
                period, timeout, ..
            } => format!(
                "kept by flow.debounce for key {key:?}: run {run} fires once the key is quiet for {}{}",
                human(period),
                timeout.map_or(String::new(), |t| format!(
                    " (at most {} after the burst's first event)",
                    human(t)
                ))
            ),
            Self::Batch { max_size, timeout } => format!(
                "kept by flow.batch for key {key:?}: run {run} fires at {max_size} events or {} after the batch's first",
                human(timeout)
            ),
        }
    }
}

/// The row key of a buffer: its key, and under flow.concurrency or flow.throttle a digest of how
/// the event's run would be admitted (its keys and limits, not its priority), so that events whose
/// runs would be admitted otherwise are gathered apart. (A change of those limits opens new
/// buffers; one gathered before fires, when due, as it was gathered.)
fn buffer_key(key: &str, flow: Option<&FlowAdmission>) -> String {
    use sha2::Digest as _;
    match flow {
        None => key.to_owned(),
        Some(flow) => {
            let admitted = FlowAdmission {
                priority: 0,
                arrival_ns: 0,
                ..flow.clone()
            };
            let digest = hex::encode(sha2::Sha256::digest(admitted.encode_to_vec()));
            let mut row = format!("{key}\u{1f}{digest}");
            values::make_storable_key(&mut row);
            row
        }
    }
}

/// Debounce and batch buffers: taking events in, and firing them.
pub struct Buffers {
    pub pool: PgPool,
    pub js: async_nats::jetstream::Context,
    /// The trigger's clock (tests drive it): when events come and buffers are due.
    pub clock: ClockHandle,
    /// Largest sum of event bytes one buffer holds; an event that would pass it fires the
    /// buffer first and opens the next.
    pub max_bytes: usize,
    /// Wakes the flusher when a buffer is opened here.
    pub opened: tokio::sync::Notify,
}

/// What became of an event at an activity that gathers events.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Taken {
    /// Taken into the buffer whose run is this.
    Into(RunId),
    /// Its key was taken before, into the buffer of this run: recorded `DEDUPED`.
    Duplicate(RunId),
    /// Decided before (delivered again): nothing done.
    Before,
}

/// An event to take: its activity, how it gathers, the buffer's key, how the buffer's run is
/// admitted, and the event.
pub struct Event<'a> {
    pub activity: &'a LiveActivity,
    pub gather: Gather,
    pub key: &'a str,
    /// Under flow.concurrency or flow.throttle: the event's keys and priority. Events of one key
    /// with other keys here are gathered apart (the buffer's row is that of all its keys), and
    /// the run is admitted as its first event says.
    pub flow: Option<FlowAdmission>,
    /// The key recorded with the event's decision (its id).
    pub event_key: String,
    pub origin: &'a Arc<EventOrigin>,
    pub payload: &'a serde_json::Value,
}

impl Buffers {
    /// Takes an event into its key's buffer, recording its decision, in one transaction; fires
    /// the buffer at once when the event fills it (a batch at `maxSize`, or any buffer whose bytes
    /// it would pass, which fires before it is taken).
    pub async fn take(&self, event: Event<'_>) -> Result<Taken, StoreError> {
        let Event {
            activity,
            gather,
            key: shown_key,
            flow,
            event_key,
            origin,
            payload,
        } = event;
        let row_key = buffer_key(shown_key, flow.as_ref());
        let key = row_key.as_str();
        // The run's place among those waiting under flow control: when its first event came.
        let admission = flow.map(|mut flow| {
            flow.arrival_ns = origin.published_ns;
            flow.encode_to_vec()
        });
        let now = self.clock.now();
        // As the run's TriggerEvent will carry it (a protobuf Struct, larger than the JSON).
        let bytes = i64::try_from(values::json_to_value(payload).encoded_len()).unwrap_or(i64::MAX);
        let keeps_all = !matches!(
            gather,
            Gather::Debounce {
                keep_all: false,
                ..
            }
        );
        let mut fired = Vec::new();
        let mut tx = self.pool.begin().await?;
        let (size, opened, run) = loop {
            let mut opening = format!(
                "{}:{}:{}:{key}",
                gather.kind().to_ascii_lowercase(),
                origin.sequence,
                origin.published_ns
            );
            values::make_storable_key(&mut opening);
            // Locks the key's buffer, opening it with this event first if there is none.
            let (dedupe_key, size, held, opened, kind): (String, i32, i64, DateTime<Utc>, String) =
                sqlx::query_as(
                    "INSERT INTO event_buffers (activity_id, key, kind, activity_version, \
                     activity_name, dedupe_key, subject, opened_at, last_at, due_at, flow, \
                     shown_key) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $8, $9, $10, $11) \
                 ON CONFLICT (activity_id, key) DO UPDATE SET last_at = event_buffers.last_at \
                 RETURNING dedupe_key, size, bytes, opened_at, kind",
                )
                .bind(activity.id.0)
                .bind(key)
                .bind(gather.kind())
                .bind(i32::try_from(activity.version).unwrap_or(i32::MAX))
                .bind(&activity.name)
                .bind(&opening)
                .bind(&origin.subject)
                .bind(now)
                .bind(gather.due(now, now))
                .bind(admission.as_deref())
                .bind(shown_key)
                .fetch_one(&mut *tx)
                .await?;
            // A buffer opened under another way of gathering (the spec changed) fires as it was
            // gathered; so does one this event would take past its bytes.
            let over = keeps_all && size > 0 && held.saturating_add(bytes) > self.max_bytes_i64();
            if kind != gather.kind() || over {
                fired.extend(flush_locked(&mut tx, activity.id, key, now).await?);
                continue;
            }
            break (size, opened, RunId::derive(activity.id, &dedupe_key));
        };
        // An event whose key was taken before (published again after the stream's duplicate
        // window, a webhook delivered again): recorded DEDUPED with the run that has it.
        let earlier: Option<Uuid> = sqlx::query_scalar(
            "SELECT run_id FROM event_decisions WHERE activity_id = $1 AND event_key = $2 \
                 AND decision IN ('DEBOUNCED', 'BATCHED') LIMIT 1",
        )
        .bind(activity.id.0)
        .bind(&event_key)
        .fetch_optional(&mut *tx)
        .await?
        .flatten();
        if let Some(earlier) = earlier {
            if size == 0 {
                // Opened by this event: nothing to keep.
                sqlx::query("DELETE FROM event_buffers WHERE activity_id = $1 AND key = $2")
                    .bind(activity.id.0)
                    .bind(key)
                    .execute(&mut *tx)
                    .await?;
            }
            let earlier = RunId(earlier);
            let decision = DecisionRow {
                activity_id: activity.id,
                activity_name: activity.name.clone(),
                activity_version: activity.version,
                origin: origin.clone(),
                reason: format!(
                    "its key {event_key:?} was taken before, into run {earlier}; not taken again"
                ),
                key: event_key,
                decision: Decision::Deduped,
                run_id: Some(earlier),
                decided_at: now,
                flow_key: Some(shown_key.to_owned()),
            };
            let decided = event_ledger::insert(&mut tx, std::slice::from_ref(&decision)).await?;
            tx.commit().await?;
            event_ledger::count(std::slice::from_ref(&decision), &decided);
            self.publish(&fired).await;
            return Ok(if decided.first() == Some(&true) {
                Taken::Duplicate(earlier)
            } else {
                Taken::Before
            });
        }
        let decision = DecisionRow {
            activity_id: activity.id,
            activity_name: activity.name.clone(),
            activity_version: activity.version,
            origin: origin.clone(),
            key: event_key,
            decision: gather.decision(),
            reason: gather.reason(shown_key, run),
            run_id: Some(run),
            decided_at: now,
            flow_key: Some(shown_key.to_owned()),
        };
        let decided = event_ledger::insert(&mut tx, std::slice::from_ref(&decision)).await?;
        if decided.first() != Some(&true) {
            // Taken before (this event came again): the first decision stands.
            tx.rollback().await?;
            return Ok(Taken::Before);
        }
        if keeps_all {
            sqlx::query(
                "INSERT INTO event_buffer_items \
                     (activity_id, key, stream_published, stream_sequence, payload) \
                 VALUES ($1, $2, $3, $4, $5) ON CONFLICT DO NOTHING",
            )
            .bind(activity.id.0)
            .bind(key)
            .bind(origin.published_ns)
            .bind(i64::try_from(origin.sequence).unwrap_or(i64::MAX))
            .bind(sqlx::types::Json(payload))
            .execute(&mut *tx)
            .await?;
        }
        // The last event is the latest in the stream of those taken (events are handled at
        // once, and one delivered again comes late).
        sqlx::query(
            "UPDATE event_buffers SET size = size + 1, bytes = bytes + $3, last_at = $4, \
                 activity_version = $6, due_at = $7, \
                 subject = CASE WHEN latest THEN $5 ELSE subject END, \
                 last_payload = CASE WHEN $8 THEN NULL WHEN latest THEN $9 ELSE last_payload END, \
                 last_published = CASE WHEN latest THEN $10 ELSE last_published END, \
                 last_sequence = CASE WHEN latest THEN $11 ELSE last_sequence END \
             FROM (SELECT last_published IS NULL \
                       OR ($10::int8, $11::int8) > (last_published, last_sequence) AS latest \
                   FROM event_buffers WHERE activity_id = $1 AND key = $2) AS e \
             WHERE activity_id = $1 AND key = $2",
        )
        .bind(activity.id.0)
        .bind(key)
        .bind(bytes)
        .bind(now)
        .bind(&origin.subject)
        .bind(i32::try_from(activity.version).unwrap_or(i32::MAX))
        .bind(gather.due(opened, now))
        .bind(keeps_all)
        .bind(sqlx::types::Json(payload))
        .bind(origin.published_ns)
        .bind(i64::try_from(origin.sequence).unwrap_or(i64::MAX))
        .execute(&mut *tx)
        .await?;
        if let Gather::Batch { max_size, .. } = gather
            && i64::from(size) + 1 >= i64::from(max_size)
        {
            fired.extend(flush_locked(&mut tx, activity.id, key, now).await?);
        }
        tx.commit().await?;
        event_ledger::count(std::slice::from_ref(&decision), &decided);
        if size == 0 {
            self.opened.notify_one();
        }
        self.publish(&fired).await;
        Ok(Taken::Into(run))
    }

    /// Counts and publishes the fires of buffers, once recorded.
    async fn publish(&self, fired: &[NewFire]) {
        for fire in fired {
            metrics::record_fire(&fire.activity_name, "event", "fired");
        }
        fire::publish_recorded(&self.pool, &self.js, fired).await;
    }

    fn max_bytes_i64(&self) -> i64 {
        i64::try_from(self.max_bytes).unwrap_or(i64::MAX)
    }

    /// Fires the buffer of `(activity, key)` if it is still due at `now` and no one else is
    /// firing it.
    async fn flush_due(
        &self,
        activity: ActivityId,
        key: &str,
        now: DateTime<Utc>,
    ) -> Result<(), StoreError> {
        let mut tx = self.pool.begin().await?;
        let due: Option<i32> = sqlx::query_scalar(
            "SELECT 1 FROM event_buffers WHERE activity_id = $1 AND key = $2 AND due_at <= $3 \
             FOR UPDATE SKIP LOCKED",
        )
        .bind(activity.0)
        .bind(key)
        .bind(now)
        .fetch_optional(&mut *tx)
        .await?;
        if due.is_none() {
            return Ok(());
        }
        let fired = flush_locked(&mut tx, activity, key, now).await?;
        tx.commit().await?;
        self.publish(fired.as_slice()).await;
        Ok(())
    }
}

/// Fires the buffer of `(activity, key)`, locked by the caller, in its transaction: records its
/// fire and deletes it. Returns the fire to publish once committed (none if it fired before).
async fn flush_locked(
    tx: &mut sqlx::PgConnection,
    activity: ActivityId,
    key: &str,
    now: DateTime<Utc>,
) -> Result<Option<NewFire>, StoreError> {
    type BufferRow = (
        String,
        i32,
        String,
        String,
        String,
        i32,
        Option<serde_json::Value>,
        Option<Vec<u8>>,
        Option<String>,
    );
    let row: Option<BufferRow> = sqlx::query_as(
        "DELETE FROM event_buffers WHERE activity_id = $1 AND key = $2 \
         RETURNING kind, activity_version, activity_name, dedupe_key, subject, size, last_payload, \
             flow, shown_key",
    )
    .bind(activity.0)
    .bind(key)
    .fetch_optional(&mut *tx)
    .await?;
    let Some((kind, version, name, dedupe_key, subject, size, last, admission, shown_key)) = row
    else {
        return Ok(None);
    };
    // Written by this service from a FlowAdmission: one that does not decode is no admission.
    let flow = admission.and_then(|bytes| FlowAdmission::decode(bytes.as_slice()).ok());
    let deleted: bool =
        sqlx::query_scalar("SELECT deleted_at IS NOT NULL FROM activities WHERE id = $1")
            .bind(activity.0)
            .fetch_optional(&mut *tx)
            .await?
            .unwrap_or(true);
    if deleted {
        // Deleted since: its events make no run.
        sqlx::query("DELETE FROM event_buffer_items WHERE activity_id = $1 AND key = $2")
            .bind(activity.0)
            .bind(key)
            .execute(&mut *tx)
            .await?;
        tracing::info!(activity.name = %name, events = size, "a deleted activity's gathered events make no run");
        return Ok(None);
    }
    let payload = if kind == "DEBOUNCE_LAST" {
        sqlx::query("DELETE FROM event_buffer_items WHERE activity_id = $1 AND key = $2")
            .bind(activity.0)
            .bind(key)
            .execute(&mut *tx)
            .await?;
        last.unwrap_or(serde_json::Value::Null)
    } else {
        let mut items: Vec<(i64, i64, sqlx::types::Json<serde_json::Value>)> = sqlx::query_as(
            "DELETE FROM event_buffer_items WHERE activity_id = $1 AND key = $2 \
             RETURNING stream_published, stream_sequence, payload",
        )
        .bind(activity.0)
        .bind(key)
        .fetch_all(&mut *tx)
        .await?;
        // In the order the events reached the stream.
        items.sort_unstable_by_key(|(published, sequence, _)| (*published, *sequence));
        serde_json::json!({
            "batch": items.into_iter().map(|(_, _, item)| item.0).collect::<Vec<_>>(),
            "key": shown_key.as_deref().unwrap_or(key),
            "size": size,
        })
    };
    let mut request = FireRequest {
        activity_id: activity,
        activity_name: name,
        activity_version: u32::try_from(version).unwrap_or(0),
        source: TriggerSource::Event,
        dedupe_key,
        scheduled_for: None,
        payload: Some(Arc::new(payload)),
        subject,
        fired_at: now,
        dst_note: None,
        overlap: OverlapPolicy::OverlapUnspecified,
        origin: None,
        rate_limit: None,
        flow,
    };
    let fire = fire::prepare(&mut request);
    let (recorded, decided) = store::record_fires_in(
        &mut *tx,
        &[FireWrite {
            fire: &fire,
            schedule: None,
        }],
    )
    .await?;
    drop(decided); // a fire without an event: no decision of its own
    match recorded.into_iter().next() {
        Some(Ok(true)) => {
            tracing::info!(activity.name = %fire.activity_name, fire.id = %fire.id, events = size, "fired a gathered burst or batch");
            Ok(Some(fire))
        }
        Some(Ok(false)) | None => Ok(None),
        Some(Err(error)) => Err(error),
    }
}

/// Buffers looked at per turn.
const DUE_BATCH: i64 = 200;

/// The flusher: fires every buffer that is due by the trigger's clock, then sleeps until the next
/// one is, a buffer is opened here, or a second passed (buffers other replicas opened). Every
/// trigger replica runs one.
pub async fn run_flusher(buffers: Arc<Buffers>, shutdown: CancellationToken) {
    loop {
        let now = buffers.clock.now();
        let due: Vec<(Uuid, String)> = match sqlx::query_as(
            "SELECT activity_id, key FROM event_buffers WHERE due_at <= $1 \
             ORDER BY due_at LIMIT $2",
        )
        .bind(now)
        .bind(DUE_BATCH)
        .fetch_all(&buffers.pool)
        .await
        {
            Ok(due) => due,
            Err(error) => {
                tracing::warn!(error = %error_chain(&error), "cannot read the buffers that are due; will retry");
                Vec::new()
            }
        };
        let full = i64::try_from(due.len()).unwrap_or(i64::MAX) >= DUE_BATCH;
        for (activity, key) in due {
            if let Err(error) = buffers.flush_due(ActivityId(activity), &key, now).await {
                tracing::warn!(activity.id = %activity, error = %error_chain(&error), "cannot fire a due buffer yet; will retry");
            }
        }
        if full {
            continue;
        }
        let next: Option<DateTime<Utc>> = match sqlx::query_scalar(
            "SELECT min(due_at) FROM event_buffers",
        )
        .fetch_one(&buffers.pool)
        .await
        {
            Ok(next) => next,
            Err(error) => {
                tracing::warn!(error = %error_chain(&error), "cannot read when the next buffer is due; will retry");
                None
            }
        };
        let until = next.unwrap_or(now + chrono::TimeDelta::hours(1));
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = buffers.clock.sleep_until(until) => {}
            () = tokio::time::sleep(Duration::from_secs(1)) => {}
            () = buffers.opened.notified() => {}
        }
    }
}
