//! Why did this event (not) run: one recorded decision per event and activity it reached, served
//! by `ListEventDecisions` and counted per decision.

use std::collections::HashSet;
use std::time::Duration;

use taskfactory_proto::v1::event_decision::Decision;
use taskfactory_proto::v1::{
    EventDecision, ListEventDecisionsRequest, PauseActivityRequest, RunStatus,
};
use taskfactory_tests::{EnvOptions, TestEnv, wait_for};
use tonic::Code;

use crate::schedules::wait_for_triggers_drained;
use crate::support::{Admin, create, event_fire, finished_run, publish_event};

/// Every decision `request` selects, newest first, read `page_size` at a time.
pub(crate) async fn decisions(
    admin: &mut Admin,
    request: ListEventDecisionsRequest,
) -> anyhow::Result<Vec<EventDecision>> {
    let mut all = Vec::new();
    let mut token = String::new();
    loop {
        let page = admin
            .list_event_decisions(ListEventDecisionsRequest {
                page_token: token.clone(),
                ..request.clone()
            })
            .await?
            .into_inner();
        all.extend(page.decisions);
        if page.next_page_token.is_empty() {
            return Ok(all);
        }
        token = page.next_page_token;
    }
}

pub(crate) fn of_activity(activity: &str) -> ListEventDecisionsRequest {
    ListEventDecisionsRequest {
        activity: activity.to_owned(),
        page_size: 1000,
        ..Default::default()
    }
}

/// The decisions at `activity`, asserting there is exactly one for each of `events` events.
pub(crate) async fn one_decision_each(
    admin: &mut Admin,
    activity: &str,
    events: i64,
) -> anyhow::Result<Vec<EventDecision>> {
    let made = decisions(admin, of_activity(activity)).await?;
    let mut ids: Vec<&str> = made.iter().map(|d| d.event_id.as_str()).collect();
    ids.sort_unstable();
    ids.dedup();
    assert_eq!(made.len(), ids.len(), "{activity}: one decision per event");
    assert_eq!(made.len(), usize::try_from(events)?, "{activity}");
    Ok(made)
}

