//! The admin API rejects bad specs with the right code and a message that names the field.

use taskfactory_model::spec::spec_from_yaml;
use taskfactory_proto::v1::{ActivitySpec, CreateActivityRequest, GetActivityRequest};
use taskfactory_tests::{EnvOptions, Service, TestEnv};

use crate::support::create;

const VALID: &str = "name: valid\ntrigger: {schedule: {cron: ['0 9 * * MON-FRI'], timezone: Europe/Berlin}}\ntasks: [{name: t, type: log}]";

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn invalid_specs_are_rejected_naming_the_field() -> anyhow::Result<()> {
    let env = TestEnv::new(EnvOptions::default()).await?;
    let _trigger = env.start(Service::Trigger);
    env.wait_ready(&[Service::Trigger]).await?;
    let mut admin = env.admin().await?;

    let cases: &[(&str, &str, &[&str])] = &[
        (
            "bad cron",
            "name: a\ntrigger: {schedule: {cron: ['0 25 * * *'], timezone: UTC}}\ntasks: [{name: t, type: log}]",
            &["trigger.schedule.cron[0]", "hour"],
        ),
        (
            "unknown timezone",
            "name: a\ntrigger: {schedule: {cron: ['@daily'], timezone: Europe/Atlantis}}\ntasks: [{name: t, type: log}]",
            &["trigger.schedule.timezone", "Europe/Atlantis"],
        ),
        (
            "missing timezone",
            "name: a\ntrigger: {schedule: {cron: ['@daily']}}\ntasks: [{name: t, type: log}]",
            &["trigger.schedule.timezone", "required"],
        ),
        (
            "template that does not compile",
            "name: a\ntrigger: {manual: {}}\ntasks: [{name: t, type: log, params: {x: '{{ item.x '}}]",
            &["tasks[0].params.x"],
        ),
        (
            "expression that does not compile",
            "name: a\ntrigger: {manual: {}}\ntasks: [{name: t, type: log, when: 'item.amount >'}]",
            &["tasks[0].when"],
        ),
        (
            "event filter that does not compile",
            "name: a\ntrigger: {event: {subject: events.x, filter: 'event.total >>> 1'}}\ntasks: [{name: t, type: log}]",
            &["trigger.event.filter"],
        ),
        (
            "missing trigger",
            "name: a\ntasks: [{name: t, type: log}]",
            &["trigger", "required"],
        ),
        (
            "bad name",
            "name: Not Valid\ntrigger: {manual: {}}\ntasks: [{name: t, type: log}]",
            &["name", "Not Valid"],
        ),
    ];
    for (what, yaml, expected) in cases {
        let spec = spec_from_yaml(yaml)?;
        let status = admin
            .create_activity(CreateActivityRequest { spec: Some(spec) })
            .await
            .expect_err(what);
        assert_eq!(
            status.code(),
            tonic::Code::InvalidArgument,
            "{what}: {}",
            status.message()
        );
        for needle in *expected {
            assert!(
                status.message().contains(needle),
                "{what}: {:?} lacks {needle:?}",
                status.message()
            );
        }
    }

    // A spec that is missing entirely.
    let status = admin
        .create_activity(CreateActivityRequest { spec: None })
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::InvalidArgument);
    assert!(status.message().contains("spec"));

    // Duplicate names.
    create(&mut admin, VALID).await?;
    let status = admin
        .create_activity(CreateActivityRequest {
            spec: Some(spec_from_yaml(VALID)?),
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::AlreadyExists);
    assert!(status.message().contains("valid"));

    // Unknown activities.
    let status = admin
        .get_activity(GetActivityRequest {
            id: "nope".to_owned(),
            version: 0,
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::NotFound);

    // Nothing invalid was stored.
    let list = admin
        .list_activities(taskfactory_proto::v1::ListActivitiesRequest::default())
        .await?
        .into_inner();
    let names: Vec<String> = list
        .activities
        .into_iter()
        .map(|a| a.spec.unwrap_or_default().name)
        .collect();
    assert_eq!(names, ["valid"]);
    let _: ActivitySpec = spec_from_yaml(VALID)?;
    Ok(())
}
