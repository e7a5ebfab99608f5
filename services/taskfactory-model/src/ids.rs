//! Typed ids. Run, fire and task ids are UUIDv5, derived from what identifies them, so that any
//! service that sees the same fire again (a redelivery, a crash and restart) computes the same ids
//! and Postgres uniqueness and JetStream dedupe recognise the repeat.

use std::fmt;

use uuid::Uuid;

/// The namespace of every taskfactory UUIDv5.
const NAMESPACE: Uuid = Uuid::from_u128(0x6f1c_2a4e_93d1_4c57_9a0e_7d2b_51c3_e8f4);

macro_rules! typed_id {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub struct $name(pub Uuid);

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                self.0.fmt(f)
            }
        }

        impl std::str::FromStr for $name {
            type Err = uuid::Error;
            fn from_str(s: &str) -> Result<Self, Self::Err> {
                Uuid::parse_str(s).map(Self)
            }
        }

        impl From<Uuid> for $name {
            fn from(id: Uuid) -> Self {
                Self(id)
            }
        }
    };
}

typed_id!(
    /// An activity, stable across its versions.
    ActivityId
);
typed_id!(
    /// One fire of an activity (a TriggerEvent): `(activity, dedupe key)`.
    FireId
);
typed_id!(
    /// What one fire did: `(activity, dedupe key)`, one run per fire.
    RunId
);
typed_id!(
    /// One task instance: `(run, template, item index)`.
    TaskId
);

impl ActivityId {
    /// A fresh id for a new activity (time-ordered).
    pub fn new_random() -> Self {
        Self(Uuid::now_v7())
    }
}

impl FireId {
    pub fn derive(activity: ActivityId, dedupe_key: &str) -> Self {
        Self(Uuid::new_v5(
            &NAMESPACE,
            format!("fire\0{activity}\0{dedupe_key}").as_bytes(),
        ))
    }
}

impl RunId {
    pub fn derive(activity: ActivityId, dedupe_key: &str) -> Self {
        Self(Uuid::new_v5(
            &NAMESPACE,
            format!("run\0{activity}\0{dedupe_key}").as_bytes(),
        ))
    }
}

impl TaskId {
    pub fn derive(run: RunId, template: &str, item_index: u32) -> Self {
        Self(Uuid::new_v5(
            &NAMESPACE,
            format!("task\0{run}\0{template}\0{item_index}").as_bytes(),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn derived_ids_are_stable_and_distinct() {
        let activity = ActivityId(Uuid::nil());
        assert_eq!(RunId::derive(activity, "k"), RunId::derive(activity, "k"));
        assert_ne!(RunId::derive(activity, "k"), RunId::derive(activity, "k2"));
        assert_ne!(
            RunId::derive(activity, "k").0,
            FireId::derive(activity, "k").0
        );
        let run = RunId::derive(activity, "k");
        assert_ne!(TaskId::derive(run, "a", 0), TaskId::derive(run, "a", 1));
        assert_ne!(TaskId::derive(run, "a", 1), TaskId::derive(run, "b", 1));
    }
}