/// `(event id, decision)` per row.
pub(crate) fn summary(rows: &[EventDecision]) -> Vec<(String, Decision)> {
    rows.iter()
        .map(|d| (d.event_id.clone(), d.decision()))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_event_gets_one_decision_at_each_activity_it_reaches_with_the_reason()
-> anyhow::Result<()> {
    let env = TestEnv::new(EnvOptions::default()).await?;
    let _services = env.start_all().await?;
    let mut admin = env.admin().await?;
    let js = env.js().await?;
    create(
        &mut admin,
        "name: big-orders\ntrigger: {event: {subject: 'events.orders.*', filter: 'event.amount > 100', dedupeKey: '{{ event.order_id }}'}}\ntasks: [{name: t, type: noop}]",
    )
    .await?;
    create(
        &mut admin,
        "name: all-orders\ntrigger: {event: {subject: 'events.orders.*'}}\ntasks: [{name: t, type: noop}]",
    )
    .await?;
    create(
        &mut admin,
        "name: keyed-badly\ntrigger: {event: {subject: 'events.orders.*', dedupeKey: '{{ event.customer.id }}'}}\ntasks: [{name: t, type: noop}]",
    )
    .await?;
    create(
        &mut admin,
        "name: on-hold\ntrigger: {event: {subject: 'events.orders.*'}}\ntasks: [{name: t, type: noop}]",
    )
    .await?;
    create(
        &mut admin,
        "name: elsewhere\ntrigger: {event: {subject: 'events.refunds.*'}}\ntasks: [{name: t, type: noop}]",
    )
    .await?;
    admin
        .pause_activity(PauseActivityRequest {
            id: "on-hold".to_owned(),
            note: "maintenance".to_owned(),
        })
        .await?;

    let events: [(&str, &[u8]); 5] = [
        ("e1", br#"{"order_id": "o1", "amount": 500}"#),
        ("e2", br#"{"order_id": "o2", "amount": 5}"#),
        ("e3", br#"{"order_id": "o3", "amount": "abc"}"#),
        ("e4", br#"{"order_id": "o1", "amount": 700}"#),
        ("e5", b"{not json"),
    ];
    // One at a time: of two events with one key handled at once, whichever commits first fires.
    for (id, body) in events {
        publish_event(&js, "events.orders.created", body.to_vec(), Some(id)).await?;
        // Four activities reached: four decisions about it.
        wait_for(
            &format!("the decisions about {id}"),
            Duration::from_secs(30),
            || {
                let mut admin = admin.clone();
                async move {
                    let made = decisions(
                        &mut admin,
                        ListEventDecisionsRequest {
                            event_id: id.to_owned(),
                            ..of_activity("")
                        },
                    )
                    .await?;
                    Ok((made.len() >= 4).then_some(()))
                }
            },
        )
        .await?;
    }
    wait_for_triggers_drained(&js).await?;

    let big = decisions(&mut admin, of_activity("big-orders")).await?;
    assert_eq!(
        summary(&big),
        [
            ("e5".to_owned(), Decision::Rejected),
            ("e4".to_owned(), Decision::Deduped),
            ("e3".to_owned(), Decision::FilterError),
            ("e2".to_owned(), Decision::Filtered),
            ("e1".to_owned(), Decision::Fired),
        ],
        "newest first, one per event: {big:#?}"
    );
    let [rejected, deduped, filter_error, filtered, fired] = &big[..] else {
        unreachable!()
    };
    assert_eq!(fired.key, "o1");
    assert!(!fired.run_id.is_empty());
    assert_eq!(deduped.key, "o1", "{deduped:?}");
    assert_eq!(deduped.run_id, fired.run_id, "the run its key made before");
    assert!(deduped.reason.contains(&fired.run_id), "{deduped:?}");
    assert_eq!(filtered.key, "o2", "the key its fire would have had");
    assert!(
        filtered.reason.contains("event.amount > 100") && filtered.reason.contains("false"),
        "{filtered:?}"
    );
    assert!(
        filter_error.reason.contains("event.amount > 100")
            && filter_error.reason.contains("string")
            && filter_error.reason.contains("number"),
        "names the expression and the types: {filter_error:?}"
    );
    assert!(rejected.reason.contains("not valid JSON"), "{rejected:?}");
    for decision in &big {
        assert_eq!(decision.activity_name, "big-orders");
        assert_eq!(decision.subject, "events.orders.created");
        assert_eq!(decision.activity_version, 1);
        assert!(decision.decided_at.is_some());
    }
    let fired_run = finished_run(&admin, &fired.run_id, Duration::from_secs(30)).await?;
    assert_eq!(fired_run.dedupe_key, "o1");
    let fired_now = decisions(
        &mut admin,
        ListEventDecisionsRequest {
            decisions: vec![Decision::Fired as i32],
            ..of_activity("big-orders")
        },
    )
    .await?;
    assert_eq!(fired_now.len(), 1);
    assert_eq!(fired_now[0].run_status(), RunStatus::RunSucceeded);

    let all = decisions(&mut admin, of_activity("all-orders")).await?;
    assert_eq!(
        summary(&all),
        [
            ("e5".to_owned(), Decision::Rejected),
            ("e4".to_owned(), Decision::Fired),
            ("e3".to_owned(), Decision::Fired),
            ("e2".to_owned(), Decision::Fired),
            ("e1".to_owned(), Decision::Fired),
        ]
    );
    assert!(all.iter().all(|d| d.key == d.event_id), "{all:#?}");
    let bad_keys = decisions(&mut admin, of_activity("keyed-badly")).await?;
    assert_eq!(bad_keys.len(), 5);
    for decision in &bad_keys[1..] {
        assert_eq!(decision.decision(), Decision::KeyError);
        assert!(
            decision.reason.contains("event.customer is undefined"),
            "names what is undefined: {decision:?}"
        );
    }
    let held = decisions(&mut admin, of_activity("on-hold")).await?;
    assert_eq!(
        summary(&held)[1..],
        ["e4", "e3", "e2", "e1"].map(|e| (e.to_owned(), Decision::Paused))
    );
    assert!(
        decisions(&mut admin, of_activity("elsewhere"))
            .await?
            .is_empty(),
        "an activity the event did not reach has no decision about it"
    );

    // Filters: a key across activities, an event, decisions, a time range.
    let o1 = decisions(
        &mut admin,
        ListEventDecisionsRequest {
            key: "o1".to_owned(),
            page_size: 100,
            ..Default::default()
        },
    )
    .await?;
    assert_eq!(
        summary(&o1),
        [
            ("e4".to_owned(), Decision::Deduped),
            ("e1".to_owned(), Decision::Fired)
        ]
    );
    let e3 = decisions(
        &mut admin,
        ListEventDecisionsRequest {
            event_id: "e3".to_owned(),
            page_size: 100,
            ..Default::default()
        },
    )
    .await?;
    let mut at: Vec<&str> = e3.iter().map(|d| d.activity_name.as_str()).collect();
    at.sort_unstable();
    assert_eq!(at, ["all-orders", "big-orders", "keyed-badly", "on-hold"]);
    let errors = decisions(
        &mut admin,
        ListEventDecisionsRequest {
            decisions: vec![Decision::FilterError as i32, Decision::KeyError as i32],
            page_size: 100,
            ..Default::default()
        },
    )
    .await?;
    assert_eq!(errors.len(), 5, "{errors:#?}");
    let later = decisions(
        &mut admin,
        ListEventDecisionsRequest {
            start: Some(prost_types::Timestamp::from(
                std::time::SystemTime::now() + Duration::from_secs(60),
            )),
            page_size: 100,
            ..Default::default()
        },
    )
    .await?;
    assert!(later.is_empty());

    // Pages of two: every row once, in the same order as one page.
    let paged = decisions(
        &mut admin,
        ListEventDecisionsRequest {
            page_size: 2,
            ..of_activity("")
        },
    )
    .await?;
    let whole = decisions(&mut admin, of_activity("")).await?;
    assert_eq!(paged.len(), 20);
    assert_eq!(paged, whole);
    let distinct: HashSet<(String, String)> = paged
        .iter()
        .map(|d| (d.activity_id.clone(), d.event_id.clone()))
        .collect();
    assert_eq!(distinct.len(), 20);

    // Bad requests name the field.
    for (request, field) in [
        (
            ListEventDecisionsRequest {
                decisions: vec![42],
                ..Default::default()
            },
            "decisions",
        ),
        (
            ListEventDecisionsRequest {
                page_token: "nope".to_owned(),
                ..Default::default()
            },
            "pageToken",
        ),
    ] {
        let status = admin.list_event_decisions(request).await.unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument);
        assert!(status.message().contains(field), "{status:?}");
    }

    // Counted once per decision written.
    let page = taskfactory_runtime::metrics::handle().render();
    for (activity, decision, count) in [
        ("big-orders", "fired", 1),
        ("big-orders", "deduped", 1),
        ("big-orders", "filtered", 1),
        ("big-orders", "filter_error", 1),
        ("big-orders", "rejected", 1),
        ("all-orders", "fired", 4),
        ("keyed-badly", "key_error", 4),
        ("on-hold", "paused", 4),
    ] {
        let line = format!(
            "taskfactory_event_decisions_total{{activity=\"{activity}\",decision=\"{decision}\"}} {count}"
        );
        assert!(page.contains(&line), "{line} in {page}");
    }
    Ok(())
}

/// An event delivered again after its fire was recorded (its ack lost, the trigger killed before
/// it) finds its decision made: it is still `FIRED`, not also `DEDUPED` by itself, and counted
/// once. Another event with the same key is `DEDUPED`.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_event_recorded_again_keeps_its_one_decision() -> anyhow::Result<()> {
    use taskfactory_trigger::store::record_fire;

    let env = TestEnv::new(EnvOptions::default()).await?;
    let _trigger = env.start(taskfactory_tests::Service::Trigger);
    env.wait_ready(&[taskfactory_tests::Service::Trigger])
        .await?;
    let mut admin = env.admin().await?;
    let activity = create(
        &mut admin,
        "name: again\ntrigger: {event: {subject: 'events.again.*'}}\ntasks: [{name: t, type: noop}]\n",
    )
    .await?;
    let fire = |sequence: u64, msg_id: &str| event_fire(&activity, sequence, msg_id, "k", None);
    let pool = env.db.pool().await?;
    assert!(record_fire(&pool, &fire(7, "m7")?, None).await?);
    assert!(!record_fire(&pool, &fire(7, "m7")?, None).await?);
    assert!(!record_fire(&pool, &fire(8, "m8")?, None).await?);
    assert!(!record_fire(&pool, &fire(8, "m8")?, None).await?);
    let made = decisions(&mut admin, of_activity("again")).await?;
    assert_eq!(
        summary(&made),
        [
            ("m8".to_owned(), Decision::Deduped),
            ("m7".to_owned(), Decision::Fired)
        ]
    );
    let page = taskfactory_runtime::metrics::handle().render();
    for decision in ["fired", "deduped"] {
        let line = format!(
            "taskfactory_event_decisions_total{{activity=\"again\",decision=\"{decision}\"}} 1"
        );
        assert!(page.contains(&line), "{line} in {page}");
    }
    Ok(())
}
